"""Measure a training step of a :class:`~benchmarks.memory_stages.Stage`: activation bytes and FLOPs.

Works on any device, the meta device included (no memory, no compute: shapes only).

* **Saved for backward**: a ``saved_tensors_hooks`` pack hook sums the bytes of the tensors autograd
  keeps, once per storage (a view keeps its whole storage), parameters and buffers excluded.
  Each tensor is attributed to the activation-checkpointed block running when it was saved
  (the recipe's ``activation_checkpointing`` targets, outermost matches). With checkpointing the
  backward keeps what is saved outside the blocks plus the blocks' inputs (the recompute needs
  them) and, while one block is recomputed, that block's own saved tensors: ``saved_ac`` adds the
  largest of those to the first two.
* **Live peak**: a dispatch mode counts every storage an op creates until it is freed (weak
  references); its peak over inputs + frozen encoders + forward + backward is the step's activation
  memory including transients (attention bias tensors, gradients of activations, recomputed blocks).
  Gradients of parameters are dropped as they are accumulated, so they are not in it (the strategy
  accounts for them). Measured twice: the plain model, and the model wrapped with checkpointing by
  :func:`d4d.utils.activation_checkpointing.apply_activation_checkpointing` as ``d4d.fit`` does.
* **FLOPs**: ``torch.utils.flop_counter.FlopCounterMode`` over the encoders (no grad), the forward
  and the backward; the recompute of checkpointing is the FLOP difference of the wrapped run (the
  non-reentrant checkpoint stops recomputing a block once its last saved tensor is back, so it is
  a little less than the blocks' forward). FlopCounterMode runs apart from the memory runs: its
  module tracker keeps recomputed activations alive.

Attention runs, with ``sdpa="gpu"``, as an H100 runs it: ``F.scaled_dot_product_attention`` is
replaced by the fused kernels it dispatches to on CUDA (flash attention without a mask and head
dims <= 256, memory-efficient attention with a mask, whose boolean mask becomes an additive bias in
the query dtype, padded to a multiple of 16 keys), so the saved tensors are those kernels' (q, k, v,
output, logsumexp, bias), not the score matrices of PyTorch's math fallback (what meta and CPU run
by default, ``sdpa="math"``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.memory_stages import Stage, loss_of
from d4d.utils.activation_checkpointing import _matcher, apply_activation_checkpointing

aten = torch.ops.aten
SDPA_FORWARD = {aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_efficient_attention}
SDPA_BACKWARD = {aten._scaled_dot_product_flash_attention_backward,
                 aten._scaled_dot_product_efficient_attention_backward}


def _gpu_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` as the CUDA kernels it picks on an H100 run it."""
    if query.ndim != 4 or enable_gqa:
        return _TORCH_SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    low = query.dtype in (torch.float16, torch.bfloat16)
    if attn_mask is None and low and query.shape[-1] <= 256 and value.shape[-1] == query.shape[-1]:
        return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False,
                                                        scale=scale)[0]
    bias = attn_mask
    if bias is not None:
        if bias.dtype == torch.bool:  # SDPA's front end turns a boolean mask into an additive one
            bias = torch.zeros_like(bias, dtype=query.dtype).masked_fill_(bias.logical_not(), float("-inf"))
        else:
            bias = bias.to(query.dtype)
        keys = key.shape[-2]
        if keys % 16:  # the kernel wants 16-aligned bias rows: a padded copy, then a view
            bias = F.pad(bias, (0, 16 - keys % 16))[..., :keys]
        bias = bias.expand(*query.shape[:-1], keys)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return aten._scaled_dot_product_efficient_attention(query, key, value, bias, grad, dropout_p, is_causal,
                                                        scale=scale)[0]


_TORCH_SDPA = F.scaled_dot_product_attention


@contextlib.contextmanager
def attention_kernels(sdpa: str):
    """``"gpu"``: :func:`_gpu_sdpa` in place of ``F.scaled_dot_product_attention``; ``"math"``: PyTorch's
    math path everywhere (the same on CPU and meta: what the parity test compares)."""
    if sdpa == "gpu":
        F.scaled_dot_product_attention = _gpu_sdpa
        try:
            yield
        finally:
            F.scaled_dot_product_attention = _TORCH_SDPA
    elif sdpa == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            yield
    else:
        raise ValueError(f"sdpa must be 'gpu' or 'math', got {sdpa!r}")


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages ops create, from creation until freed; ``peak`` is the maximum."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # views and in-place results share an input's storage: nothing new (parameters' included)
        seen = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live and key not in seen:
                    self.live[key] = storage.nbytes()
                    self.current += self.live[key]
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out


@dataclasses.dataclass
class StepMeasure:
    saved: int = 0  # bytes saved for backward, no checkpointing
    saved_outside: int = 0  # of which outside the checkpointed blocks
    block_inputs: int = 0  # inputs of all checkpointed blocks (kept with checkpointing)
    block_saved_max: int = 0  # the most one block saves
    saved_ac: int = 0  # saved_outside + block_inputs + block_saved_max, storages counted once
    peak: int = 0  # live peak of the step, no checkpointing
    peak_ac: int = 0  # live peak with checkpointing (0: not measured)
    encode_peak: int = 0  # live peak of inputs + frozen encoders
    flops_encode: int = 0
    flops_fwd: int = 0
    flops_bwd: int = 0
    flops_recompute: int = 0  # FLOPs of the checkpointed run minus the plain one (what the backward recomputes)
    flops_sdpa_fwd: int = 0  # forward FLOPs of the fused attention kernels (sdpa="gpu")
    flops_sdpa_bwd: int = 0  # their backward as counted (5 matmuls: the score matrix recomputed)
    blocks: int = 0  # checkpointed blocks (outermost matches of the recipe's targets)

    @property
    def flops_step(self) -> int:
        return self.flops_fwd + self.flops_bwd

    @property
    def flops_model(self) -> int:
        """fwd + bwd with attention backward counted as 2x its forward (4 matmuls), the usual
        model-FLOPs convention, instead of FlopCounterMode's 5 (it counts the kernel's recompute)."""
        return self.flops_step - self.flops_sdpa_bwd // 5

    @property
    def flops_attention_model(self) -> int:
        """Fused attention's FLOPs in the model convention (fwd + 2x fwd)."""
        return self.flops_sdpa_fwd + self.flops_sdpa_bwd * 4 // 5


def cast_like_deepspeed(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """What DeepSpeed's bf16/fp16 section does: every floating-point parameter to ``dtype``, buffers kept."""
    for p in module.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def _outermost(module: torch.nn.Module, targets: list[str]) -> list[torch.nn.Module]:
    if not targets:
        return []
    check = _matcher(targets, module)
    found, inside = [], set()
    for m in module.modules():
        if id(m) in inside:
            continue
        if check(m):
            found.append(m)
            inside.update(id(s) for s in m.modules())
    return found


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s._cdata, s.nbytes()


def _drop_parameter_grads(module: torch.nn.Module) -> list:
    return [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
            for p in module.parameters() if p.requires_grad]


def _count_flops(stage: Stage, sdpa: str) -> tuple[int, int, int, dict]:
    """FLOPs of the encoders, the forward and the backward; per-op totals of the whole step.
    (FlopCounterMode runs alone: its module tracker keeps recomputed activations alive.)"""
    with attention_kernels(sdpa):
        with FlopCounterMode(display=False) as counter:
            x = stage.encode(stage.inputs())
        encode = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            loss = loss_of(stage.forward(x))
            fwd = counter.get_total_flops()
            loss.backward()
    return encode, fwd, counter.get_total_flops() - fwd, dict(counter.get_flop_counts()["Global"])


def _live_peak(stage: Stage, sdpa: str) -> tuple[int, int]:
    """Live peak of inputs + encoders, and of the whole step."""
    with attention_kernels(sdpa), LiveBytes() as live:
        x = stage.encode(stage.inputs())
        encode = live.peak
        loss_of(stage.forward(x)).backward()
    return encode, live.peak


def measure_step(stage: Stage, targets: list[str] | None, dtype: torch.dtype | None = None, sdpa: str = "gpu",
                 memory: bool = True, checkpointed_run: bool = True) -> StepMeasure:
    """Measure one training micro-batch of ``stage`` (see the module docstring).

    ``dtype``: cast the parameters first (DeepSpeed's bf16). ``memory=False``: FLOPs only.
    ``checkpointed_run``: also run with the blocks wrapped (modifies ``stage.module`` in place).
    """
    module = stage.module
    if dtype is not None:
        cast_like_deepspeed(module, dtype)
    drops = _drop_parameter_grads(module)
    blocks = _outermost(module, list(targets or []))
    res = StepMeasure(blocks=len(blocks))
    res.flops_encode, res.flops_fwd, res.flops_bwd, ops = _count_flops(stage, sdpa)
    res.flops_sdpa_fwd = sum(v for op, v in ops.items() if op in SDPA_FORWARD)
    res.flops_sdpa_bwd = sum(v for op, v in ops.items() if op in SDPA_BACKWARD)
    if memory:
        _saved_for_backward(stage, blocks, sdpa, res)
        res.encode_peak, res.peak = _live_peak(stage, sdpa)
    if blocks and checkpointed_run:
        apply_activation_checkpointing(module, targets)
        encode, fwd, bwd, _ = _count_flops(stage, sdpa)
        res.flops_recompute = fwd + bwd - res.flops_step
        if memory:
            res.peak_ac = _live_peak(stage, sdpa)[1]
    for h in drops:
        h.remove()
    return res


def _saved_for_backward(stage: Stage, blocks: list[torch.nn.Module], sdpa: str, res: StepMeasure) -> None:
    module = stage.module
    fixed = {_storage(t)[0] for t in list(module.parameters()) + list(module.buffers())}
    stack: list[int] = []
    saved: dict[int, tuple[int, int]] = {}  # storage -> (bytes, block index or -1)
    inputs: dict[int, int] = {}
    alive: list[torch.Tensor] = []  # held until the end: a freed storage's address (its key) can be reused

    def pack(t):
        key, nbytes = _storage(t)
        if key not in fixed and key not in saved:
            saved[key] = (nbytes, stack[-1] if stack else -1)
            alive.append(t)
        return t

    def pre(index):
        def hook(mod, args, kwargs):
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor):
                    key, nbytes = _storage(t)
                    if key not in fixed and key not in inputs:
                        inputs[key] = nbytes
                        alive.append(t)
            stack.append(index)
        return hook

    def post(mod, args, out) -> None:
        stack.pop()

    handles = [b.register_forward_pre_hook(pre(i), prepend=True, with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(post, always_call=True) for b in blocks]
    try:
        with attention_kernels(sdpa):
            x = stage.encode(stage.inputs())
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = loss_of(stage.forward(x))
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    res.saved = sum(n for n, _ in saved.values())
    outside = {k: n for k, (n, b) in saved.items() if b < 0}
    res.saved_outside = sum(outside.values())
    res.block_inputs = sum(inputs.values())
    kept = {**outside, **inputs}
    per_block = [sum(n for k, (n, b) in saved.items() if b == i and k not in kept) for i in range(len(blocks))]
    res.block_saved_max = max(per_block, default=0)
    res.saved_ac = sum(kept.values()) + res.block_saved_max if blocks else res.saved


def summary(m: StepMeasure) -> dict[str, Any]:
    return {**dataclasses.asdict(m), "flops_step": m.flops_step, "flops_model": m.flops_model,
            "flops_attention_model": m.flops_attention_model}
