"""Per-scene 4D optimisation of a :class:`~d4d.fourd.scene.PointScene4D` against the video frames.

Two phases (paper "Temporal-Aware Geometry Optimization"; the split and the held-out-frame loss are
our design):

1. pose correction: only the per-frame pose corrections move, and each frame's points move with its
   camera (:class:`~d4d.fourd.scene.PointScene4D`); loss = coverage-weighted L1 between input frame i
   and the scene rendered from its corrected camera at its time *from the other frames' points* (its
   own points would match it whatever the pose), i.e. a photometric bundle adjustment of the point
   maps with frame 0 fixed; starts from the requested path (corrections 0). On static synthetic
   scenes with a path off by 1.5 deg + 5%, 60 steps bring the cameras to 0.65-0.83 deg / 1.9-2.5%
   (48x64, 1 px = 1.03 deg; the floor with exact cameras and 5% depth noise is ~0.7 deg, and
   halves at 96x128): ``benchmarks/fourd_pose_correction.py``;
2. joint: positions, colours, radii, opacities, temporal widths, deformation field and (at a tenth of
   the learning rate) poses; loss = ``(1 - holdout_weight) * L1(render with all points)
   + holdout_weight * L1(render without frame i's points)`` (the second term trains what the scene is
   for: frames at times and cameras it has not seen) ``+ smooth_weight * mean |D(x, t + dt) - D(x, t)|^2
   / scene_scale^2`` (temporal smoothness of the deformation) ``+ deform_weight * mean |x(t) - x|^2
   / scene_scale^2``.

Renders are weighted by coverage ``alpha`` (holes do not pull colours toward black). Learning rates of
positions and radii are relative (times the scene scale / per log-radius).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from d4d.fourd.scene import PointScene4D

Tensor = torch.Tensor
ProgressFn = Callable[[int, int, str], None]


@dataclasses.dataclass
class OptimConfig:
    """Steps and weights of :func:`optimise_scene` (defaults suit 48-256 px clips on CPU)."""

    pose_steps: int = 60
    steps: int = 300
    lr_points: float = 3e-4  # times the scene scale
    lr_color: float = 0.02
    lr_radius: float = 0.01
    lr_opacity: float = 0.05
    lr_temporal: float = 0.02
    lr_deform: float = 3e-4
    lr_pose: float = 2e-3
    holdout_weight: float = 0.0  # 0.5 and 1.0 measured worse at held-out times (docs/fourd.md)
    smooth_weight: float = 1.0
    deform_weight: float = 0.01
    frames_per_step: int = 4
    seed: int = 0


def psnr(a: Tensor, b: Tensor, mask: Tensor | None = None) -> float:
    """PSNR in dB of images in [0, 1] (``(3, H, W)``), over ``mask (H, W)`` pixels if given."""
    err = (a - b).pow(2)
    mse = err.mean() if mask is None else err[:, mask].mean()
    return float(10 * torch.log10(1.0 / mse.clamp_min(1e-10)))


def _l1(rgb: Tensor, alpha: Tensor, frame: Tensor) -> Tensor:
    return ((rgb - frame).abs().mean(0) * alpha).sum() / alpha.sum().clamp_min(1.0)


def _photo_loss(scene: PointScene4D, frames: Tensor, idx: list[int], holdout_weight: float = 0.0) -> Tensor:
    """Mean over ``idx`` of ``(1 - holdout_weight) * L1(all points) + holdout_weight * L1(others' points)``."""
    total = 0.0
    for i in idx:
        if holdout_weight < 1:
            rgb, _, alpha = scene.render_frame(i)
            total = total + (1 - holdout_weight) * _l1(rgb, alpha, frames[i])
        if holdout_weight > 0:
            rgb, _, alpha = scene.render_frame(i, exclude_own=True)
            total = total + holdout_weight * _l1(rgb, alpha, frames[i])
    return total / len(idx)


def optimise_scene(scene: PointScene4D, frames: Tensor, config: OptimConfig | None = None,
                   progress: ProgressFn | None = None) -> dict[str, list[float]]:
    """Optimise ``scene`` in place against ``frames (F, 3, H, W)`` in [0, 1] (frame i at time i/(F-1)).

    Returns the loss history per phase (``{"pose": [...], "joint": [...]}``).
    """
    cfg = config or OptimConfig()
    frames = frames.to(scene.xyz.device, torch.float32)
    f = scene.num_frames
    if frames.shape[0] != f or tuple(frames.shape[-2:]) != (scene.height, scene.width):
        raise ValueError(f"frames {tuple(frames.shape)} do not match the scene ({f} frames of {scene.height}x{scene.width})")
    gen = torch.Generator().manual_seed(cfg.seed)
    history: dict[str, list[float]] = {"pose": [], "joint": []}
    total = cfg.pose_steps + cfg.steps
    others = list(range(1, f))
    holdout = cfg.holdout_weight if f > 1 else 0.0

    def pick(pool: list[int]) -> list[int]:
        k = min(cfg.frames_per_step, len(pool))
        return [pool[int(j)] for j in torch.randperm(len(pool), generator=gen)[:k]]

    if cfg.pose_steps > 0 and others:
        opt = torch.optim.Adam([scene.pose_delta], lr=cfg.lr_pose)
        for step in range(cfg.pose_steps):
            loss = _photo_loss(scene, frames, pick(others), holdout_weight=1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            history["pose"].append(float(loss.detach()))
            if progress:
                progress(step + 1, total, "pose correction")
    s = float(scene.scene_scale)
    opt = torch.optim.Adam([
        {"params": [scene.xyz], "lr": cfg.lr_points * s},
        {"params": [scene.color_logit], "lr": cfg.lr_color},
        {"params": [scene.log_radius], "lr": cfg.lr_radius},
        {"params": [scene.opacity_logit], "lr": cfg.lr_opacity},
        {"params": [scene.log_tscale], "lr": cfg.lr_temporal},
        {"params": scene.deform.parameters(), "lr": cfg.lr_deform},
        {"params": [scene.pose_delta], "lr": cfg.lr_pose * 0.1},
    ])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / max(1, cfg.steps))))
    all_frames = list(range(f))
    dt = 1.0 / max(1, f - 1)
    for step in range(cfg.steps):
        loss = _photo_loss(scene, frames, pick(all_frames), holdout)
        if f > 1 and (cfg.smooth_weight > 0 or cfg.deform_weight > 0):
            pick_pts = torch.randint(0, scene.xyz.shape[0], (min(4096, scene.xyz.shape[0]),), generator=gen)
            sub, src = scene.canonical_points()[pick_pts], scene.src_time[pick_pts][:, None]
            t = float(torch.rand((), generator=gen)) * (1 - dt)
            d0 = scene.deform(sub, t, scene.scene_scale) / s
            d1 = scene.deform(sub, t + dt, scene.scene_scale) / s
            disp = d0 - scene.deform(sub, src, scene.scene_scale) / s
            loss = loss + cfg.smooth_weight * (d1 - d0).pow(2).sum(-1).mean() + cfg.deform_weight * disp.pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        history["joint"].append(float(loss.detach()))
        if progress:
            progress(cfg.pose_steps + step + 1, total, "4D optimisation")
    return history
