"""Epipolar attention: masks against the true epipolar geometry, zero gradient from disallowed keys,
occlusion-sensitive masking, and the memory of the blockwise construction."""
from __future__ import annotations

import math

import torch

from d4d.geometry.cameras import invert_se3, make_pose
from d4d.geometry.epipolar import token_centers
from d4d.models.dynamic import build_tiny_wan
from d4d.models.dynamic.epipolar_attention import EpipolarBranch, clip_epipolar_mask
from d4d.models.dynamic.occlusion import covisible_keys

GRID, PX = (12, 16), 8  # 96 x 128 image, 12 x 16 tokens of 8 px
IMAGE_HW = (GRID[0] * PX, GRID[1] * PX)
K = torch.tensor([[100.0, 0, 64], [0, 100.0, 48], [0, 0, 1]])


def _rot_y(deg: float) -> torch.Tensor:
    a = math.radians(deg)
    return torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])


def _two_views() -> torch.Tensor:
    second = make_pose(_rot_y(-12.0), torch.tensor([0.6, 0.15, 0.2]))  # a sideways step turning back in
    return torch.stack([torch.eye(4), second]).double()


def _project(c2w: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    cam = (invert_se3(c2w) @ torch.cat([points, torch.ones(len(points), 1, dtype=points.dtype)], 1).T).T[:, :3]
    pix = (K.double() @ cam.T).T
    return pix[:, :2] / pix[:, 2:]


def test_allowed_keys_lie_on_the_true_epipolar_line():
    c2w = _two_views()
    mask = clip_epipolar_mask(c2w, K, IMAGE_HW, GRID, PX)
    n = GRID[0] * GRID[1]
    centers = token_centers(GRID, PX)
    half_cell = PX * math.sqrt(2) / 2
    checked = 0
    for q in range(0, n, 7):
        # the true line: project points of the query's ray at several depths into view 1
        ray = torch.linalg.solve(K.double(), torch.tensor([*centers[q].tolist(), 1.0], dtype=torch.float64))
        pts = _project(c2w[1], torch.stack([ray * d for d in (0.5, 1.0, 2.0, 4.0, 50.0)]))
        direction = (pts[-1] - pts[0]) / (pts[-1] - pts[0]).norm()
        normal = torch.stack([-direction[1], direction[0]])
        dist = ((centers - pts[0]) @ normal).abs()  # distance of every key centre in view 1 to the line
        allowed = mask[q, n:]
        if not (dist < half_cell - 1e-6).any():  # the line misses view 1's image
            assert not allowed.any()
            continue
        # every allowed key is within the threshold of the true line, every key within it is allowed
        assert dist[allowed].max() < half_cell + 1e-6
        assert allowed[dist < half_cell - 1e-6].all()
        # and the projections themselves (inside the image) fall in allowed cells
        for x, y in pts:
            if 0 <= x < IMAGE_HW[1] and 0 <= y < IMAGE_HW[0]:
                assert allowed[int(y // PX) * GRID[1] + int(x // PX)]
        checked += 1
    assert checked > 20
    # own frame: along the query's own row (module docstring of d4d.geometry.epipolar)
    row = mask[:n, :n].reshape(GRID[0], GRID[1], GRID[0], GRID[1])
    assert row[3, 5, 3].all() and not row[3, 5, 4].any()


def test_masked_attention_gives_zero_gradient_from_disallowed_keys():
    torch.manual_seed(0)
    attn = build_tiny_wan().transformer.blocks[0].attn1
    branch = EpipolarBranch(attn, num_registers=2, chunk_frames=1)
    torch.nn.init.normal_(branch.to_out.weight)  # a fresh branch outputs zero: make it say something
    grid, px = (4, 6), 8
    c2w = _two_views()
    Kq = torch.tensor([[40.0, 0, 24], [0, 40.0, 16], [0, 0, 1]])
    mask = clip_epipolar_mask(c2w, Kq, (32, 48), grid, px)
    n = grid[0] * grid[1]
    x = torch.randn(1, 2 * n, 32, requires_grad=True)
    q = 9
    out = branch(x, mask[None], n)
    out[0, q].sum().backward()
    grad = x.grad[0].abs().sum(-1)
    allowed = mask[q].clone()
    allowed[q] = True  # the query's own input
    assert (grad[~allowed] == 0).all() and (~allowed).sum() > n // 2
    assert (grad[allowed] > 0).all()
    assert branch.registers.grad.abs().sum() > 0  # registers are always visible


def test_occlusion_masks_out_of_view_and_disoccluded_keys():
    grid, px, hw = (6, 8), 8, (48, 64)
    Kq = torch.tensor([[50.0, 0, 32], [0, 50.0, 24], [0, 0, 1]])
    c2w = torch.stack([torch.eye(4), make_pose(torch.eye(3), torch.tensor([1.0, 0, 0]))]).double()
    depth = torch.full((2, *grid), 4.0)
    vis = covisible_keys(c2w, Kq, hw, grid, px, depth)
    n = grid[0] * grid[1]
    cols = torch.arange(n) % grid[1]
    # camera 1 is 1 m to the right: at 4 m its right edge shows what camera 0 never saw
    assert not vis[0, 1][cols == grid[1] - 1].any() and vis[0, 1][cols < 4].all()
    assert vis[0, 0].all() and vis[1, 1].all()
    # an occluder in view 0 in front of where view 1's keys land: those keys were hidden, now disoccluded
    occluded = depth.clone()
    occluded[0, :, 3:5] = 1.0
    vis2 = covisible_keys(c2w, Kq, hw, grid, px, occluded)
    assert (vis[0, 1] & ~vis2[0, 1]).sum() >= grid[0]
    # without depth: points at infinity, a pure translation hides nothing
    assert covisible_keys(c2w, Kq, hw, grid, px, None).all()
    # the mask honours it
    full = clip_epipolar_mask(c2w, Kq, hw, grid, px, occlusion=True, depth=occluded)
    plain = clip_epipolar_mask(c2w, Kq, hw, grid, px)
    assert (full <= plain).all() and not full[:n, n:][:, ~vis2[0, 1]].any()


def test_blockwise_mask_matches_reference_and_attention_chunks_agree():
    from d4d.geometry.epipolar import epipolar_mask_reference
    from d4d.geometry.motions import motion_path

    c2w = motion_path("orbit", 5).double()
    ref = epipolar_mask_reference(c2w, K, GRID, PX)
    assert torch.equal(clip_epipolar_mask(c2w, K, IMAGE_HW, GRID, PX, block_frames=2), ref)
    torch.manual_seed(0)
    branch = EpipolarBranch(build_tiny_wan().transformer.blocks[0].attn1, 2, chunk_frames=1)
    torch.nn.init.normal_(branch.to_out.weight)
    x = torch.randn(1, ref.shape[0], 32)
    one = branch(x, ref[None], GRID[0] * GRID[1])
    branch.chunk_frames = 5
    torch.testing.assert_close(one, branch(x, ref[None], GRID[0] * GRID[1]))
