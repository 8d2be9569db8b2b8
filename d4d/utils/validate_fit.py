"""Range checks of ``d4d.fit``'s trainer and data numbers, before any class is built.

LightningCLI types these keys (``int``, ``float``, ``int | None``) but does not range-check them, so
``--trainer.max_steps -5`` or ``--data.init_args.num_workers -1`` end in a Lightning or DataLoader
traceback (the latter only after the model is built). :func:`check_trainer_and_data_numbers` raises
one :class:`~d4d.utils.errors.UserError` naming the key and its value instead. Lightning's own
conventions are kept: ``-1`` means "no limit" for ``max_steps`` and ``max_epochs`` (and ``None`` the
default), a ``limit_*_batches`` is a count (int >= 0) or a fraction (float in [0, 1]).

Call it on the parsed config (jsonargparse Namespace or plain dict) before instantiation, i.e. first
thing in ``D4DCLI.before_instantiate_classes`` (``check_trainer_and_data_numbers(self.config)``).
"""
from __future__ import annotations

import math
from typing import Any

from d4d.utils.errors import UserError

__all__ = ["check_trainer_and_data_numbers"]

_MISSING = object()


def _get(obj: Any, key: str, default: Any = _MISSING) -> Any:
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _items(obj: Any) -> list[tuple[str, Any]]:
    if obj is None:
        return []
    if isinstance(obj, dict):
        return list(obj.items())
    return list(vars(obj).items())


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fail(key: str, value: Any, rule: str) -> None:
    raise UserError(f"{key} {value!r}: {rule}")


def _limit(key: str, value: Any) -> None:
    """max_steps / max_epochs: -1 (no limit), None (Lightning's default) or >= 1."""
    if value is None or value is _MISSING:
        return
    if not _is_int(value) or (value != -1 and value < 1):
        _fail(key, value, "must be >= 1, or -1 for no limit")


def _at_least(key: str, value: Any, lo: int, allow_none: bool = True) -> None:
    if value is _MISSING or (value is None and allow_none):
        return
    if not _is_int(value) or value < lo:
        _fail(key, value, f"must be an integer >= {lo}")


def _finite_at_least(key: str, value: Any, lo: float) -> None:
    if value is None or value is _MISSING:
        return
    if not _is_number(value) or not math.isfinite(value) or value < lo:
        _fail(key, value, f"must be a finite number >= {lo:g}")


def _batches(key: str, value: Any) -> None:
    """limit_*_batches / val_check_interval style: int >= 0 (a count) or float in [0, 1] (a fraction)."""
    if value is None or value is _MISSING:
        return
    if _is_int(value):
        if value < 0:
            _fail(key, value, "must be a count >= 0 or a fraction in [0.0, 1.0]")
    elif not _is_number(value) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        _fail(key, value, "must be a count >= 0 or a fraction in [0.0, 1.0]")


def check_trainer(trainer: Any, prefix: str = "trainer") -> None:
    """Range checks of the Lightning Trainer arguments that are plain numbers."""
    if trainer is None:
        return
    for k in ("max_steps", "max_epochs"):
        _limit(f"{prefix}.{k}", _get(trainer, k))
    for k in ("min_steps", "min_epochs"):
        _at_least(f"{prefix}.{k}", _get(trainer, k), 0)
    for k in ("accumulate_grad_batches", "log_every_n_steps", "check_val_every_n_epoch", "num_nodes"):
        _at_least(f"{prefix}.{k}", _get(trainer, k), 1)
    _at_least(f"{prefix}.num_sanity_val_steps", _get(trainer, "num_sanity_val_steps"), -1)
    for k in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
              "overfit_batches"):
        _batches(f"{prefix}.{k}", _get(trainer, k))
    interval = _get(trainer, "val_check_interval")
    if _is_int(interval):
        _at_least(f"{prefix}.val_check_interval", interval, 1)
    elif interval not in (None, _MISSING):
        _batches(f"{prefix}.val_check_interval", interval)
    _finite_at_least(f"{prefix}.gradient_clip_val", _get(trainer, "gradient_clip_val"), 0.0)


def check_data(data: Any, prefix: str = "data") -> None:
    """Range checks of a data module's numbers by their names: ``*num_workers`` >= 0, ``*batch_size``,
    ``epoch_length``, ``steps_per_epoch``, ``num_frames`` >= 1, ``max_skip_fraction`` in [0, 1],
    ``image_size`` sides >= 1. ``data`` is ``{class_path, init_args}`` or the init_args themselves."""
    if data is None:
        return
    args = _get(data, "init_args", None)
    if args is not None:
        prefix = f"{prefix}.init_args"
    else:
        args = data
    for name, value in _items(args):
        key = f"{prefix}.{name}"
        if name.endswith("num_workers"):
            _at_least(key, value, 0)
        elif name.endswith("batch_size") or name in ("epoch_length", "steps_per_epoch", "num_frames"):
            _at_least(key, value, 1)
        elif name == "max_skip_fraction" and value is not None:
            if not _is_number(value) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
                _fail(key, value, "must be in [0, 1]")
        elif name == "image_size" and value is not None:
            sides = list(value) if isinstance(value, (list, tuple)) else [value]
            if not sides or not all(_is_int(s) and s >= 1 for s in sides):
                _fail(key, value, "sides must be integers >= 1")


def check_trainer_and_data_numbers(config: Any) -> None:
    """UserError (one line naming the key and value) when a trainer or data number of ``config`` (the
    parsed ``d4d.fit`` config) is out of range; see the module docstring."""
    check_trainer(_get(config, "trainer", None))
    check_data(_get(config, "data", None))
