"""Per-scene 4D optimisation of a :class:`~d4d.fourd.scene.PointScene4D` against the video frames.

Three phases (paper "Temporal-Aware Geometry Optimization"; the split, the flow-fitted motion and
the held-out-frame loss are our design):

0. motion from flow (``flow_steps``, :func:`motion_from_flow`): only the deformation field moves;
   a point seen in frame s at pixel u, carried by the field to the time of frame s +- 1, must land at
   ``u + flow(u)`` in that camera (DIS flow both ways, forward-backward checked), plus the field's
   smoothness over a quarter of a frame spacing. The photometric phases below hardly teach the field
   motion (each frame's points fade away from their own time), and without this phase moving objects
   were rendered no better than by a static warp. It runs first so that pose correction sees moving
   objects where each frame saw them. ``benchmarks/fourd_optimisation.py``: held-out PSNR 30.05 ->
   32.52 dB (200 steps), 33.61 dB (600); ``benchmarks/temporal_sr.py``: docs/fourd.md;
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
    flow_steps: int = 200  # motion phase: the deformation fitted to optical flow first (motion_from_flow)
    lr_flow: float = 3e-3  # times the scene scale
    flow_fb_px: float = 1.0  # forward-backward consistency threshold of the flow (pixels)


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


def consistent_flows(frames: Tensor, fb_px: float) -> tuple[Tensor, Tensor]:
    """DIS flow both ways between consecutive frames, stacked ``(2 (F-1), 2, H, W)`` (``[k]``: frame
    k -> k+1, ``[F - 1 + k]``: frame k+1 -> k), and where it passes the forward-backward check
    (``|a(u) + b(u + a(u))| < fb_px``; occlusions and failures do not)."""
    import torch.nn.functional as F

    from d4d.fourd.init import optical_flow

    fwd, bwd = optical_flow(frames), optical_flow(frames.flip(0)).flip(0)
    h, w = frames.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h, device=frames.device) + 0.5, torch.arange(w, device=frames.device) + 0.5,
                            indexing="ij")

    def check(a: Tensor, b: Tensor) -> Tensor:
        grid = torch.stack([(xs + a[:, 0]) / w * 2 - 1, (ys + a[:, 1]) / h * 2 - 1], -1)
        return (a + F.grid_sample(b, grid, align_corners=False)).norm(dim=1) < fb_px

    return torch.cat([fwd, bwd]), torch.cat([check(fwd, bwd), check(bwd, fwd)])


def _flow_loss(scene: PointScene4D, flows: Tensor, ok: Tensor, gen: torch.Generator, count: int = 4096,
               cap: float = 0.05) -> Tensor:
    """A point seen in frame s at pixel u, moved by the deformation to the time of frame n = s +- 1 and
    seen by camera n, should land at ``u + flow_{s->n}(u)`` (where the flow passed its check). Error
    in fractions of the width, capped at ``cap``; points and cameras are held."""
    from d4d.geometry.points import project_points

    f, h, w = scene.num_frames, scene.height, scene.width
    idx = torch.nonzero(scene.src_frame >= 0).squeeze(1)
    pick = idx[torch.randint(0, len(idx), (min(count, len(idx)),), generator=gen).to(idx.device)]
    src = scene.src_frame[pick]
    step = torch.where(torch.rand(len(pick), generator=gen).to(src.device) < 0.5, 1, -1)
    step = torch.where(src == 0, 1, torch.where(src == f - 1, -1, step))
    nb = src + step
    cams = scene.cameras_c2w.detach()
    x = scene.canonical_points().detach()[pick]
    uv0, _, seen = project_points(x, scene.K, cams[src], (h, w))
    px, py = uv0[:, 0].floor().long().clamp(0, w - 1), uv0[:, 1].floor().long().clamp(0, h - 1)
    which = torch.where(step > 0, src, f - 1 + nb)
    target = uv0 + flows[which, :, py, px]
    moved = x + scene.deform(x, nb.float() / (f - 1), scene.scene_scale) - scene.deform(x, src.float() / (f - 1), scene.scene_scale)
    uv, _, valid = project_points(moved, scene.K, cams[nb])
    keep = seen & valid & ok[which, py, px]
    if not bool(keep.any()):
        return moved.sum() * 0
    return ((uv - target).norm(dim=-1)[keep] / w).clamp(max=cap).mean()


def _field_samples(scene: PointScene4D, gen: torch.Generator, dt: float, hold: bool,
                   count: int = 4096) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random canonical points and a random time t in ``[0, 1 - dt]``: ``(index, x, D(x, t) / s,
    D(x, t + dt) / s)`` with ``s`` the scene scale; ``hold`` detaches the points (only the field
    gets gradients)."""
    pick = torch.randint(0, scene.xyz.shape[0], (min(count, scene.xyz.shape[0]),), generator=gen)
    x = scene.canonical_points()
    x = (x.detach() if hold else x)[pick]
    t = float(torch.rand((), generator=gen)) * (1 - dt)
    s = float(scene.scene_scale)
    return pick, x, scene.deform(x, t, scene.scene_scale) / s, scene.deform(x, t + dt, scene.scene_scale) / s


def motion_from_flow(scene: PointScene4D, frames: Tensor, cfg: OptimConfig, gen: torch.Generator,
                     progress: ProgressFn | None = None, offset: int = 0, total: int = 0) -> list[float]:
    """The motion phase: ``cfg.flow_steps`` steps of :func:`_flow_loss` on the deformation field
    alone, plus its smoothness over a quarter of a frame spacing (without it the field, fitted at the
    input times only, does anything in between: held-out PSNR fell from 30 to 23 dB in
    ``benchmarks/fourd_optimisation.py``)."""
    f = scene.num_frames
    if f < 2 or cfg.flow_steps <= 0:
        return []
    flows, ok = consistent_flows(frames.cpu(), cfg.flow_fb_px)
    flows, ok = flows.to(frames.device), ok.to(frames.device)
    dt = 1.0 / (f - 1)
    opt = torch.optim.Adam(scene.deform.parameters(), lr=cfg.lr_flow * float(scene.scene_scale))
    history = []
    for step in range(cfg.flow_steps):
        loss = _flow_loss(scene, flows, ok, gen)
        _, _, d0, d1 = _field_samples(scene, gen, dt / 4, hold=True)
        # 16 = (dt / (dt / 4))^2: the change over a quarter spacing, weighted like one over a whole spacing
        loss = loss + 16 * cfg.smooth_weight * (d1 - d0).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
        if progress and ((step + 1) % 50 == 0 or step + 1 == cfg.flow_steps):
            progress(offset + step + 1, total, "motion from flow")
    return history


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
    flow_steps = cfg.flow_steps if f > 1 else 0  # no motion between frames to fit in a one-frame scene
    total = cfg.pose_steps + flow_steps + cfg.steps
    others = list(range(1, f))
    holdout = cfg.holdout_weight if f > 1 else 0.0

    def pick(pool: list[int]) -> list[int]:
        k = min(cfg.frames_per_step, len(pool))
        return [pool[int(j)] for j in torch.randperm(len(pool), generator=gen)[:k]]

    if flow_steps > 0:  # before pose correction: moving objects then sit where the frame saw them
        history["flow"] = motion_from_flow(scene, frames, cfg, gen, progress, 0, total)
    if cfg.pose_steps > 0 and others:
        opt = torch.optim.Adam([scene.pose_delta], lr=cfg.lr_pose)
        for step in range(cfg.pose_steps):
            loss = _photo_loss(scene, frames, pick(others), holdout_weight=1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            history["pose"].append(float(loss.detach()))
            if progress:
                progress(flow_steps + step + 1, total, "pose correction")
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
            pick_pts, sub, d0, d1 = _field_samples(scene, gen, dt, hold=False)
            disp = d0 - scene.deform(sub, scene.src_time[pick_pts][:, None], scene.scene_scale) / s
            loss = loss + cfg.smooth_weight * (d1 - d0).pow(2).sum(-1).mean() + cfg.deform_weight * disp.pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        history["joint"].append(float(loss.detach()))
        if progress:
            progress(cfg.pose_steps + flow_steps + step + 1, total, "4D optimisation")
    return history
