"""Exponential moving average (EMA) of the trainable weights of the diffusion stages (``static``,
``dynamic``), switched on by ``d4d.fit``'s top-level ``ema`` key and used by sampling when a
checkpoint holds it.

``ema: {decay: 0.9999, every_n_steps: 1, start_step: 0}`` (null, the default: off). After optimizer
step ``s`` (``trainer.global_step``)::

    s <= start_step:                          ema = w_s                         (a copy)
    s >  start_step, (s - start_step) % n == 0: ema = decay * ema + (1 - decay) * w_s

and at the start of a fresh run ``ema = w_0``. ``w`` are the **float32** trainable weights: the
parameters themselves without DeepSpeed (DDP and single process keep them in float32, also under
``bf16-mixed``), DeepSpeed's fp32 master weights under ZeRO-1/2/3 (``deepspeed.utils.
safe_get_full_fp32_param``: the module's own copy is bf16 there, where an update of
``(1 - 0.9999) * (w - ema)`` is below bf16's resolution and would be lost). Frozen parameters
(VAE, CLIP, UMT5, the frozen Wan transformer) are never copied: EMA memory is 4 bytes per
trainable parameter, held by global rank 0 only (``device: cpu`` keeps it in host memory).

Why not Lightning's ``WeightAveraging``/``EMAWeightAveraging`` or diffusers' ``EMAModel``
(docs/cluster.md, "EMA"): Lightning's callback deep-copies the whole LightningModule (the frozen
14B Wan backbone included) into an ``AveragedModel``, warns that sharded models are unsupported,
and under DeepSpeed its averaged ``state_dict`` is dropped by the strategy's save (only the client
state is written) while ZeRO-3 parameters are empty tensors on every rank. diffusers' ``EMAModel``
takes a parameter list (trainable only is possible) but averages ``param`` in the parameter's dtype
(bf16 under DeepSpeed) and gathers ZeRO-3 partitions only when transformers' HF DeepSpeed config is
active, which Lightning never sets: on ZeRO-3 it averages 0-element tensors. This callback reads
DeepSpeed's fp32 masters through its public API, which gathers a ZeRO-3 parameter from all ranks
(one all-gather per trainable parameter per update; every rank takes part, rank 0 keeps the result).

Checkpoints: ``ema_state_dict`` (``{state-dict name: float32 tensor}``, the trainable weights only)
and ``ema`` (the options, ``updates`` and ``step``) are top-level keys, written by rank 0 (under
DeepSpeed into the client state of rank 0's model-states file, which ``d4d.export_checkpoint``
carries). ``resume`` restores them bit for bit. Sampling (:func:`sampling_state_dict`) overlays
them on the checkpoint's ``state_dict`` unless raw weights are asked for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import Callback

from d4d.utils.errors import UserError
from d4d.utils.logging import get_logger

log = get_logger(__name__)

STATE_KEY = "ema_state_dict"
META_KEY = "ema"
STAGES = ("static", "dynamic")
WEIGHTS = ("ema", "raw")


@dataclass
class EMAOptions:
    """``d4d.fit``'s ``ema`` key (see the module docstring)."""

    decay: float = 0.9999
    every_n_steps: int = 1
    start_step: int = 0
    device: str | None = None


def check_options(opts: Any) -> None:
    """UserError (one line naming the ``ema`` key) for a value out of range."""
    decay, every, start, device = (getattr(opts, k) for k in ("decay", "every_n_steps", "start_step", "device"))
    if not isinstance(decay, (int, float)) or not math.isfinite(decay) or not 0.0 <= decay < 1.0:
        raise UserError(f"ema.decay: expected a number in [0, 1), got {decay!r}")
    if not isinstance(every, int) or every < 1:
        raise UserError(f"ema.every_n_steps: expected an integer >= 1, got {every!r}")
    if not isinstance(start, int) or start < 0:
        raise UserError(f"ema.start_step: expected an integer >= 0, got {start!r}")
    if device not in (None, "cpu"):
        raise UserError(f"ema.device: expected null (the weights' device) or 'cpu', got {device!r}")


def trainable_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name as the checkpoint's state_dict writes it, parameter)`` of each trainable parameter."""
    from d4d.utils.resume import clean_key

    return [(clean_key(n), p) for n, p in module.named_parameters() if p.requires_grad]


def full_fp32(param: torch.nn.Parameter) -> torch.Tensor:
    """The whole float32 value of ``param``: DeepSpeed's fp32 master (a collective under DeepSpeed:
    every rank must call it for the same parameters in the same order), else the parameter itself."""
    if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
        from deepspeed.utils import safe_get_full_fp32_param

        value = safe_get_full_fp32_param(param)
        if value is not None:
            return value.detach().float()
    if getattr(param, "ds_numel", None) not in (None, param.numel()):
        raise RuntimeError("ema: a ZeRO-3 partitioned parameter without DeepSpeed fp32 master weights")
    return param.detach().float()


class EMA(Callback):
    """EMA of the trainable weights (module docstring). Added by ``d4d.fit`` for the ``ema`` key."""

    def __init__(self, decay: float = 0.9999, every_n_steps: int = 1, start_step: int = 0,
                 device: str | None = None):
        check_options(EMAOptions(decay, every_n_steps, start_step, device))
        self.decay, self.every_n_steps, self.start_step, self.device = decay, every_n_steps, start_step, device
        self.shadow: dict[str, torch.Tensor] | None = None  # rank 0 only
        self.updates = 0  # averaging updates made (copies before start_step not counted)
        self.step = -1  # trainer.global_step the EMA describes
        self._loaded: dict[str, Any] | None = None

    # ----------------------------------------------------------------------------- reading weights
    def _weights(self, trainer, pl_module):
        """``(name, fp32 weight)`` of each trainable parameter, one at a time (a full copy of all of
        them at once would double the EMA's memory); every rank runs the DeepSpeed collectives, only
        global rank 0 gets values (None elsewhere)."""
        keep = trainer.is_global_zero
        for name, param in trainable_parameters(pl_module):
            value = full_fp32(param)
            yield name, (value if self.device is None else value.to(self.device)) if keep else None

    def _read(self, trainer, pl_module) -> dict[str, torch.Tensor] | None:
        out = {name: value.clone() for name, value in self._weights(trainer, pl_module) if value is not None}
        return out if trainer.is_global_zero else None

    @torch.no_grad()
    def _copy(self, trainer, pl_module) -> None:
        if self.shadow is None:
            self.shadow = self._read(trainer, pl_module)
            return
        for name, value in self._weights(trainer, pl_module):
            if value is not None:
                self.shadow[name].copy_(value)

    @torch.no_grad()
    def _update(self, trainer, pl_module) -> None:
        self.updates += 1
        for name, value in self._weights(trainer, pl_module):
            if value is not None:
                shadow = self.shadow[name]
                shadow.mul_(self.decay).add_(value.to(shadow.device), alpha=1.0 - self.decay)

    # --------------------------------------------------------------------------------- hooks
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and getattr(pl_module, "stage", None) not in STAGES:
            raise UserError(f"ema: only the diffusion stages ({', '.join(STAGES)}) take it; "
                            f"{type(pl_module).__name__} is not one (remove the ema key)")

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._loaded = {"state": checkpoint.get(STATE_KEY), "meta": checkpoint.get(META_KEY) or {}}

    def on_train_start(self, trainer, pl_module) -> None:
        names = [n for n, _ in trainable_parameters(pl_module)]
        if not names:
            raise UserError("ema: the module has no trainable parameters")
        loaded, self._loaded = self._loaded, None
        state = (loaded or {}).get("state")
        meta = (loaded or {}).get("meta") or {}
        # Under ZeRO-3 only rank 0's file holds the EMA: rank 0 decides, every rank follows (the weight
        # reads are collectives).
        plan = None
        if trainer.is_global_zero:
            missing = [n for n in names if state is None or n not in state]
            plan = {"read": bool(missing), "missing": len(missing) if state is not None else 0,
                    "resumed": loaded is not None, "updates": int(meta.get("updates", 0)) if state is not None else 0,
                    "step": int(meta.get("step", trainer.global_step)) if state is not None else trainer.global_step}
        plan = trainer.strategy.broadcast(plan, src=0)
        self.updates, self.step = plan["updates"], plan["step"]
        current = self._read(trainer, pl_module) if plan["read"] else None
        if not trainer.is_global_zero:
            return
        if state is None:
            if plan["resumed"]:
                log.warning("ema: the resumed checkpoint holds no EMA weights; the EMA starts from the weights "
                            "of step %d", trainer.global_step)
            self.shadow = current
            return
        if plan["missing"]:  # e.g. more trainable parameters than when the checkpoint was written
            log.warning("ema: %d trainable parameters have no EMA in the checkpoint; they start from the "
                        "current weights", plan["missing"])
        device = torch.device(self.device) if self.device else trainer.strategy.root_device
        self.shadow = {n: _own(state[n], device) if n in state else current[n] for n in names}
        log.info("ema: restored %d tensors (%d updates, step %d)", len(self.shadow), self.updates, self.step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self.step:  # no optimizer step (gradient accumulation)
            return
        if step <= self.start_step:
            self._copy(trainer, pl_module)
        elif (step - self.start_step) % self.every_n_steps == 0:
            self._update(trainer, pl_module)
        self.step = step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self.shadow is None:
            return
        checkpoint[STATE_KEY] = dict(self.shadow)  # written synchronously: no copy needed
        checkpoint[META_KEY] = {"decay": self.decay, "every_n_steps": self.every_n_steps,
                                "start_step": self.start_step, "updates": self.updates, "step": self.step}


def _own(tensor: torch.Tensor, device) -> torch.Tensor:
    """``tensor`` as float32 on ``device``, never sharing storage with the loaded checkpoint."""
    out = tensor.detach().to(device=device, dtype=torch.float32)
    return out.clone() if out.data_ptr() == tensor.data_ptr() else out


def sampling_state_dict(ckpt: dict[str, Any], weights: str | None, path: Any) -> tuple[dict[str, Any], str]:
    """The weights to sample with: the checkpoint's ``state_dict`` with its EMA weights laid over it
    (``weights`` ``"ema"``, or None/``"auto"`` when the checkpoint has them) or as trained (``"raw"``).
    Returns ``(state_dict, "ema" | "raw")``; UserError for ``"ema"`` on a checkpoint without EMA."""
    if weights not in (None, "auto", *WEIGHTS):
        raise UserError(f"--weights: expected one of {', '.join(WEIGHTS)}, got {weights!r}")
    state = ckpt["state_dict"]
    ema = ckpt.get(STATE_KEY)
    if weights == "raw" or (weights in (None, "auto") and not ema):
        return state, "raw"
    if not ema:
        raise UserError(f"--weights ema: {path} holds no EMA weights (trained without the ema option); "
                        "use --weights raw")
    from d4d.utils.resume import clean_state_dict_keys

    ema = clean_state_dict_keys(ema)
    return {**state, **{k: v.to(state[k].dtype) if k in state else v for k, v in ema.items()}}, "ema"
