"""A differentiable point renderer in torch: Gaussian splats, alpha-composited front to back.

Each point (world position, radius in world units, opacity in [0, 1], features) projects with
:func:`d4d.geometry.points.project_points` (OpenCV, pixel centres at +0.5) and covers the
``window x window`` pixels around its projection with an isotropic Gaussian of standard deviation
``f * radius / z`` pixels (clamped to ``[0.3, window / 2]``): per pixel its alpha is
``a = opacity * exp(-d^2 / (2 sigma^2))`` (at most 0.99). Contributions are sorted per pixel by depth
(one global sort, the order is not differentiated) and composited front to back as in Gaussian
splatting: ``w_k = a_k * prod_{j<k} (1 - a_j)``; coverage ``alpha = sum_k w_k = 1 - prod (1 - a_k)``.
Features and depth are normalised by the coverage (``sum w f / alpha``), so a pixel reached by a few
faint splats shows their colour, not a darkened one; callers weight their losses by ``alpha``.
Gradients reach positions, radii, opacities and features (and through ``c2w``, the camera).
"""
from __future__ import annotations

import torch

from d4d.geometry.points import project_points

Tensor = torch.Tensor


def splat(points: Tensor, features: Tensor, radius: Tensor, c2w: Tensor, K: Tensor, height: int, width: int,
          window: int = 3, tau: float | None = None, opacity: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Render ``points (N, 3)`` with ``features (N, C)``, ``radius (N,)`` and ``opacity (N,)`` (default
    all ones) from one camera (module docstring). ``tau`` is accepted for old scene files and unused.

    Args: ``c2w (4, 4)`` OpenCV camera-to-world, ``K (3, 3)`` pixel intrinsics at (height, width).
    Returns: ``features (C, H, W)`` (0 where nothing lands), ``depth (H, W)`` (composited z) and
    ``alpha (H, W)`` coverage in [0, 1).
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
    op = points.new_ones(n) if opacity is None else opacity
    inside = valid[:, None] & (px >= 0) & (px < width) & (py >= 0) & (py < height)
    a = (g * op[:, None]).clamp(max=0.99) * inside
    pix = (py.clamp(0, height - 1) * width + px.clamp(0, width - 1)).long()
    pix = torch.where(inside, pix, torch.zeros_like(pix)).reshape(-1)
    zz = z[:, None].expand_as(g).reshape(-1)
    a = a.reshape(-1)
    # front-to-back order within each pixel: sort by depth, then (stably) by pixel
    order = torch.argsort(zz.detach())
    order = order[torch.argsort(pix[order], stable=True)]
    ps, a_s = pix[order], a[order]
    la = -torch.log1p(-a_s)
    cs = torch.cumsum(la, 0)
    excl = cs - la
    start = torch.ones_like(ps, dtype=torch.bool)
    start[1:] = ps[1:] != ps[:-1]
    seg = torch.cumsum(start.long(), 0) - 1
    trans = torch.exp(-(excl - excl[start][seg]))
    w = a_s * trans
    hw = height * width
    den = torch.zeros(hw, device=points.device, dtype=w.dtype).index_add(0, ps, w)
    feat = features[:, None, :].expand(n, g.shape[1], c).reshape(-1, c)[order]
    num = torch.zeros(hw, c, device=points.device, dtype=w.dtype).index_add(0, ps, w[:, None] * feat)
    dsum = torch.zeros(hw, device=points.device, dtype=w.dtype).index_add(0, ps, w * zz[order])
    safe = den.clamp_min(1e-6)
    hit = (den > 1e-6).to(w.dtype)
    out = (num / safe[:, None] * hit[:, None]).T.reshape(c, height, width)
    depth = (dsum / safe * hit).reshape(height, width)
    return out, depth, den.reshape(height, width)
