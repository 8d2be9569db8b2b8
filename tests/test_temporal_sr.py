"""Depth-guided temporal super-resolution on a ray-cast procedural clip with known depth and cameras."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from d4d.data.procedural import render, sample_scene
from d4d.temporal_sr import (
    interpolate_cameras,
    interpolate_pose,
    linear_blend,
    rotation_angle_deg,
    temporal_super_resolution,
)
from d4d.utils.errors import UserError


@pytest.fixture(scope="module")
def clip():
    """5 ray-cast frames (48x48) of a static turning scene: inputs 0, 2, 4 and true in-betweens 1, 3."""
    torch.set_num_threads(1)
    scene, path = sample_scene("turn_left", np.random.default_rng(3), static=True)
    c2w = path.c2w(5)
    K = path.K(48, 48)
    rgb, depth, _ = render(scene, c2w, K.expand(5, 3, 3), 48, 48)
    video = torch.as_tensor(rgb).permute(0, 3, 1, 2).float() / 255
    return video, torch.as_tensor(depth).float(), c2w.float(), K.float()


def _psnr(a, b):
    return float(10 * torch.log10(1 / (a - b).pow(2).mean()))


def test_pose_interpolation_is_geodesic():
    a = torch.eye(4)
    b = torch.eye(4)
    ang = torch.tensor(0.4)
    b[:3, :3] = torch.tensor([[ang.cos(), 0, ang.sin()], [0, 1, 0], [-ang.sin(), 0, ang.cos()]])
    b[:3, 3] = torch.tensor([1.0, 0.0, 2.0])
    mid = interpolate_pose(a, b, 0.5)
    assert rotation_angle_deg(mid[:3, :3]) == pytest.approx(np.degrees(0.2), abs=1e-4)
    assert torch.allclose(mid[:3, 3], torch.tensor([0.5, 0.0, 1.0]))
    assert torch.allclose(interpolate_pose(a, b, 1.0), b, atol=1e-6)
    cams = interpolate_cameras(torch.stack([a, b, a]), 3)
    assert cams.shape == (7, 4, 4) and torch.allclose(cams[3], b, atol=1e-6) and torch.allclose(cams[6], a)


def test_in_between_frames_beat_linear_blending(clip):
    video, depth, c2w, K = clip
    idx = [0, 2, 4]
    sr = temporal_super_resolution(video[idx], depth[idx], c2w[idx], K, factor=2)
    assert sr.frames.shape == video.shape and sr.depth.shape == depth.shape and sr.c2w.shape == (5, 4, 4)
    assert torch.equal(sr.frames[idx], video[idx])  # input frames are kept
    assert torch.allclose(sr.c2w[1], c2w[1], atol=1e-3)  # turn at constant speed: midpoint = true camera
    lin = linear_blend(video[idx], 2)
    for i in (1, 3):
        assert _psnr(sr.frames[i], video[i]) > _psnr(lin[i], video[i]) + 1.0
    # depth of the new frames is the scene's: compare where both the truth and the warp have a surface
    both = (sr.depth[1] > 0) & (depth[1] > 0)
    assert both.float().mean() > 0.3
    rel = ((sr.depth[1] - depth[1]).abs() / depth[1])[both]
    assert rel.median() < 0.02
    assert 0.0 <= sr.fallback < 1.0


def test_factor_one_and_upscaling(clip):
    video, depth, c2w, K = clip
    same = temporal_super_resolution(video[:3], depth[:3], c2w[:3], K, factor=1)
    assert torch.equal(same.frames, video[:3]) and torch.equal(same.depth, depth[:3])
    big = temporal_super_resolution(video[:2], depth[:2], c2w[:2], K, factor=3, scale=2.0)
    assert big.frames.shape == (4, 3, 96, 96) and big.depth.shape == (4, 96, 96)
    assert torch.allclose(big.K[:2], K[:2] * 2)
    assert torch.isfinite(big.depth).all() and (big.frames >= 0).all() and (big.frames <= 1).all()


def test_bad_arguments_name_the_problem(clip):
    video, depth, c2w, K = clip
    with pytest.raises(UserError, match="factor must be >= 1"):
        temporal_super_resolution(video, depth, c2w, K, factor=0)
    with pytest.raises(UserError, match="need depth"):
        temporal_super_resolution(video, depth[:2], c2w, K)


@pytest.fixture(scope="module")
def moving_clip():
    """9 ray-cast frames (48x48) of look_up with rising balloons: inputs 0, 2, .., 8; moving-object
    mask; and an oracle 4D scene of the inputs that follows the objects' true trajectories."""
    from benchmarks.temporal_sr import TrajectoryScene, make_clip

    torch.set_num_threads(1)
    scene, video, depth, mask, c2w, K = make_clip("look_up", 0, 5, 48, 2, static=False)
    idx = [0, 2, 4, 6, 8]
    return video, depth, mask, c2w, K, idx, TrajectoryScene(scene, depth[idx], c2w[idx], K)


def test_scene_motion_moves_objects_between_frames(moving_clip):
    """The static warp puts the balloons where they were; the 4D scene's deformation field (here the
    true motion) puts them where they are at the in-between time."""
    video, depth, mask, c2w, K, idx, oracle = moving_clip
    new = [1, 3, 5, 7]
    static = temporal_super_resolution(video[idx], depth[idx], c2w[idx], K, 2)
    moved = temporal_super_resolution(video[idx], depth[idx], c2w[idx], K, 2, scene=oracle)
    assert static.moved == 0.0 and 0.02 < moved.moved < 0.5  # balloons only, not the tower or ground
    assert torch.equal(moved.frames[idx], video[idx])
    m = mask[new]

    def masked_psnr(x):
        return float(10 * torch.log10(1 / (x[new] - video[new]).pow(2).mean(1)[m].mean()))

    assert masked_psnr(moved.frames) > masked_psnr(static.frames) + 5.0
    assert _psnr(moved.frames[new], video[new]) > _psnr(static.frames[new], video[new]) + 3.0
    assert _psnr(moved.frames[new], video[new]) > _psnr(linear_blend(video[idx], 2)[new], video[new]) + 3.0


def test_a_scene_without_motion_changes_nothing(moving_clip):
    """An un-optimised PointScene4D (deformation output layer at zero) is a static scene: the result is
    the static warp's, bit for bit; a scene of another clip length is refused."""
    from d4d.fourd.scene import PointScene4D
    from d4d.geometry.points import depth_to_points

    video, depth, _, c2w, K, idx, oracle = moving_clip
    world, _ = depth_to_points(depth[idx], K.expand(5, 3, 3), c2w[idx])
    scene = PointScene4D.from_point_maps(world, video[idx], (depth[idx] > 0).float(), c2w[idx], K, 5000)
    still = temporal_super_resolution(video[idx], depth[idx], c2w[idx], K, 2, scene=scene)
    static = temporal_super_resolution(video[idx], depth[idx], c2w[idx], K, 2)
    assert torch.equal(still.frames, static.frames) and still.moved == 0.0
    with pytest.raises(UserError, match="the 4D scene has 5 frames, the video 3"):
        temporal_super_resolution(video[:3], depth[:3], c2w[:3], K, 2, scene=oracle)
