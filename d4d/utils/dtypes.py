"""The compute dtype of a module, for casting inputs at its boundary.

Under ``bf16-mixed`` with plain Lightning, parameters stay float32 and autocast picks each op's dtype;
under DeepSpeed (bf16/fp16) the engine casts the parameters themselves and there is no autocast, so a
float32 tensor made inside a stage (normalised latents, Plücker tokens, CLIP features) must be cast to
the dtype of the module it enters. Geometry is computed in float32/float64 before that cast
(:func:`d4d.geometry.precision.full_precision`).
"""
from __future__ import annotations

import torch
from torch import nn


def module_dtype(module: nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype holding most of ``module``'s floating-point parameters (``default`` if it has none).

    By count, not the first parameter: a model loaded in bfloat16 keeps a few small parts in float32
    (diffusers' ``_keep_in_fp32_modules``, e.g. Wan's modulation table, registered first)."""
    sizes: dict[torch.dtype, int] = {}
    for p in module.parameters():
        if p.is_floating_point():
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    return max(sizes, key=sizes.get) if sizes else default


def to_module_dtype(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``x`` cast to :func:`module_dtype` of ``module`` when it is floating point."""
    return x.to(module_dtype(module)) if x.is_floating_point() else x
