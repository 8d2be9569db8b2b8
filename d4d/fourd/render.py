"""A differentiable point renderer in torch: soft z-buffered Gaussian splatting.

Each point (world position, radius in world units, features) projects with
:func:`d4d.geometry.points.project_points` (OpenCV, pixel centres at +0.5) and spreads over the
``window x window`` pixels around its projection with an isotropic Gaussian of standard deviation
``f * radius / z`` pixels (clamped to ``[0.3, window / 2]``). Per pixel, ``z_min`` is the nearest
footprint's depth (not differentiated); every contribution is weighted by
``exp(-(z - z_min) / (tau * z_min))``, so points behind the front surface fade out smoothly.
Features are the weight-normalised average, coverage ``alpha = 1 - exp(-sum w)``. Gradients reach
positions, radii and features (and through ``c2w``, the camera).
"""
from __future__ import annotations

import torch

from d4d.geometry.points import project_points

Tensor = torch.Tensor


def splat(points: Tensor, features: Tensor, radius: Tensor, c2w: Tensor, K: Tensor, height: int, width: int,
          window: int = 3, tau: float = 0.02) -> tuple[Tensor, Tensor, Tensor]:
    """Render ``points (N, 3)`` with ``features (N, C)`` and ``radius (N,)`` from one camera.

    Args: ``c2w (4, 4)`` OpenCV camera-to-world, ``K (3, 3)`` pixel intrinsics at (height, width).
    Returns: ``features (C, H, W)`` (weighted mean, 0 where nothing lands), ``depth (H, W)`` and
    ``alpha (H, W)`` in [0, 1).
    """
    n, c = features.shape
    uv, z, valid = project_points(points, K, c2w, min_depth=1e-3)
    sigma = (K[0, 0] * radius / z.clamp_min(1e-3)).clamp(0.3, window / 2)
    x, y = uv[:, 0] - 0.5, uv[:, 1] - 0.5  # pixel-index coordinates
    snap = torch.round if window % 2 else torch.floor
    x0, y0 = snap(x).detach(), snap(y).detach()
    half = window // 2
    offs = torch.arange(-half + (1 - window % 2), half + 1, device=points.device, dtype=points.dtype)
    dx, dy = torch.meshgrid(offs, offs, indexing="xy")
    px = x0[:, None] + dx.reshape(1, -1)
    py = y0[:, None] + dy.reshape(1, -1)
    d2 = (px - x[:, None]) ** 2 + (py - y[:, None]) ** 2
    g = torch.exp(-0.5 * d2 / sigma[:, None] ** 2)
    inside = valid[:, None] & (px >= 0) & (px < width) & (py >= 0) & (py < height)
    pix = (py.clamp(0, height - 1) * width + px.clamp(0, width - 1)).long()
    pix = torch.where(inside, pix, torch.zeros_like(pix))
    zz = z[:, None].expand_as(g)
    big = torch.finfo(z.dtype).max
    zmin = torch.full((height * width,), big, device=points.device, dtype=z.dtype)
    zmin = zmin.scatter_reduce(0, pix[inside], zz[inside].detach(), reduce="amin")
    zref = zmin[pix].clamp(max=1e6)
    w = g * torch.exp(-((zz - zref) / (tau * zref)).clamp(min=0, max=50)) * inside
    flat_w = w.reshape(-1)
    flat_pix = pix.reshape(-1)
    den = torch.zeros(height * width, device=points.device, dtype=w.dtype).index_add(0, flat_pix, flat_w)
    feat = features[:, None, :].expand(n, w.shape[1], c).reshape(-1, c)
    num = torch.zeros(height * width, c, device=points.device, dtype=w.dtype).index_add(0, flat_pix, flat_w[:, None] * feat)
    dsum = torch.zeros(height * width, device=points.device, dtype=w.dtype).index_add(0, flat_pix, flat_w * zz.reshape(-1))
    safe = den.clamp_min(1e-8)
    out = (num / safe[:, None]).T.reshape(c, height, width)
    depth = (dsum / safe).reshape(height, width) * (den > 1e-8).reshape(height, width)
    alpha = (1 - torch.exp(-den)).reshape(height, width)
    return out, depth, alpha
