"""Plücker ray maps, epipolar geometry and masks, depth back-projection and projection."""
from __future__ import annotations

import math

import pytest
import torch

from d4d.geometry.cameras import intrinsics_matrix, invert_se3, make_pose, pixel_centers
from d4d.geometry.epipolar import (
    epipolar_mask,
    epipolar_mask_block,
    epipolar_mask_reference,
    fundamental_matrices,
    iter_epipolar_mask_blocks,
    token_centers,
)
from d4d.geometry.motions import motion_path
from d4d.geometry.plucker import camera_ray_directions, fold_to_latent, plucker_rays, plucker_rays_resized
from d4d.geometry.points import depth_to_points, project_points, transform_points


def small_rotation(g: torch.Generator, deg: float, n: int) -> torch.Tensor:
    v = torch.randn(n, 3, generator=g, dtype=torch.float64) * math.radians(deg)
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.linalg.matrix_exp(torch.stack([o, -z, y, z, o, -x, -y, x, o], -1).reshape(n, 3, 3))


def cameras(g: torch.Generator, n: int, deg: float = 8.0, move: float = 0.4) -> torch.Tensor:
    """Cameras near the origin looking roughly along +z at a scene 2-6 units away."""
    return make_pose(small_rotation(g, deg, n), torch.randn(n, 3, generator=g, dtype=torch.float64) * move)


# ------------------------------------------------------------------------------ Plücker

def test_plucker_hand_case_2x2():
    K = intrinsics_matrix(1.0, 1.0, 1.0, 1.0).double()  # centres at +-0.5 around the principal point
    c2w = make_pose(torch.eye(3, dtype=torch.float64), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    rays = plucker_rays(c2w, K, 2, 2)  # moment first
    assert rays.shape == (6, 2, 2)
    r = 1 / math.sqrt(1.5)
    # Pixel (row 0, col 0): d = (-0.5, -0.5, 1)/sqrt(1.5); o = (1, 0, 0); o x d = (0, -d_z, d_y).
    assert torch.allclose(rays[3:, 0, 0], torch.tensor([-0.5 * r, -0.5 * r, r], dtype=torch.float64))
    assert torch.allclose(rays[:3, 0, 0], torch.tensor([0.0, -r, -0.5 * r], dtype=torch.float64))
    # Pixel (row 1, col 0): d = (-0.5, +0.5, 1)/sqrt(1.5).
    assert torch.allclose(rays[3:, 1, 0], torch.tensor([-0.5 * r, 0.5 * r, r], dtype=torch.float64))
    assert torch.allclose(rays[:3, 1, 0], torch.tensor([0.0, -r, 0.5 * r], dtype=torch.float64))
    # A camera at the origin has zero moment everywhere.
    at_origin = plucker_rays(torch.eye(4, dtype=torch.float64), K, 2, 2)
    assert torch.equal(at_origin[:3], torch.zeros(3, 2, 2, dtype=torch.float64))


def test_plucker_rotated_camera_direction():
    # Yaw 90 degrees right: the optical axis (+z_cam) points along world +x.
    rot = torch.tensor([[0.0, 0, 1], [0, 1, 0], [-1, 0, 0]], dtype=torch.float64)
    K = intrinsics_matrix(2.0, 2.0, 0.5, 0.5).double()  # 1x1 image, centre pixel on the axis
    rays = plucker_rays(make_pose(rot, torch.zeros(3, dtype=torch.float64)), K, 1, 1, order="direction_first")
    assert torch.allclose(rays[:3, 0, 0], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plucker_invariants_and_orders(dtype):
    g = torch.Generator().manual_seed(0)
    c2w = cameras(g, 6, deg=40.0, move=2.0).reshape(2, 3, 4, 4).to(dtype)
    K = intrinsics_matrix(30.0, 28.0, 16.5, 11.0).to(dtype)
    mf = plucker_rays(c2w, K, 12, 20, order="moment_first")
    df = plucker_rays(c2w, K, 12, 20, order="direction_first")
    assert mf.shape == (2, 3, 6, 12, 20) and mf.dtype == dtype
    assert torch.equal(mf[:, :, :3], df[:, :, 3:]) and torch.equal(mf[:, :, 3:], df[:, :, :3])
    moment, direction = mf[:, :, :3], mf[:, :, 3:]
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(direction.norm(dim=2), torch.ones(2, 3, 12, 20, dtype=dtype), atol=tol)
    assert float((moment * direction).sum(2).abs().max()) < tol * 10
    with pytest.raises(ValueError, match="order"):
        plucker_rays(c2w, K, 2, 2, order="plucker")


def test_plucker_moment_is_the_same_for_any_point_on_the_ray():
    """m = p x d for every p on the ray: the back-projected pixel at any depth gives the moment."""
    g = torch.Generator().manual_seed(1)
    c2w = cameras(g, 3, deg=30.0, move=1.5)
    K = intrinsics_matrix(torch.tensor([20.0, 22.0, 25.0]), 21.0, 8.0, 6.0).double()
    rays = plucker_rays(c2w, K, 12, 16).permute(0, 2, 3, 1)  # (T, H, W, 6)
    depth = 1 + 5 * torch.rand(3, 12, 16, generator=g, dtype=torch.float64)
    world, _ = depth_to_points(depth, K, c2w)
    expected = torch.linalg.cross(world, rays[..., 3:], dim=-1)
    assert torch.allclose(rays[..., :3], expected, atol=1e-12)
    # And the direction points from the camera centre to the world point.
    towards = torch.nn.functional.normalize(world - c2w[:, None, None, :3, 3], dim=-1)
    assert torch.allclose(rays[..., 3:], towards, atol=1e-12)


def test_plucker_at_lower_resolution_is_the_ray_through_the_cell_centre():
    K = intrinsics_matrix(40.0, 36.0, 17.0, 13.0).double()
    c2w = cameras(torch.Generator().manual_seed(2), 1)[0]
    full_dirs = camera_ray_directions(K, 24, 32)  # (H, W, 3)
    low = plucker_rays_resized(c2w, K, (24, 32), (12, 16))
    assert low.shape == (6, 12, 16)
    # A half-resolution cell centre is the mean of its 2x2 pixel centres; in unnormalised camera
    # coordinates (x/z, y/z, 1) rays are affine in the pixel position, so means match.
    plane = full_dirs / full_dirs[..., 2:]
    cell = plane.reshape(12, 2, 16, 2, 3).mean((1, 3))
    expected = c2w[:3, :3] @ torch.nn.functional.normalize(cell, dim=-1)[..., None]
    assert torch.allclose(low[3:].permute(1, 2, 0), expected.squeeze(-1), atol=1e-12)


def test_fold_to_latent_layout():
    rays = torch.arange(2 * 6 * 16 * 24, dtype=torch.float32).reshape(2, 6, 16, 24)
    folded = fold_to_latent(rays, 8)
    assert folded.shape == (2, 6 * 64, 2, 3)
    c, i, j, y, x = 4, 3, 5, 1, 2
    assert folded[1, c * 64 + i * 8 + j, y, x] == rays[1, c, y * 8 + i, x * 8 + j]
    with pytest.raises(ValueError, match="divisible"):
        fold_to_latent(rays[..., :20], 8)


# ----------------------------------------------------------------------------- epipolar

def _scene(seed: int = 3, num: int = 3):
    g = torch.Generator().manual_seed(seed)
    c2w = cameras(g, num, deg=8.0, move=0.4)
    K = intrinsics_matrix(torch.tensor([60.0, 64.0, 58.0][:num]), 62.0, 48.0, 32.0).double()
    return g, c2w, K


def test_fundamental_matrix_epipolar_constraint():
    g, c2w, K = _scene(num=3)
    fund = fundamental_matrices(c2w, K)
    assert fund.shape == (3, 3, 3, 3) and fund.dtype == torch.float64
    points = torch.cat([torch.rand(50, 2, generator=g, dtype=torch.float64) * 4 - 2, 2 + 4 * torch.rand(50, 1, generator=g, dtype=torch.float64)], 1)
    uv, _, valid = project_points(points[None], K, c2w)  # (T, 50, 2)
    assert bool(valid.all())
    hom = torch.cat([uv, torch.ones(3, 50, 1, dtype=torch.float64)], -1)
    for a in range(3):
        for b in range(3):
            if a == b:
                continue
            residual = torch.einsum("ni,ij,nj->n", hom[b], fund[a, b], hom[a])
            scale = hom[a].norm(dim=-1) * hom[b].norm(dim=-1)
            assert float((residual / scale).abs().max()) < 1e-12
            # Not vacuous: a wrong pairing of points violates it.
            wrong = torch.einsum("ni,ij,nj->n", hom[b].roll(1, 0), fund[a, b], hom[a])
            assert float((wrong / scale).abs().max()) > 1e-4


def test_token_centres_match_camI2V_and_pixel_centres():
    centres = token_centers((2, 3), 8)
    assert centres.shape == (6, 2)
    # CamI2V's idx*d + d/2 - 0.5 in pixel-index coordinates, + 0.5 into continuous coordinates.
    assert centres[0].tolist() == [4.0, 4.0] and centres[5].tolist() == [20.0, 12.0]
    assert torch.equal(token_centers((4, 5), 1).reshape(4, 5, 2), pixel_centers(4, 5, dtype=torch.float64))


def test_mask_allows_the_true_correspondence_and_rejects_far_tokens():
    g, c2w, K = _scene(num=3)
    h, w, d = 8, 12, 8
    n = h * w
    mask = epipolar_mask(c2w, K, (h, w), d)
    assert mask.shape == (3 * n, 3 * n) and mask.dtype == torch.bool
    centres = token_centers((h, w), d)
    threshold = d * math.sqrt(2) / 2
    checked = 0
    for a, b in [(0, 1), (1, 2), (2, 0)]:
        for q in torch.randint(0, n, (12,), generator=g).tolist():
            # A 3D point on the ray through the query token centre, seen by frame b.
            depth = 2 + 4 * torch.rand(1, generator=g, dtype=torch.float64)
            x, y = centres[q].tolist()
            cam = torch.tensor([(x - K[a, 0, 2]) / K[a, 0, 0], (y - K[a, 1, 2]) / K[a, 1, 1], 1.0], dtype=torch.float64) * depth
            world = transform_points(c2w[a], cam)
            uv, _, valid = project_points(world, K[b], c2w[b], image_hw=(h * d, w * d))
            if not bool(valid):
                continue
            key = int(uv[1] // d) * w + int(uv[0] // d)
            row = mask[a * n + q, b * n : (b + 1) * n]
            assert bool(row[key]), (a, b, q)
            # Independent line: through the projections of two depths on the same ray.
            far = transform_points(c2w[a], cam * 3.0)
            uv2, _, _ = project_points(far, K[b], c2w[b])
            direction = torch.nn.functional.normalize(uv2 - uv, dim=0)
            normal = torch.stack([-direction[1], direction[0]])
            dist = ((centres - uv) @ normal).abs()
            clear = (dist - threshold).abs() > 1e-6
            assert torch.equal(row[clear], (dist < threshold)[clear])
            assert bool((~row[dist > 2 * d]).all()) and int((dist > 2 * d).sum()) > 0
            checked += 1
    assert checked >= 20


def test_self_attention_runs_along_the_token_row():
    _, c2w, K = _scene(num=2)
    h, w, d = 5, 7, 4
    n = h * w
    mask = epipolar_mask(c2w, K, (h, w), d)
    same_row = torch.block_diag(*[torch.ones(w, w, dtype=torch.bool)] * h)
    assert torch.equal(mask[:n, :n], same_row) and torch.equal(mask[n:, n:], same_row)


def test_rotation_only_pair_uses_the_rotated_correspondence():
    rot = small_rotation(torch.Generator().manual_seed(4), 6.0, 1)[0]
    c2w = torch.stack([torch.eye(4, dtype=torch.float64), make_pose(rot, torch.zeros(3, dtype=torch.float64))])
    K = intrinsics_matrix(50.0, 50.0, 32.0, 24.0).double()
    h, w, d = 6, 8, 8
    n = h * w
    mask = epipolar_mask(c2w, K, (h, w), d)
    centres = token_centers((h, w), d)
    # Points at any depth on a frame-0 token's ray land on one pixel of frame 1: K R^T K^-1 x.
    for q in range(n):
        uv, _, valid = project_points(transform_points(c2w[0], torch.cat([(centres[q] - K[:2, 2]) / 50.0, torch.ones(1, dtype=torch.float64)])), K, c2w[1], image_hw=(h * d, w * d))
        if bool(valid):
            assert bool(mask[q, n + int(uv[1] // d) * w + int(uv[0] // d)])


def test_focus_of_expansion_token_is_not_left_empty():
    # A forward dolly with the principal point on a token centre (odd grid): that token's line is
    # undefined; it may attend the tokens at the epipole of the other frame, i.e. the centre.
    c2w = motion_path("zoom_in", 3, dtype=torch.float64)
    K = intrinsics_matrix(40.0, 40.0, 20.0, 20.0).double()
    h = w = 5
    d = 8
    n = h * w
    mask = epipolar_mask(c2w, K, (h, w), d)
    centre = 2 * w + 2
    for b in (1, 2):
        row = mask[centre, b * n : (b + 1) * n]
        assert bool(row[centre]) and int(row.sum()) == 1


@pytest.mark.parametrize("block_frames", [1, 2, 5])
def test_blockwise_equals_direct_all_pairs(block_frames):
    g = torch.Generator().manual_seed(6)
    c2w = cameras(g, 5, deg=15.0, move=0.8)
    c2w[3] = c2w[1]  # a repeated camera: t = 0 between distinct frames
    K = intrinsics_matrix(40.0, 42.0, 24.0, 20.0).double()
    grid, d = (5, 6), 8
    direct = epipolar_mask_reference(c2w, K, grid, d)
    blocked = epipolar_mask(c2w, K, grid, d, block_frames=block_frames)
    assert torch.equal(blocked, direct)
    assert 0.05 < direct.float().mean() < 0.9  # neither empty nor everything
    n = grid[0] * grid[1]
    frames = [frames for frames, _ in iter_epipolar_mask_blocks(c2w, K, grid, d, block_frames)]
    assert frames[0].start == 0 and frames[-1].stop == 5
    block = epipolar_mask_block(c2w.float(), K.float(), grid, d, slice(2, 4))
    assert torch.equal(block, direct[2 * n : 4 * n])


def test_full_mask_refuses_to_exceed_the_memory_budget():
    c2w = motion_path("orbit", 4, dtype=torch.float64)
    K = intrinsics_matrix(40.0, 40.0, 32.0, 32.0)
    with pytest.raises(ValueError, match="iter_epipolar_mask_blocks"):
        epipolar_mask(c2w, K, (8, 8), 8, max_elements=1000)


# -------------------------------------------------------------------------------- points

def test_depth_to_points_hand_case():
    K = intrinsics_matrix(2.0, 4.0, 1.0, 1.0).double()
    depth = torch.full((2, 2), 4.0, dtype=torch.float64)
    world, cam = depth_to_points(depth, K)
    # Pixel (row 0, col 0), centre (0.5, 0.5): x = (0.5 - 1)/2 * 4 = -1, y = (0.5 - 1)/4 * 4 = -0.5.
    assert torch.allclose(cam[0, 0], torch.tensor([-1.0, -0.5, 4.0], dtype=torch.float64))
    assert torch.allclose(cam[1, 1], torch.tensor([1.0, 0.5, 4.0], dtype=torch.float64))
    assert torch.equal(world, cam)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-3)])
def test_back_project_then_project_returns_the_pixel(dtype, tol):
    g = torch.Generator().manual_seed(7)
    c2w = cameras(g, 3, deg=40.0, move=3.0).to(dtype)
    K = intrinsics_matrix(torch.tensor([30.0, 33.0, 28.0]), 31.0, 9.0, 6.5).to(dtype)
    depth = (0.5 + 10 * torch.rand(3, 12, 17, generator=g)).to(dtype)
    world, cam = depth_to_points(depth, K, c2w)
    assert world.shape == (3, 12, 17, 3) and world.dtype == dtype
    assert torch.allclose(transform_points(invert_se3(c2w), world), cam, atol=tol * 10)
    uv, z, valid = project_points(world, K, c2w, image_hw=(12, 17))
    assert bool(valid.all())
    assert torch.allclose(uv, pixel_centers(12, 17, dtype=dtype).expand(3, 12, 17, 2), atol=tol)
    assert torch.allclose(z, depth, atol=tol * 10)


def test_project_validity_and_broadcast_to_all_cameras():
    g = torch.Generator().manual_seed(8)
    c2w = cameras(g, 4)
    K = intrinsics_matrix(50.0, 50.0, 32.0, 24.0).double()
    points = torch.tensor([[0.0, 0.0, 5.0], [0.0, 0.0, -5.0], [8.0, 0.0, 5.0]], dtype=torch.float64)  # in front, right of the view
    uv, z, valid = project_points(points[None], K, c2w, image_hw=(48, 64))  # one point set, 4 cameras
    assert uv.shape == (4, 3, 2) and z.shape == (4, 3)
    assert valid[:, 0].all() and not valid[:, 1].any() and not valid[:, 2].any()
    assert (z[:, 1] < 0).all()
    _, _, in_front = project_points(points[None], K, c2w)  # without image bounds: only depth
    assert in_front[:, 2].all()
