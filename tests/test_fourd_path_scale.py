"""The network's point maps are brought into the camera path's units when no depth model is given."""
from __future__ import annotations

import pytest
import torch

from d4d.fourd.reconstruct import path_scale
from d4d.geometry.motions import motion_path


def _maps(c2w: torch.Tensor, units: float):
    """Own-camera points of a random scene and the same points in the world, both in units ``units``
    times smaller than the path's."""
    g = torch.Generator().manual_seed(0)
    f = c2w.shape[0]
    local = torch.randn(f, 6, 8, 3, generator=g) * 0.3
    local[..., 2] = 2.0 + torch.rand(f, 6, 8, generator=g)
    rel = c2w.double()
    world = torch.einsum("fij,fhwj->fhwi", rel[:, :3, :3], local.double()) + rel[:, None, None, :3, 3] / units
    return world.float(), local


@pytest.mark.parametrize("motion", ["zoom_in", "orbit"])
def test_path_scale_recovers_the_units(motion):
    c2w = motion_path(motion, 6)
    world, local = _maps(c2w, units=7.5)
    s, source = path_scale(world, local, torch.ones(6, 6, 8), c2w)
    assert source == "path" and s == pytest.approx(7.5, rel=1e-6)


def test_rotation_only_path_keeps_the_network_units():
    c2w = motion_path("turn_left", 6)
    assert float(c2w[:, :3, 3].norm(dim=-1).max()) < 1e-6
    world, local = _maps(c2w, units=3.0)
    assert path_scale(world, local, torch.ones(6, 6, 8), c2w) == (1.0, "unobservable")
    # no confident pixel: no centre can be estimated, so the units are kept (not NaN)
    zoom = motion_path("zoom_in", 6)
    world, local = _maps(zoom, units=3.0)
    assert path_scale(world, local, torch.zeros(6, 6, 8), zoom) == (1.0, "unobservable")
