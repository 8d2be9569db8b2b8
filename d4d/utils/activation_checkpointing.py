"""Activation (gradient) checkpointing applied to named blocks from outside a model.

Models stay plain ``nn.Module``s with no checkpointing code of their own; a recipe names the
blocks (class names such as ``WanTransformerBlock`` or dotted-name globs such as
``decoder.blocks.*``, matched segment by segment) and :func:`apply_activation_checkpointing` wraps each match with PyTorch's
non-reentrant ``checkpoint_wrapper`` (the same wrapper Lightning's FSDP strategy uses). The
wrapper strips its own prefix from ``state_dict`` keys, so checkpoints load with or without it.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    apply_activation_checkpointing as _torch_apply,
    checkpoint_wrapper,
)

from d4d.utils.errors import UserError


def _name_matches(name: str, pattern: str) -> bool:
    """Glob per dotted segment: ``blocks.*`` matches ``blocks.3`` but not ``blocks.3.fc``."""
    parts, pats = name.split("."), pattern.split(".")
    return len(parts) == len(pats) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, pats))


def _matcher(targets: Iterable[str], model: nn.Module):
    targets = list(targets)
    names = {id(m): n for n, m in model.named_modules()}

    def check(module: nn.Module) -> bool:
        if isinstance(module, CheckpointWrapper):
            return False
        name = names.get(id(module), "")
        cls = type(module).__name__
        return any(t == cls or (name and _name_matches(name, t)) for t in targets)

    return check


def apply_activation_checkpointing(model: nn.Module, targets: Iterable[str] | None) -> int:
    """Wrap every submodule of ``model`` whose class name or dotted name matches one of
    ``targets`` with non-reentrant activation checkpointing. Returns the number wrapped.

    Raises :class:`UserError` when a target matches nothing (a misspelled block name must not
    silently turn checkpointing off).
    """
    targets = [t for t in (targets or []) if t]
    if not targets:
        return 0
    check = _matcher(targets, model)
    matched = [m for m in model.modules() if check(m)]
    if not matched:
        raise UserError(
            f"activation checkpointing: no block of {type(model).__name__} matches {targets!r} "
            "(give class names or dotted-name globs)"
        )
    _torch_apply(
        model,
        checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=check,
    )
    return len(matched)


def count_checkpointed(model: nn.Module) -> int:
    return sum(isinstance(m, CheckpointWrapper) for m in model.modules())
