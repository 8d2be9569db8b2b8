"""Reprojection consistency of generated views (the static module's must-show measure).

View ``j`` is reconstructed from view ``i``: every pixel of ``j`` with known depth is
back-projected (:func:`d4d.geometry.points.depth_to_points`), projected into camera ``i`` and
sampled there (bilinear). The error is the mean absolute RGB difference between view ``j`` and
this warp, over pixels that land inside ``i`` and whose depth in ``i`` agrees with the projected
depth within ``occlusion_tol`` (relative), so occluded pixels are not counted.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from d4d.geometry.points import depth_to_points, project_points

Tensor = torch.Tensor


def warp_view(src: Tensor, src_depth: Tensor, dst_depth: Tensor, K_src: Tensor, K_dst: Tensor,
              c2w_src: Tensor, c2w_dst: Tensor, occlusion_tol: float = 0.05) -> tuple[Tensor, Tensor]:
    """Warp ``src (3, H, W)`` into the ``dst`` camera using ``dst_depth (H, W)`` z-depth.

    ``K_*``: ``(3, 3)`` pixel intrinsics at ``(H, W)``; ``c2w_*``: ``(4, 4)`` OpenCV camera-to-world.
    Returns ``(warped (3, H, W), valid (H, W) bool)``.
    """
    h, w = dst_depth.shape
    pts, _ = depth_to_points(dst_depth.double(), K_dst.double(), c2w_dst.double())
    uv, z, valid = project_points(pts, K_src.double(), c2w_src.double(), image_hw=(h, w))
    valid = valid & (dst_depth > 0)
    grid = torch.stack([uv[..., 0] / w * 2 - 1, uv[..., 1] / h * 2 - 1], -1).float()[None]
    warped = F.grid_sample(src[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    seen = F.grid_sample(src_depth[None, None].float(), grid, mode="nearest", padding_mode="border",
                         align_corners=False)[0, 0]
    valid = valid & ((seen - z.float()).abs() <= occlusion_tol * z.float().abs())
    return warped, valid


def reprojection_error(frames: Tensor, depth: Tensor, K: Tensor, c2w: Tensor, pairs: list[tuple[int, int]] | None = None,
                       occlusion_tol: float = 0.05) -> Tensor:
    """Mean absolute reprojection error (RGB in [0, 1]) over view pairs.

    Args:
        frames: ``(V, 3, H, W)`` views to test; depth: ``(V, H, W)`` their true z-depth;
        K: ``(V, 3, 3)``; c2w: ``(V, 4, 4)``.
        pairs: ``(src, dst)`` pairs; default all neighbours ``(i, i + 1)`` and ``(i + 1, i)``.

    Returns:
        scalar tensor: the pixel-weighted mean of ``|frames[dst] - warp(frames[src])|`` (NaN if no pixel).
    """
    v = frames.shape[0]
    pairs = pairs or [p for i in range(v - 1) for p in ((i, i + 1), (i + 1, i))]
    total, count = frames.new_zeros((), dtype=torch.float64), 0
    for s, d in pairs:
        warped, valid = warp_view(frames[s], depth[s], depth[d], K[s], K[d], c2w[s], c2w[d], occlusion_tol)
        diff = (warped - frames[d].float()).abs().mean(0)
        total = total + diff[valid].double().sum()
        count += int(valid.sum())
    return (total / count).float() if count else torch.tensor(float("nan"))
