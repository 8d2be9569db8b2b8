"""Masked image metrics of Table 1: mPSNR and mSSIM as DyCheck defines them.

Conventions (``../shared/docs/reference.md`` section 8): images are float ``(..., 3, H, W)`` in
[0, 1], channels first; masks are ``(..., H, W)`` (bool or float in {0, 1}) and broadcast over the
channels. Every function reduces the last three image axes and keeps the leading batch axes.

mSSIM comes in two named variants (both from the same partial-convolution SSIM map):

* ``ssim_dycheck``: the map averaged over the *whole* image, as DyCheck reports it. Windows that
  contain no masked pixel have means and variances 0, so their SSIM is ``(c1 c2) / (c1 c2) = 1``
  and they inflate the score. Use it to compare with published numbers.
* ``ssim_strict``: the same map averaged only over window centres inside the mask (NaN when the
  mask is empty). Use it to compare runs with each other.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check(a: Tensor, b: Tensor, mask: Tensor | None) -> Tensor:
    """Shape checks; returns the mask as float ``(..., 1, H, W)`` (all ones when None)."""
    if a.shape != b.shape or a.dim() < 3 or a.shape[-3] not in (1, 3):
        raise ValueError(f"images must share a (..., C, H, W) shape with C in (1, 3), got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if mask is None:
        return torch.ones_like(a[..., :1, :, :])
    if mask.shape != a.shape[:-3] + a.shape[-2:]:
        want = tuple(a.shape[:-3] + a.shape[-2:])
        raise ValueError(f"mask must have shape {want} (images {tuple(a.shape)}), got {tuple(mask.shape)}")
    return mask.to(a.dtype).unsqueeze(-3)


def masked_mse(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    """``sum(m (a - b)^2) / sum(m)`` over channels and pixels, the mask broadcast over channels.

    NaN where the mask is empty (no pixel to compare)."""
    m = _check(a, b, mask).expand_as(a)
    num = (m * (a - b) ** 2).sum((-3, -2, -1))
    den = m.sum((-3, -2, -1))
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.full_like(num, math.nan))


def masked_psnr(a: Tensor, b: Tensor, mask: Tensor | None = None, max_val: float = 1.0) -> Tensor:
    """mPSNR ``-10 log10(sum(m (a - b)^2) / sum(m))`` for images in [0, max_val] (reference
    section 8). Identical images give +inf; an empty mask gives NaN. Shape: the batch axes."""
    mse = masked_mse(a, b, mask)
    return 10.0 * torch.log10(max_val**2 / mse)


def gaussian_filter_1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, dtype=torch.float64) -> Tensor:
    """The normalised 1-D Gaussian ``(size,)`` centred on the middle tap (DyCheck / Wang et al.)."""
    half = size // 2
    shift = (2 * half - size + 1) / 2  # centres even sizes between two taps
    x = (torch.arange(size, dtype=dtype) - half + shift) / sigma
    f = torch.exp(-0.5 * x**2)
    return f / f.sum()


def _partial_blur(z: Tensor, m: Tensor, taps: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    """One separable pass of DyCheck's masked blur along ``axis`` (-1: x, -2: y), "valid" padding.

    ``z``, ``m``: ``(N, C, H, W)``. Returns ``conv(z m) * sum(1) / conv_ones(m)`` where the window
    holds mask, else 0, and the new binary mask ``conv_ones(m) != 0``. The Gaussian taps sum to 1 and
    the mask is counted with a box of ones, so a full window reduces to the plain Gaussian blur."""
    size = taps.numel()
    n_out = z.shape[axis] - size + 1
    zm = z * m
    # "valid" correlation as a sum of shifted slices: exact in float64 and faster on CPU than a
    # grouped float64 conv2d (which has no optimised kernel)
    zs = sum(float(taps[k]) * zm.narrow(axis, k, n_out) for k in range(size))
    ms = sum(m.narrow(axis, k, n_out) for k in range(size))
    valid = ms != 0
    out = torch.where(valid, zs * size / ms.clamp_min(1e-12), torch.zeros_like(zs))
    return out, valid.to(z.dtype)


def ssim_map(a: Tensor, b: Tensor, mask: Tensor | None = None, max_val: float = 1.0,
             window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, k1: float = SSIM_K1,
             k2: float = SSIM_K2) -> Tensor:
    """DyCheck's partial-convolution SSIM map ``(..., C, H - window + 1, W - window + 1)``.

    Every local statistic (means, variances, covariance) is a masked separable Gaussian blur
    (:func:`_partial_blur`, x then y, as DyCheck); variances are clipped at 0 and the covariance to
    ``+-sqrt(var_a var_b)`` before the usual SSIM formula with ``c1 = (k1 max)^2``,
    ``c2 = (k2 max)^2``. Windows without any mask pixel give exactly 1."""
    m = _check(a, b, mask)
    H, W = a.shape[-2:]
    if H < window or W < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window} pixels, got {H}x{W}")
    lead = a.shape[:-3]
    C = a.shape[-3]
    x = a.reshape(-1, C, H, W).double()
    y = b.reshape(-1, C, H, W).double()
    mm = m.reshape(-1, 1, H, W).double().expand(-1, C, -1, -1)
    taps = gaussian_filter_1d(window, sigma)

    # the five local statistics share the mask: blur them in one grouped convolution per axis
    stats = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    z1, m1 = _partial_blur(stats, mm.repeat(1, 5, 1, 1), taps, axis=-1)  # DyCheck's order: x, then y
    mu_x, mu_y, e_xx, e_yy, e_xy = _partial_blur(z1, m1, taps, axis=-2)[0].split(C, dim=1)
    var_x = (e_xx - mu_x**2).clamp_min(0)
    var_y = (e_yy - mu_y**2).clamp_min(0)
    cov = e_xy - mu_x * mu_y
    cov = torch.sign(cov) * torch.minimum(torch.sqrt(var_x * var_y), cov.abs())
    c1, c2 = (k1 * max_val) ** 2, (k2 * max_val) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    out = (num / den).to(a.dtype)
    return out.reshape(*lead, C, *out.shape[-2:])


def masked_ssim(a: Tensor, b: Tensor, mask: Tensor | None = None, max_val: float = 1.0,
                window: int = SSIM_WINDOW) -> dict[str, Tensor]:
    """mSSIM in both named variants: ``{"ssim_dycheck": ..., "ssim_strict": ...}``, each of the
    batch shape. See the module docstring for which is which. The strict variant averages the map
    over the window centres (pixel ``window // 2`` inward of each border) that lie in the mask."""
    smap = ssim_map(a, b, mask, max_val=max_val, window=window)
    dycheck = smap.mean((-3, -2, -1))
    m = _check(a, b, mask)
    h = window // 2
    centres = m[..., h:m.shape[-2] - h, h:m.shape[-1] - h].expand_as(smap)
    den = centres.sum((-3, -2, -1))
    strict = torch.where(den > 0, (smap * centres).sum((-3, -2, -1)) / den.clamp_min(1e-12),
                         torch.full_like(dycheck, math.nan))
    return {"ssim_dycheck": dycheck, "ssim_strict": strict}
