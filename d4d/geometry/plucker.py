"""Plücker ray maps: the per-pixel camera conditioning of CameraCtrl, CamI2V and SEVA.

For the centre ``(u + 0.5, v + 0.5)`` of every pixel (continuous pixel coordinates, see
:mod:`d4d.geometry.cameras`): ``d_cam = normalise([(u + 0.5 - cx) / fx, (v + 0.5 - cy) / fy, 1])``,
the world direction ``d = R_c2w d_cam``, the origin ``o = t_c2w`` and the moment ``m = o x d``
(not normalised, so it carries the distance of the ray from the world origin). Two channel orders
exist and both are offered by name:

* ``"moment_first"``: ``[o x d, d]``, CameraCtrl and CamI2V.
* ``"direction_first"``: ``[d, o x d]``, SEVA.

Poses are normally made relative first (:func:`d4d.geometry.cameras.relative_poses`).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from d4d.geometry.cameras import pixel_centers, resize_intrinsics
from d4d.geometry.precision import full_precision

Tensor = torch.Tensor
RayOrder = Literal["moment_first", "direction_first"]
RAY_ORDERS: tuple[str, ...] = ("moment_first", "direction_first")


@full_precision
def camera_ray_directions(K: Tensor, height: int, width: int) -> Tensor:
    """Unit ray directions through every pixel centre, in camera coordinates.

    Args:
        K: ``(..., 3, 3)`` pixel intrinsics at ``(height, width)``.

    Returns:
        ``(..., H, W, 3)`` unit vectors, OpenCV camera axes (z forward).
    """
    grid = pixel_centers(height, width, dtype=K.dtype, device=K.device)  # (H, W, 2)
    fx, fy = K[..., 0, 0, None, None], K[..., 1, 1, None, None]
    cx, cy = K[..., 0, 2, None, None], K[..., 1, 2, None, None]
    x = (grid[..., 0] - cx) / fx
    y = (grid[..., 1] - cy) / fy
    dirs = torch.stack([x, y, torch.ones_like(x)], -1)
    return dirs / dirs.norm(dim=-1, keepdim=True)


@full_precision
def plucker_rays(
    c2w: Tensor,
    K: Tensor,
    height: int,
    width: int,
    order: RayOrder = "moment_first",
) -> Tensor:
    """Plücker ray map of every pixel.

    Args:
        c2w: ``(..., 4, 4)`` OpenCV camera-to-world, e.g. ``(T, 4, 4)`` or ``(B, T, 4, 4)``.
        K: ``(..., 3, 3)`` pixel intrinsics at ``(height, width)``, broadcastable to ``c2w``'s batch.
        height, width: the resolution of the map (and of ``K``).
        order: ``"moment_first"`` ``[o x d, d]`` or ``"direction_first"`` ``[d, o x d]``.

    Returns:
        ``(..., 6, H, W)`` in ``c2w``'s dtype (float32 for bf16/fp16 cameras; computed with autocast
        off, see :mod:`d4d.geometry.precision`); ``d`` unit length, ``m = o x d`` in the units of the
        translations.
    """
    if order not in RAY_ORDERS:
        raise ValueError(f"order must be one of {RAY_ORDERS}, got {order!r}")
    K = K.to(c2w.dtype)
    dirs_cam = camera_ray_directions(K, height, width)  # (..., H, W, 3)
    rot = c2w[..., None, None, :3, :3]
    dirs = (rot @ dirs_cam[..., None]).squeeze(-1)
    origin = c2w[..., None, None, :3, 3].expand_as(dirs)
    moment = torch.linalg.cross(origin, dirs, dim=-1)
    pair = (moment, dirs) if order == "moment_first" else (dirs, moment)
    rays = torch.cat(pair, -1)  # (..., H, W, 6)
    return rays.movedim(-1, -3).contiguous()


@full_precision
def plucker_rays_resized(
    c2w: Tensor,
    K: Tensor,
    image_hw: tuple[int, int],
    out_hw: tuple[int, int],
    order: RayOrder = "moment_first",
) -> Tensor:
    """Plücker map at another resolution than the one ``K`` describes (e.g. a latent grid).

    ``K`` is scaled with :func:`~d4d.geometry.cameras.resize_intrinsics`, so every output cell
    gets the ray through the centre of its footprint in the image (SEVA computes its map this way
    at latent resolution).

    Args:
        c2w: ``(..., 4, 4)`` OpenCV camera-to-world.
        K: ``(..., 3, 3)`` pixel intrinsics of the ``image_hw = (H, W)`` image.
        out_hw: ``(h, w)`` of the map.

    Returns:
        ``(..., 6, h, w)``.
    """
    return plucker_rays(c2w, resize_intrinsics(K, image_hw, out_hw), out_hw[0], out_hw[1], order)


def fold_to_latent(rays: Tensor, factor: int) -> Tensor:
    """Fold a pixel-resolution map onto a latent grid with ``pixel_unshuffle`` (CamI2V).

    Args:
        rays: ``(..., C, H, W)`` with ``H`` and ``W`` divisible by ``factor`` (C = 6 for Plücker).
        factor: the latent downsampling ``f`` (8 for SD-style VAEs).

    Returns:
        ``(..., C * f * f, H / f, W / f)``; channel ``c * f * f + i * f + j`` holds channel ``c``
        of the pixel at offset ``(row i, column j)`` inside each ``f x f`` cell.
    """
    h, w = rays.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"map size {(h, w)} is not divisible by factor {factor}")
    lead = rays.shape[:-3]
    flat = rays.reshape(-1, *rays.shape[-3:])
    folded = F.pixel_unshuffle(flat, factor)
    return folded.reshape(*lead, *folded.shape[-3:])
