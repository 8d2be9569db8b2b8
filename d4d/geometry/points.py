"""Depth maps <-> 3D points, with the pixel-centre convention of :mod:`d4d.geometry.cameras`.

Depth is z-depth (distance along the optical axis, not along the ray), in the units of the
``c2w`` translations. Pixel ``(row v, column u)`` back-projects through its centre
``(u + 0.5, v + 0.5)``; :func:`project_points` returns the same continuous coordinates, so
``floor(uv)`` is the pixel index and a back-projected pixel projects back to its centre.
"""
from __future__ import annotations

import torch

from d4d.geometry.cameras import invert_se3, pixel_centers
from d4d.geometry.precision import full_precision

Tensor = torch.Tensor


@full_precision
def transform_points(transform: Tensor, points: Tensor) -> Tensor:
    """Apply ``(*B, 4, 4)`` rigid transforms to ``(*B, *S, 3)`` points (``*S`` any spatial dims).

    The batch dims ``*B`` of ``points`` must broadcast with those of ``transform``.
    """
    nb = transform.ndim - 2
    flat = points.reshape(*points.shape[:nb], -1, 3)
    rot, trans = transform[..., None, :3, :3], transform[..., None, :3, 3]
    out = (rot @ flat[..., None]).squeeze(-1) + trans
    return out.reshape(*out.shape[:nb], *points.shape[nb:])


@full_precision
def depth_to_points(depth: Tensor, K: Tensor, c2w: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Back-project z-depth maps.

    Args:
        depth: ``(*B, H, W)`` z-depth (0 or negative = invalid; those points land on the camera
            centre or behind it, mask them with ``depth > 0``).
        K: ``(*B, 3, 3)`` pixel intrinsics at ``(H, W)``.
        c2w: ``(*B, 4, 4)`` OpenCV camera-to-world; ``None`` keeps world = camera.

    Returns:
        ``(world_points, camera_points)``, both ``(*B, H, W, 3)`` in ``depth``'s dtype.
    """
    height, width = depth.shape[-2:]
    K = K.to(depth.dtype)
    grid = pixel_centers(height, width, dtype=depth.dtype, device=depth.device)
    fx, fy = K[..., 0, 0, None, None], K[..., 1, 1, None, None]
    cx, cy = K[..., 0, 2, None, None], K[..., 1, 2, None, None]
    x = (grid[..., 0] - cx) / fx * depth
    y = (grid[..., 1] - cy) / fy * depth
    cam = torch.stack([x, y, depth], -1)
    world = cam if c2w is None else transform_points(c2w.to(depth.dtype), cam)
    return world, cam


@full_precision
def project_points(
    points: Tensor,
    K: Tensor,
    c2w: Tensor | None = None,
    image_hw: tuple[int, int] | None = None,
    min_depth: float = 1e-6,
) -> tuple[Tensor, Tensor, Tensor]:
    """Project world points into cameras.

    Args:
        points: ``(*B, *S, 3)`` world points, ``*B`` broadcastable with the cameras' batch.
        K: ``(*B, 3, 3)`` pixel intrinsics.
        c2w: ``(*B, 4, 4)`` OpenCV camera-to-world; ``None`` means the points are in camera
            coordinates already.
        image_hw: when given, points outside ``[0, W) x [0, H)`` are also invalid.
        min_depth: points with camera z at or below this are invalid (behind or on the camera).

    Returns:
        ``(uv, z, valid)``: ``uv (*B, *S, 2)`` continuous pixel coordinates (pixel centres at
        ``+0.5``; undefined where invalid), ``z (*B, *S)`` camera z-depth, ``valid (*B, *S)`` bool.
    """
    K = K.to(points.dtype)
    cam = points if c2w is None else transform_points(invert_se3(c2w.to(points.dtype)), points)
    z = cam[..., 2]
    nb = K.ndim - 2
    spatial = cam.ndim - 1 - nb
    view = (*K.shape[:-2], *([1] * spatial))
    fx, fy = K[..., 0, 0].reshape(view), K[..., 1, 1].reshape(view)
    cx, cy = K[..., 0, 2].reshape(view), K[..., 1, 2].reshape(view)
    valid = z > min_depth
    safe_z = torch.where(valid, z, torch.ones_like(z))
    u = fx * cam[..., 0] / safe_z + cx
    v = fy * cam[..., 1] / safe_z + cy
    if image_hw is not None:
        valid = valid & (u >= 0) & (u < image_hw[1]) & (v >= 0) & (v < image_hw[0])
    return torch.stack([u, v], -1), z, valid
