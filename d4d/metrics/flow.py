"""Optical flow (OpenCV DIS), DyCheck's covisibility masks and the temporal flicker of a video.

Conventions: frames are float ``(T, 3, H, W)`` in [0, 1] (or uint8 ``(H, W, 3)`` for single
images); a flow ``(H, W, 2)`` float32 holds ``(dx, dy)`` in pixels from the first image to the
second, so pixel ``(x, y)`` of image 0 sits at ``(x + dx, y + dy)`` in image 1.

Covisibility follows DyCheck (``tools/process_covisible.py``; reference section 8): for a test
view and each support (training) view, forward and backward flows are checked for consistency
with Brox et al.'s rule ``|f + b(x + f)|^2 > 0.01 (|f|^2 + |b(x + f)|^2) + 0.5`` (occluded; samples
outside the support image read a zero flow, so they are occluded unless the flow is tiny); a test
pixel is covisible when it is visible in more than ``max(min_views, int(min_ratio * S))`` of the
``S`` support views. DyCheck uses RAFT; we use ``cv2.DISOpticalFlow`` (no weights to download).
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import Tensor

DYCHECK_MIN_VIEWS = 5
DYCHECK_MIN_RATIO = 0.1


def _gray_u8(img: Tensor | np.ndarray) -> np.ndarray:
    """``(3, H, W)`` float [0, 1] tensor or ``(H, W, 3)`` uint8 array -> ``(H, W)`` uint8 grey."""
    if isinstance(img, Tensor):
        img = (img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    img = np.ascontiguousarray(img)
    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) if img.ndim == 3 else img


class FlowEstimator:
    """``cv2.DISOpticalFlow`` with a fixed preset (``ultrafast``, ``fast`` or ``medium``)."""

    PRESETS = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
               "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}

    def __init__(self, preset: str = "medium") -> None:
        if preset not in self.PRESETS:
            raise ValueError(f"DIS preset must be one of {', '.join(self.PRESETS)}, got {preset!r}")
        self.dis = cv2.DISOpticalFlow_create(self.PRESETS[preset])

    def __call__(self, img0, img1) -> np.ndarray:
        """Flow ``(H, W, 2)`` float32 from ``img0`` to ``img1``."""
        return self.dis.calc(_gray_u8(img0), _gray_u8(img1), None)


def flow_to_warp(flow: np.ndarray) -> np.ndarray:
    """End points ``(H, W, 2)``: pixel centre coordinates ``(x, y)`` plus the flow."""
    H, W = flow.shape[:2]
    x, y = np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32), indexing="xy")
    return np.stack([x, y], -1) + flow


def occlusion_brox(flow_fw: np.ndarray, flow_bw: np.ndarray) -> np.ndarray:
    """Bool ``(H, W)``: True where the forward-backward check fails (occluded / inconsistent)."""
    warp = flow_to_warp(flow_fw)
    bw = cv2.remap(flow_bw, warp[..., 0], warp[..., 1], cv2.INTER_LINEAR,
                   borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    diff = ((flow_fw + bw) ** 2).sum(-1)
    total = (flow_fw**2 + bw**2).sum(-1)
    return diff > 0.01 * total + 0.5


def visible_in(test_img, support_img, flow: FlowEstimator) -> np.ndarray:
    """Bool ``(H, W)``: pixels of ``test_img`` that pass the consistency check against ``support_img``."""
    fw = flow(test_img, support_img)
    bw = flow(support_img, test_img)
    return ~occlusion_brox(fw, bw)


def covisibility_mask(test_img, support_imgs, flow: FlowEstimator | None = None,
                      min_views: int = DYCHECK_MIN_VIEWS, min_ratio: float = DYCHECK_MIN_RATIO) -> Tensor:
    """Bool ``(H, W)`` DyCheck covisibility of one test view against ``S`` support views.

    A pixel counts when visible in more than ``max(min_views, int(min_ratio * S))`` support views
    (DyCheck's defaults 5 and 10%). With a single conditioning image pass ``min_views=0,
    min_ratio=0``: "visible in the support view"."""
    flow = flow or FlowEstimator()
    supports = list(support_imgs)
    if not supports:
        raise ValueError("covisibility needs at least one support view")
    count = sum(visible_in(test_img, s, flow).astype(np.int32) for s in supports)
    need = max(min_views, int(min_ratio * len(supports)))
    return torch.from_numpy(count > need)


def warp_backward(img: Tensor, flow: np.ndarray) -> Tensor:
    """Sample ``img`` ``(3, H, W)`` at ``x + flow(x)`` (bilinear, zeros outside): ``img`` seen
    from the flow's source frame."""
    warp = flow_to_warp(flow)
    arr = img.detach().float().permute(1, 2, 0).cpu().numpy()
    out = cv2.remap(arr, warp[..., 0], warp[..., 1], cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1).to(img)


def temporal_flicker(frames: Tensor, flow: FlowEstimator | None = None) -> float:
    """Warping error of a video (Lai et al., ECCV 2018): the mean over consecutive pairs of
    ``sum(M (V_t - warp(V_{t+1}))^2) / sum(M)``, with ``M`` the pixels of frame t whose flow to
    t+1 passes the forward-backward check. ``frames``: ``(T, 3, H, W)`` in [0, 1], T >= 2. Lower is
    steadier; a static video gives 0. NaN when no pair has a consistent pixel."""
    if frames.shape[0] < 2:
        raise ValueError("temporal flicker needs at least 2 frames")
    flow = flow or FlowEstimator()
    errs = []
    for t in range(frames.shape[0] - 1):
        fw = flow(frames[t], frames[t + 1])
        bw = flow(frames[t + 1], frames[t])
        m = torch.from_numpy(~occlusion_brox(fw, bw)).float()
        if m.sum() == 0:
            continue
        warped = warp_backward(frames[t + 1], fw)
        errs.append(float(((frames[t].float() - warped.float()) ** 2 * m).sum() / (3 * m.sum())))
    return float(np.mean(errs)) if errs else float("nan")
