"""Sampling of the static module: long camera paths in chunks anchored on generated views (SEVA).

A path of ``F`` frames (frame 0 the input image) is generated with a model trained on windows of
``W`` views in two passes (reference.md section 5):

1. **Anchors**: every ``(W - 1)``-th frame (and the last) is generated first, ``W - 1`` at a time
   conditioned on the input; later anchor chunks are also conditioned on the last anchor already
   generated.
2. **In-between frames**: the frames between two consecutive anchors are generated in one window,
   conditioned on those two anchors (and the input when it is one of them).

Guidance is per target view: ``cfg`` far from the given cameras, ramping down to ``cfg_min`` for
targets whose camera is near a given one (SEVA's lower scale for views close to an input).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from d4d.utils.errors import UserError

Tensor = torch.Tensor
CFG_RANGE = (1.0, 7.0)  # Dream4D Table 3: usable scales


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One sampling window: clean views ``given`` condition the generation of ``targets``."""

    given: tuple[int, ...]
    targets: tuple[int, ...]
    stage: str  # "anchor" | "between"


def plan_chunks(num_frames: int, window: int) -> list[Chunk]:
    """The two-pass chunk plan of a path of ``num_frames`` frames (frame 0 given) for windows of
    ``window`` views. Every frame > 0 is a target of exactly one chunk; no chunk exceeds ``window``."""
    if window < 3:
        raise UserError(f"sampling window must hold at least 3 views, got {window}")
    if num_frames < 2:
        raise UserError(f"a camera path needs at least 2 frames, got {num_frames}")
    if num_frames <= window:
        return [Chunk((0,), tuple(range(1, num_frames)), "anchor")]
    spacing = window - 1  # two anchors + (window - 2) frames between them
    anchors = list(range(spacing, num_frames, spacing))
    if anchors[-1] != num_frames - 1:
        anchors.append(num_frames - 1)
    chunks = []
    first = anchors[: window - 1]
    chunks.append(Chunk((0,), tuple(first), "anchor"))
    rest = anchors[window - 1:]
    while rest:
        last = chunks[-1].targets[-1]
        chunks.append(Chunk((0, last), tuple(rest[: window - 2]), "anchor"))
        rest = rest[window - 2:]
    bounds = [0] + anchors
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b - a > 1:
            chunks.append(Chunk((a, b), tuple(range(a + 1, b)), "between"))
    return chunks


def check_guidance(guidance: dict[str, float] | None, default_cfg: float, default_cfg_min: float) -> tuple[float, float]:
    """Validate the request's ``{"cfg": .., "cfg_min": ..}`` (both in [1, 7], cfg_min <= cfg)."""
    guidance = dict(guidance or {})
    unknown = sorted(set(guidance) - {"cfg", "cfg_min"})
    if unknown:
        raise UserError(f"guidance: unknown scale name(s) {unknown} for the static module (use cfg, cfg_min)")
    cfg = float(guidance.get("cfg", default_cfg))
    cfg_min = float(guidance.get("cfg_min", min(default_cfg_min, cfg)))
    for name, value in (("cfg", cfg), ("cfg_min", cfg_min)):
        if not CFG_RANGE[0] <= value <= CFG_RANGE[1]:
            raise UserError(f"guidance.{name}={value:g} is outside the usable range "
                            f"[{CFG_RANGE[0]:g}, {CFG_RANGE[1]:g}] of the static module")
    if cfg_min > cfg:
        raise UserError(f"guidance.cfg_min={cfg_min:g} is larger than guidance.cfg={cfg:g}")
    return cfg, cfg_min


def view_guidance_scales(c2w: Tensor, given: Tensor, cfg: float, cfg_min: float, near: float = 0.5) -> Tensor:
    """Per-view CFG scales.

    Args:
        c2w: ``(V, 4, 4)`` normalised poses (``camera_scale`` units); given: ``(V,)`` bool.
        near: camera distance (centre distance + rotation angle in radians) at which the scale
            reaches ``cfg``; closer targets interpolate linearly towards ``cfg_min``.

    Returns:
        ``(V,)``; given views get ``cfg_min`` (their prediction is discarded anyway).
    """
    centres, rot = c2w[:, :3, 3], c2w[:, :3, :3]
    g = given.bool()
    dc = torch.cdist(centres, centres[g])  # (V, G)
    rel = rot.transpose(-1, -2)[:, None] @ rot[g][None]  # (V, G, 3, 3)
    cos = ((rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    dist = (dc + torch.arccos(cos)).min(-1).values
    ramp = (dist / near).clamp(0, 1)
    return torch.where(g, torch.full_like(ramp, cfg_min), cfg_min + (cfg - cfg_min) * ramp)


DenoiseFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@torch.no_grad()
def sample_window(denoise: DenoiseFn, scheduler, clean: Tensor, given: Tensor, scales: Tensor,
                  num_steps: int, generator: torch.Generator,
                  on_step: Callable[[], None] | None = None) -> Tensor:
    """Euler sampling of one window.

    Args:
        denoise: ``(x_in (1, V, C, h, w), t (scalar tensor), cond: bool)`` -> model output; ``cond``
            False means the unconditional branch (CLIP token dropped).
        scheduler: a diffusers scheduler (``EulerDiscreteScheduler``); ``set_timesteps`` is called here.
        clean: ``(1, V, C, h, w)`` latents, valid at given views.
        given: ``(V,)`` bool; scales: ``(V,)`` CFG scale per view (1 = no guidance).
        on_step: called after every Euler step (progress reporting).

    Returns:
        ``(1, V, C, h, w)`` latents: the given views unchanged, the targets sampled.
    """
    scheduler.set_timesteps(num_steps, device=clean.device)
    x = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
    x = x * scheduler.init_noise_sigma
    g = given.bool()[None, :, None, None, None]
    s = scales.to(clean.dtype)[None, :, None, None, None]
    guided = bool((scales[~given.bool()] != 1).any())
    for t in scheduler.timesteps:
        x_in = torch.where(g, clean, scheduler.scale_model_input(x, t))
        out = denoise(x_in, t, True)
        if guided:
            out = out + (s - 1) * (out - denoise(x_in, t, False))
        x = scheduler.step(out, t, x).prev_sample
        if on_step is not None:
            on_step()
    return torch.where(g, clean, x)
