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
