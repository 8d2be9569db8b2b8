"""Temporal-structure initialisation (paper "Temporal Structure Initialization", eq. 2).

* :class:`DepthEstimator`: Depth Anything V2 through transformers (``DepthAnythingForDepthEstimation``,
  a local directory or hub id, or a random model from a config for tests). Relative models predict
  affine-invariant disparity: depth is taken as ``1 / max(disparity, 1e-3 * max)`` (the shift is
  ignored; the scales are fixed below). Metric models predict depth directly.
* :func:`optical_flow`: forward flow ``t -> t+1`` with OpenCV's DIS (default) or RAFT where torchvision
  imports (``raft_small``, weights from a local file; imported lazily).
* :func:`align_depth_scales`: one scale per frame so that depths agree with each other and with the
  known poses: flow correspondences ``u -> u'`` between consecutive frames give, for the frame-t point
  at scale ``s_t`` moved into camera t+1, a depth ``z`` there; ``s_{t+1}`` is chained as the median
  of ``z / D_{t+1}(u')`` (robust to sky and outliers). The scale of frame 0 (the common scale of
  depth vs. pose units) is the one, on a log grid, whose chained scales minimise the mean
  reprojection error to ``u'``. With a camera that does not translate the common scale is not
  observable: the scales are normalised to geometric mean 1 (``info["scale_observable"]`` says so).
* :func:`initialise`: the whole step; back-projects the aligned depth with the poses
  (:func:`d4d.geometry.points.depth_to_points`) into world (frame-0) point clouds.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from d4d.geometry.cameras import invert_se3, relative_poses
from d4d.geometry.points import depth_to_points, transform_points
from d4d.utils.checkpoints import read_checkpoint
from d4d.utils.errors import UserError
from d4d.utils.logging import get_logger

Tensor = torch.Tensor
log = get_logger(__name__)
FLOW_METHODS = ("dis", "raft")
SMALL_FRAME = 128  # DIS on frames whose short side is at most this: full resolution, 4 px patches


def tiny_depth_anything_config(hidden: int = 32, layers: int = 4, **overrides: Any):
    """A small random Depth Anything (DINOv2 backbone, patch 14) for tests and debug recipes."""
    from transformers import DepthAnythingConfig, Dinov2Config

    backbone = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                            intermediate_size=2 * hidden, patch_size=14, image_size=56,
                            out_features=[f"stage{i}" for i in range(1, 5)], reshape_hidden_states=False)
    fields = dict(backbone_config=backbone, neck_hidden_sizes=[hidden // 4, hidden // 2, hidden, hidden],
                  fusion_hidden_size=hidden // 2, head_hidden_size=8, reassemble_hidden_size=hidden)
    fields.update(overrides)
    return DepthAnythingConfig(**fields)


class DepthEstimator(torch.nn.Module):
    """Per-frame monocular depth. ``model``: Depth Anything V2 directory or hub id
    (e.g. ``depth-anything/Depth-Anything-V2-Small-hf``); ``None`` builds a random one from ``config``
    (fields of :func:`tiny_depth_anything_config`). ``input_size``: the short side fed to the network
    (rounded to a multiple of 14)."""

    def __init__(self, model: str | None = None, config: dict[str, Any] | None = None, input_size: int = 518):
        super().__init__()
        from transformers import DepthAnythingForDepthEstimation

        if model:
            try:
                self.net = DepthAnythingForDepthEstimation.from_pretrained(model)
            except OSError as exc:
                raise UserError(f"depth model {model!r} cannot be loaded: {str(exc).splitlines()[0]}") from None
        else:
            self.net = DepthAnythingForDepthEstimation(tiny_depth_anything_config(**(config or {})))
        self.net.eval().requires_grad_(False)
        self.metric = getattr(self.net.config, "depth_estimation_type", "relative") == "metric"
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, frames: Tensor) -> Tensor:
        """``frames (N, 3, H, W)`` in [0, 1] -> the network's ``pixel_values``: short side
        ``input_size``, both sides multiples of 14, ImageNet-normalised."""
        h, w = frames.shape[-2:]
        s = self.input_size / min(h, w)
        size = (max(14, round(h * s / 14) * 14), max(14, round(w * s / 14) * 14))
        x = F.interpolate(frames.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        return ((x - self.mean) / self.std).to(self.mean.dtype)

    @torch.no_grad()
    def forward(self, frames: Tensor) -> Tensor:
        """``frames (N, 3, H, W)`` in [0, 1] -> positive depth ``(N, H, W)`` (arbitrary scale if relative)."""
        h, w = frames.shape[-2:]
        pred = self.net(pixel_values=self.preprocess(frames)).predicted_depth[:, None]
        pred = F.interpolate(pred, size=(h, w), mode="bilinear", align_corners=False)[:, 0].float()
        if self.metric:
            return pred.clamp_min(1e-3)
        disp = pred.relu()
        floor = 1e-3 * disp.flatten(1).amax(1).clamp_min(1e-6)[:, None, None]
        return 1.0 / torch.maximum(disp, floor)


def optical_flow(frames: Tensor, method: str = "dis", raft_weights: str | None = None) -> Tensor:
    """Forward flow ``(F-1, 2, H, W)`` (pixels, ``[du, dv]``) between consecutive ``frames (F, 3, H, W)``."""
    if method not in FLOW_METHODS:
        raise UserError(f"flow method must be one of {FLOW_METHODS}, got {method!r}")
    if frames.shape[0] < 2:
        return frames.new_zeros(0, 2, *frames.shape[-2:])
    if method == "raft":
        return _raft_flow(frames, raft_weights)
    import cv2

    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    if min(frames.shape[-2:]) <= SMALL_FRAME:
        # the preset's finest pyramid level is half the resolution and its patches are 8 px: on small
        # frames the flow comes out too coarse, and a zoom's radial flow too short (zoom-out depth
        # scale 1.5x off at 48x64, 1.12x with these settings; docs/fourd.md)
        dis.setFinestScale(0)
        dis.setPatchSize(4)
        dis.setPatchStride(2)
    grey = (frames.float().mean(1).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    flows = [dis.calc(grey[i], grey[i + 1], None) for i in range(len(grey) - 1)]
    return torch.from_numpy(np.stack(flows)).permute(0, 3, 1, 2).float().to(frames.device)


def _raft_flow(frames: Tensor, weights: str | None) -> Tensor:
    try:
        from torchvision.models.optical_flow import raft_small
    except Exception as exc:  # noqa: BLE001 - torchvision absent or broken: say so
        raise UserError(f"flow method 'raft' needs torchvision ({type(exc).__name__}); use 'dis'") from None
    if not weights:
        raise UserError("flow method 'raft' needs raft_weights (a local raft_small state-dict file)")
    model = raft_small()
    model.load_state_dict(read_checkpoint(weights))
    model.eval().to(frames.device)
    h, w = frames.shape[-2:]
    size = (max(128, (h + 7) // 8 * 8), max(128, (w + 7) // 8 * 8))
    x = F.interpolate(frames.float() * 2 - 1, size=size, mode="bilinear", align_corners=False)
    with torch.no_grad():
        flow = model(x[:-1], x[1:])[-1]
    flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
    return flow * torch.tensor([w / size[1], h / size[0]], device=flow.device).view(1, 2, 1, 1)


def _sample(img: Tensor, uv: Tensor) -> Tensor:
    """Bilinear sample ``img (C, H, W)`` at continuous pixel coords ``uv (N, 2)`` -> ``(N, C)``."""
    h, w = img.shape[-2:]
    grid = torch.stack([uv[:, 0] / w * 2 - 1, uv[:, 1] / h * 2 - 1], -1).view(1, 1, -1, 2)
    return F.grid_sample(img[None].float(), grid.float(), align_corners=False)[0, :, 0].T


PRIOR_TRAVEL = 0.5  # prior: the camera travels half the median depth of frame 0 over the clip


def align_depth_scales(depth: Tensor, flow: Tensor, K: Tensor, c2w: Tensor, pixels: int = 2048,
                       seed: int = 0, prior_depth: float | None = None, search_range: float = 3.0,
                       min_gain: float = 0.15) -> tuple[Tensor, dict[str, Any]]:
    """Scale each frame's depth (module docstring). ``depth (F, H, W)``, ``flow (F-1, 2, H, W)``,
    ``K (F, 3, 3)``, ``c2w (F, 4, 4)`` -> ``(scaled depth, info)``.

    The common scale is searched on a log grid within ``exp(+-search_range)`` of a prior: frame 0's
    median depth equals ``prior_depth`` (pose units), by default the camera's largest distance from
    frame 0 divided by :data:`PRIOR_TRAVEL`. It is taken from the parallax only where that is
    observable: the best scale's mean reprojection error must beat the rotation-only limit (depth at
    infinity) by ``min_gain`` (a fraction) and not lie on the far end of the range. Otherwise (little
    parallax, e.g. a dolly down a corridor of repeating texture, or flow that failed) the prior is
    used and ``info["scale_source"] == "prior"`` says so (also logged). A camera that does not
    translate keeps the depth model's units (geometric-mean scale 1, ``scale_source == "depth model"``).
    ``info``: ``scales (F,)``, ``scale_observable``, ``scale_source`` (``parallax``/``prior``/
    ``depth model``), ``scale_at_bound`` (the near end of the range was hit), ``prior_depth``,
    ``cost``/``cost_rotation_only`` (mean reprojection error, fractions of the width), ``reprojection_px``.
    """
    f, h, w = depth.shape
    if f < 2:
        return depth, {"scales": torch.ones(1), "scale_observable": False, "scale_source": "depth model"}
    gen = torch.Generator().manual_seed(seed)
    w2c = invert_se3(c2w.double()).float()
    rel = [(w2c[t + 1] @ c2w[t].float()) for t in range(f - 1)]  # camera t -> camera t+1
    extent = float((c2w[:, :3, 3] - c2w[:1, :3, 3]).norm(dim=-1).max())
    moved = max(float(r[:3, 3].norm()) for r in rel) > 1e-6
    pairs = []
    for t in range(f - 1):
        idx = torch.randint(0, h * w, (pixels,), generator=gen)
        v, u = idx // w, idx % w
        uv = torch.stack([u, v], -1).float() + 0.5
        target = uv + flow[t][:, v, u].T
        inside = (target[:, 0] >= 0) & (target[:, 0] < w) & (target[:, 1] >= 0) & (target[:, 1] < h)
        d_t = depth[t][v, u]
        d_next = _sample(depth[t + 1][None], target)[:, 0]
        keep = inside & (d_t > 0) & (d_next > 0)
        ray = torch.linalg.solve(K[t].float(), torch.cat([uv, torch.ones_like(uv[:, :1])], -1).T).T
        pairs.append((ray[keep] * d_t[keep, None], target[keep], d_next[keep], rel[t], K[t + 1].float()))

    def chain(log_s0: float) -> tuple[Tensor, Tensor]:
        """Scales from frame 0's: ``log s_{t+1} = median(log z_{t->t+1} - log D_{t+1}(u'))``; and the
        reprojection errors (fractions of the width) of every correspondence at those scales."""
        log_s = [torch.tensor(float(log_s0))]
        reproj = []
        for pts, target, d_next, r, k in pairs:
            p = transform_points(r, pts * log_s[-1].exp())
            z = p[:, 2].clamp_min(1e-4)
            uv = torch.stack([k[0, 0] * p[:, 0] / z + k[0, 2], k[1, 1] * p[:, 1] / z + k[1, 2]], -1)
            reproj.append(((uv - target).norm(dim=-1) / w).clamp(max=1.0))
            front = p[:, 2] > 1e-4
            step = (z[front].log() - d_next[front].log()).median() if front.any() else log_s[-1]
            log_s.append(step)
        return torch.stack(log_s), torch.cat(reproj)

    d0 = float(depth[0][depth[0] > 0].median()) if bool((depth[0] > 0).any()) else 1.0
    info: dict[str, Any] = {"scale_observable": False, "scale_at_bound": False}
    if moved:
        prior = float(prior_depth) if prior_depth else extent / PRIOR_TRAVEL
        log_prior = math.log(prior / max(d0, 1e-12))
        grid = torch.linspace(log_prior - search_range, log_prior + search_range, 49)
        costs = torch.stack([chain(float(g))[1].mean() for g in grid])
        best = int(costs.argmin())
        c_inf = float(chain(log_prior + 12.0)[1].mean())  # depth ~e^12 x the prior: rotation only
        observable = float(costs[best]) < (1 - min_gain) * c_inf and best < len(grid) - 1
        info.update(prior_depth=prior, cost=float(costs[best]), cost_rotation_only=c_inf)
        if observable:
            step = float(grid[1] - grid[0])
            fine = torch.linspace(float(grid[best]) - step, float(grid[best]) + step, 11)
            start = float(fine[int(torch.stack([chain(float(g))[1].mean() for g in fine]).argmin())])
            info.update(scale_observable=True, scale_source="parallax", scale_at_bound=best == 0)
            if best == 0:
                log.info("depth scale: the parallax asks for depths below exp(-%.1f) x the prior "
                         "(%.3g); kept at the bound", search_range, prior)
        else:
            start = log_prior
            info["scale_source"] = "prior"
            log.info("depth scale not observable from the parallax (reprojection error %.4f vs %.4f "
                     "rotation-only): frame 0's median depth set to the prior %.3g", float(costs[best]), c_inf, prior)
    else:
        start = 0.0
        info["scale_source"] = "depth model"
    log_s, reproj = chain(start)
    if not moved:  # the common scale is not observable: keep the mean scale at 1
        log_s = log_s - log_s.mean()
    scales = log_s.exp()
    info.update(scales=scales, reprojection_px=float(reproj.median() * w))
    return depth * scales[:, None, None], info


@dataclasses.dataclass
class InitResult:
    """Output of :func:`initialise`: ``depth (F, H, W)`` aligned z-depth, ``flow (F-1, 2, H, W)``,
    ``points (F, H, W, 3)`` world (frame-0 camera) points, ``c2w (F, 4, 4)`` relative to frame 0,
    ``K (F, 3, 3)``, ``info`` (scales, residuals)."""

    depth: Tensor
    flow: Tensor
    points: Tensor
    c2w: Tensor
    K: Tensor
    info: dict[str, Any]


def initialise(frames: Tensor, c2w: Tensor, K: Tensor, depth_model: DepthEstimator,
               flow_method: str = "dis", raft_weights: str | None = None) -> InitResult:
    """Depth + flow + scale alignment + back-projection for one clip.

    Args: ``frames (F, 3, H, W)`` in [0, 1]; ``c2w (F, 4, 4)`` OpenCV camera-to-world (made relative to
    frame 0 here); ``K (3, 3)`` or ``(F, 3, 3)`` pixel intrinsics at (H, W).
    """
    f, _, h, w = frames.shape
    Ks = (K if K.ndim == 3 else K[None].expand(f, 3, 3)).float()
    rel = relative_poses(c2w.double(), 0).float()
    raw = depth_model(frames.to(next(depth_model.parameters()).device)).cpu()
    flow = optical_flow(frames.cpu(), flow_method, raft_weights)
    depth, info = align_depth_scales(raw, flow, Ks, rel)
    points, _ = depth_to_points(depth, Ks, rel)
    return InitResult(depth=depth, flow=flow, points=points, c2w=rel, K=Ks, info=info)

