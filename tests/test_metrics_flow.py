"""Covisibility (DyCheck's rule) and temporal flicker on textures with known motion."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from d4d.metrics.flow import FlowEstimator, covisibility_mask, occlusion_brox, temporal_flicker


def _texture(h: int = 96, w: int = 160, seed: int = 0) -> torch.Tensor:
    """A smooth random texture ``(3, h, w)`` in [0, 1] (sums of sinusoids: DIS tracks it well)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((3, h, w), np.float32)
    for _ in range(12):
        fx, fy = rng.uniform(0.03, 0.25, 2)
        ph = rng.uniform(0, 2 * np.pi)
        img += rng.uniform(0.2, 1.0, (3, 1, 1)) * np.sin(fx * x + fy * y + ph)
    img = (img - img.min()) / (img.max() - img.min())
    return torch.from_numpy(img)


def _window(tex: torch.Tensor, dx: int, size: int = 64) -> torch.Tensor:
    return tex[:, 16:16 + size, 40 + dx:40 + dx + size]


def test_brox_rule_by_hand():
    fw = np.zeros((4, 4, 2), np.float32)
    fw[..., 0] = 2.0
    occ = occlusion_brox(fw, -fw)  # consistent (x + 2 - 2) where x + 2 stays inside the 4 columns
    assert not occ[:, :2].any() and occ[:, 2:].all()
    assert occlusion_brox(fw, np.zeros_like(fw)).all()  # |2|^2 = 4 > 0.01 * 4 + 0.5
    small = np.full((4, 4, 2), 0.3, np.float32)  # |f|^2 = 0.18 < 0.5: too small to call occluded
    assert not occlusion_brox(small, np.zeros_like(small)).any()


def test_dycheck_view_count_threshold():
    img = _window(_texture(), 0)
    flow = FlowEstimator()
    # identical support views: every pixel is visible in all S of them
    assert not covisibility_mask(img, [img] * 5, flow).any()  # 5 is not more than max(5, 0)
    assert covisibility_mask(img, [img] * 6, flow).all()  # 6 > 5


def test_shifted_view_hides_the_strip_that_left_the_frame():
    tex = _texture()
    test_img, support = _window(tex, 0), _window(tex, 8)  # the support sees 8 px further right
    mask = covisibility_mask(test_img, [support], min_views=0, min_ratio=0.0)
    assert mask.shape == (64, 64)
    # pixels x < 8 of the test view are outside the support view; x >= 8 are inside it
    assert mask[:, 12:-4].float().mean() > 0.9
    assert mask[:, :6].float().mean() < 0.2


def test_flicker_of_steady_and_flickering_videos():
    tex = _texture(seed=1)
    steady = torch.stack([_window(tex, 2 * t) for t in range(5)])
    assert temporal_flicker(steady) < 1e-3  # DIS + bilinear resampling error only
    offsets = torch.tensor([0.0, 0.1, 0.0, 0.1, 0.0]).view(5, 1, 1, 1)
    flicker = (steady * 0.8 + offsets).clamp(0, 1)
    value = temporal_flicker(flicker)
    assert value == pytest.approx(0.01, rel=0.3)  # brightness jumps of 0.1 -> squared error 0.01
    same = torch.stack([_window(tex, 0)] * 3)
    assert temporal_flicker(same) == pytest.approx(0.0, abs=1e-8)


def test_dycheck_ratio_threshold():
    img = _window(_texture(), 0)
    other = _window(_texture(seed=5), 0)  # unrelated content: no consistent flow
    flow = FlowEstimator()
    # 70 views: need more than max(5, int(7.0)) = 7 visible; 8 identical views pass, 7 do not
    assert covisibility_mask(img, [img] * 8 + [other] * 62, flow).float().mean() > 0.95
    assert covisibility_mask(img, [img] * 7 + [other] * 63, flow).float().mean() < 0.3
