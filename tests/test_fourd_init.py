"""Temporal-structure initialisation: Depth Anything (tiny random), DIS flow, scale alignment."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from d4d.data.procedural_layouts import sample_scene
from d4d.data.procedural_render import render
from d4d.fourd.init import DepthEstimator, align_depth_scales, initialise, optical_flow
from d4d.geometry.cameras import relative_poses
from d4d.utils.errors import UserError


@pytest.fixture(scope="module")
def rendered():
    scene, cam = sample_scene("turn_left", np.random.default_rng(3))
    c2w = cam.c2w(6)
    K = cam.K(48, 64)
    rgb, depth, _ = render(scene, c2w, K, 48, 64)
    return rgb.permute(0, 3, 1, 2).float() / 255, depth, relative_poses(c2w.double(), 0).float(), K


def test_depth_estimator_tiny_random_gives_positive_depth_at_input_size():
    model = DepthEstimator(None, {}, input_size=28)
    depth = model(torch.rand(2, 3, 20, 30))
    assert depth.shape == (2, 20, 30) and bool((depth > 0).all())


def test_depth_estimator_bad_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot be loaded"):
        DepthEstimator(str(tmp_path / "missing"))


def test_dis_flow_follows_a_shift():
    torch.manual_seed(0)
    base = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 72, 72), 5, 1, 2)
    frames = torch.cat([base[..., 4:68, 4:68], base[..., 4:68, 1:65]])  # content moves 3 px right
    flow = optical_flow(frames)
    assert flow.shape == (1, 2, 64, 64)
    inner = flow[0, :, 16:48, 16:48]
    assert abs(float(inner[0].median()) - 3.0) < 0.5 and abs(float(inner[1].median())) < 0.5


def test_scale_alignment_makes_per_frame_scales_consistent(rendered):
    frames, depth, c2w, K = rendered
    factors = torch.tensor([3.0, 2.0, 3.5, 2.5, 4.0, 2.2])
    far = depth.clone()
    far[depth == 0] = 60.0  # the sky: far, on the same per-frame scale as the rest (as a depth net gives)
    scaled = far * factors[:, None, None]
    aligned, info = align_depth_scales(scaled, optical_flow(frames), K.expand(6, 3, 3), c2w)
    per_frame = torch.stack([(aligned[i] / depth[i])[depth[i] > 0].median() for i in range(6)])
    spread_before = float(factors.max() / factors.min())
    spread_after = float(per_frame.max() / per_frame.min())
    assert spread_before > 1.9 and spread_after < 1.1
    assert info["scales"].shape == (6,)


def test_initialise_back_projects_into_the_first_camera(rendered):
    frames, _, c2w, K = rendered
    res = initialise(frames[:3], c2w[:3], K, DepthEstimator(None, {}, input_size=28))
    assert res.points.shape == (3, 48, 64, 3) and res.flow.shape == (2, 2, 48, 64)
    assert torch.allclose(res.c2w[0], torch.eye(4), atol=1e-6)
    # frame 0's points are its own camera points: z equals the aligned depth
    assert torch.allclose(res.points[0, ..., 2], res.depth[0], rtol=1e-4, atol=1e-4)


def _clip(motion: str, seed: int, frames: int = 8, hw=(48, 64)):
    scene, cam = sample_scene(motion, np.random.default_rng(seed), static=True)
    c2w = cam.c2w(frames)
    K = cam.K(*hw)
    rgb, depth, _ = render(scene, c2w, K, *hw)
    return rgb.permute(0, 3, 1, 2).float() / 255, depth, relative_poses(c2w.double(), 0).float(), K


def _exact_flow(depth, c2w, K):
    """Flow t -> t+1 induced by the ground-truth depth and poses (static scene)."""
    from d4d.geometry.points import depth_to_points, project_points

    f, h, w = depth.shape
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    out = []
    for t in range(f - 1):
        pts, _ = depth_to_points(depth[t].clamp_min(1e-3), K, c2w[t])
        uv, _, _ = project_points(pts, K, c2w[t + 1])
        out.append((uv - torch.stack([xs, ys], -1)).permute(2, 0, 1))
    return torch.stack(out)


def _recovered_scale(aligned, depth):
    return float((aligned[0] / depth[0])[depth[0] > 0].median())


@pytest.mark.parametrize("motion", ["zoom_in", "orbit"])
def test_global_scale_is_recovered_from_parallax(motion):
    """Depth known only up to a factor 0.137 (and 5% noise): with the parallax of the flow the
    common depth-to-pose scale comes back (known scale: the renderer's metres)."""
    frames, depth, c2w, K = _clip(motion, 1)
    torch.manual_seed(0)
    relative = depth * 0.137 * (1 + 0.05 * torch.randn_like(depth))
    flow = _exact_flow(depth, c2w, K) if motion == "zoom_in" else optical_flow(frames)
    aligned, info = align_depth_scales(relative, flow, K.expand(8, 3, 3), c2w)
    assert info["scale_source"] == "parallax" and info["scale_observable"]
    assert abs(_recovered_scale(aligned, depth) - 1) < 0.05


@pytest.mark.parametrize("seed", [1, 2])
def test_zoom_out_scale_from_dis_flow_on_small_frames(seed):
    """A dolly backwards at 48x64 with DIS flow: with the preset's half-resolution finest level and
    8 px patches the radial flow came out short and the scale 1.40x / 1.47x too large; at full
    resolution with 4 px patches it is within 15%."""
    frames, depth, c2w, K = _clip("zoom_out", seed)
    aligned, info = align_depth_scales(depth * 0.137, optical_flow(frames), K.expand(8, 3, 3), c2w)
    assert info["scale_source"] == "parallax"
    assert abs(_recovered_scale(aligned, depth) - 1) < 0.15


def test_unobservable_zoom_in_falls_back_to_the_prior_and_says_so():
    """A dolly down a corridor of repeating texture: DIS sees almost no motion, so the parallax says
    nothing about the scale. The old unbounded search ran to the end of its range (60x off);
    now the prior (camera travel = half frame 0's median depth) is used, flagged in ``info``."""
    frames, depth, c2w, K = _clip("zoom_in", 1)
    relative = depth * 0.137
    aligned, info = align_depth_scales(relative, optical_flow(frames), K.expand(8, 3, 3), c2w)
    assert info["scale_source"] == "prior" and not info["scale_observable"]
    extent = float(c2w[:, :3, 3].norm(dim=-1).max())
    assert abs(float(aligned[0][depth[0] > 0].median()) - extent / 0.5) < 1e-3 * extent
    assert 1 / 4 < _recovered_scale(aligned, depth) < 4
    # an explicit prior is honoured
    aligned, info = align_depth_scales(relative, optical_flow(frames), K.expand(8, 3, 3), c2w, prior_depth=3.0)
    assert info["prior_depth"] == 3.0 and abs(float(aligned[0][depth[0] > 0].median()) - 3.0) < 0.01


def test_a_turning_camera_keeps_the_depth_model_units():
    frames, depth, c2w, K = _clip("turn_left", 2)
    aligned, info = align_depth_scales(depth * 0.137, optical_flow(frames), K.expand(8, 3, 3), c2w)
    assert info["scale_source"] == "depth model"
    assert abs(float(info["scales"].log().mean())) < 1e-5
