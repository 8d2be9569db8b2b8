"""mPSNR / mSSIM against hand computations (reference section 8)."""
from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from d4d.metrics.image import SSIM_K1, SSIM_K2, masked_psnr, masked_ssim, ssim_map

C1, C2 = SSIM_K1**2, SSIM_K2**2


def _img(seed: int, n: int = 2, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g, dtype=torch.float64)


def test_psnr_identical_is_inf_and_constant_offset_is_exact():
    a = _img(0)
    assert torch.isinf(masked_psnr(a, a)).all()
    b = (a * 0.5 + 0.1).clamp(0, 1)
    c = b + 0.1  # MSE exactly 0.01 -> 20 dB
    assert torch.allclose(masked_psnr(b, c), torch.full((2,), 20.0, dtype=torch.float64), atol=1e-9)


def test_psnr_known_noise_level():
    g = torch.Generator().manual_seed(1)
    a = torch.full((1, 3, 128, 128), 0.5, dtype=torch.float64)
    sigma = 0.05
    b = a + sigma * torch.randn(a.shape, generator=g, dtype=torch.float64)
    assert masked_psnr(a, b).item() == pytest.approx(-10 * math.log10(sigma**2), abs=0.1)


def test_psnr_mask_semantics():
    a = torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    b = a.clone()
    b[..., :, 4:] = 1.0  # right half wrong by 1
    b[..., 0, 0] = 0.2  # one pixel on the left wrong by 0.2
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[:, :, :4] = True
    # only the left half counts: 3 channels * 0.04 over 3 * 32 values
    expect = -10 * math.log10(0.04 / 32)
    assert masked_psnr(a, b, mask).item() == pytest.approx(expect, abs=1e-9)
    assert math.isnan(masked_psnr(a, b, torch.zeros_like(mask)).item())
    # a mask of all ones is the plain PSNR
    full = -10 * math.log10(((a - b) ** 2).mean().item())
    assert masked_psnr(a, b, torch.ones_like(mask)).item() == pytest.approx(full)


def test_ssim_identical_is_one():
    a = _img(2)
    out = masked_ssim(a, a)
    assert torch.allclose(out["ssim_dycheck"], torch.ones(2, dtype=torch.float64))
    assert torch.allclose(out["ssim_strict"], torch.ones(2, dtype=torch.float64))


def test_ssim_full_mask_matches_torchmetrics_gaussian_ssim():
    a, b = _img(3), _img(4)
    b = 0.7 * a + 0.3 * b
    ours = masked_ssim(a, b)["ssim_dycheck"]
    # torchmetrics' full map on reflect-padded images; its windows that do not reach the padding
    # (5 pixels in from each border) are DyCheck's "valid" windows
    _, full = structural_similarity_index_measure(a, b, gaussian_kernel=True, sigma=1.5, kernel_size=11,
                                                  data_range=1.0, return_full_image=True)
    ref = full[..., 5:-5, 5:-5].mean((1, 2, 3))
    assert torch.allclose(ours, ref.to(ours), atol=1e-6), (ours, ref)
    assert ours.max() < 0.99  # the images differ


def test_ssim_constant_images_hand_value():
    c, d = 0.3, 0.6
    a = torch.full((1, 3, 24, 24), c, dtype=torch.float64)
    b = torch.full((1, 3, 24, 24), d, dtype=torch.float64)
    expect = (2 * c * d + C1) / (c * c + d * d + C1)  # variances 0: the contrast term is c2 / c2
    out = masked_ssim(a, b)
    assert out["ssim_dycheck"].item() == pytest.approx(expect, abs=1e-9)


def _dycheck_constant_window(c: float, d: float, n: int) -> float:
    """SSIM of two constant images for a window whose first ``n`` of 11 columns hold mask, by hand:
    DyCheck's partial blur is ``sum(gauss taps over masked pixels) * 11 / n`` times the constant."""
    taps = [math.exp(-0.5 * ((k - 5) / 1.5) ** 2) for k in range(11)]
    taps = [t / sum(taps) for t in taps]
    s = sum(taps[:n]) * 11 / n
    mu_a, mu_b = c * s, d * s
    var_a, var_b = max(0.0, c * c * s - mu_a**2), max(0.0, d * d * s - mu_b**2)
    cov = c * d * s - mu_a * mu_b
    cov = math.copysign(min(math.sqrt(var_a * var_b), abs(cov)), cov)
    return (2 * mu_a * mu_b + C1) * (2 * cov + C2) / ((mu_a**2 + mu_b**2 + C1) * (var_a + var_b + C2))


def test_ssim_empty_windows_count_as_one_in_dycheck_value_only():
    c, d = 0.3, 0.6
    a = torch.full((1, 3, 32, 32), c, dtype=torch.float64)
    b = torch.full((1, 3, 32, 32), d, dtype=torch.float64)
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[:, :, :16] = True  # columns 0..15
    # window starting at column j covers j..j+10 and holds 16 - j masked columns (none from j = 16)
    per_window = [_dycheck_constant_window(c, d, min(11, 16 - j)) if j < 16 else 1.0 for j in range(22)]
    assert per_window[0] == pytest.approx((2 * c * d + C1) / (c * c + d * d + C1))
    smap = ssim_map(a, b, mask)
    assert smap.shape == (1, 3, 22, 22)
    expect_map = torch.tensor(per_window, dtype=torch.float64).expand(1, 3, 22, 22)
    assert torch.allclose(smap, expect_map, atol=1e-9)
    assert torch.equal(smap[..., 16:], torch.ones_like(smap[..., 16:]))
    out = masked_ssim(a, b, mask)
    assert out["ssim_dycheck"].item() == pytest.approx(sum(per_window) / 22, abs=1e-9)
    # strict: window centres are image columns 5..26; those in the mask are 5..15 (windows j = 0..10)
    assert out["ssim_strict"].item() == pytest.approx(sum(per_window[:11]) / 11, abs=1e-9)
    assert out["ssim_strict"].item() < out["ssim_dycheck"].item()  # empty windows inflate DyCheck's value
    empty = masked_ssim(a, b, torch.zeros_like(mask))
    assert empty["ssim_dycheck"].item() == pytest.approx(1.0)
    assert math.isnan(empty["ssim_strict"].item())


def test_ssim_ignores_content_outside_mask():
    a, b = _img(5, n=1), _img(6, n=1)
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[:, 8:24, 8:24] = True
    b2 = b.clone()
    b2[..., ~mask[0]] = 0.0  # change only unmasked pixels
    o1, o2 = masked_ssim(a, b, mask), masked_ssim(a, b2, mask)
    assert o1["ssim_strict"].item() == pytest.approx(o2["ssim_strict"].item(), abs=1e-12)
    assert o1["ssim_dycheck"].item() == pytest.approx(o2["ssim_dycheck"].item(), abs=1e-12)
    # inside the mask it does matter
    b3 = b.clone()
    b3[..., mask[0]] = a[..., mask[0]]
    assert masked_ssim(a, b3, mask)["ssim_strict"].item() > o1["ssim_strict"].item() + 0.1


def test_shape_errors():
    a = _img(0)
    with pytest.raises(ValueError, match="mask must have shape"):
        masked_psnr(a, a, torch.ones(2, 31, 32))
    with pytest.raises(ValueError, match="at least 11x11"):
        masked_ssim(a[..., :8, :8], a[..., :8, :8])
