"""Reading tensors from files without running code from them.

A ``torch.load`` with ``weights_only`` off unpickles arbitrary Python objects, and a crafted
pickle runs any code it likes while being read. Every file d4d reads that a user hands it
(checkpoints, exported weights, 4D scenes, precomputed latents) goes through :func:`load_tensors`,
which is ``torch.load(weights_only=True)``: tensors, containers and plain Python values only, plus
the four small, data-only classes DeepSpeed writes into its own checkpoints (its loss scaler, its
ZeRO-stage enum and a named tuple of fragment offsets). A file that needs more is refused with one
line saying which Python object it asked for.

DeepSpeed's and Lightning's own readers of DeepSpeed checkpoint directories (resume, conversion to
one file) call ``torch.load`` with ``weights_only`` off inside their code; :func:`weights_only_loads` runs
them with every ``torch.load`` forced to the same weights-only rules.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
from pathlib import Path
from typing import Any, Iterator

from d4d.utils.errors import UserError

# Classes DeepSpeed pickles into its checkpoints. Each only holds numbers / enum values, and none
# defines a __setstate__ or __reduce__ that runs anything: allowing them lets weights-only loading
# read DeepSpeed's files without trusting them.
DEEPSPEED_DATA_CLASSES = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)

_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL (\S+)|Unsupported operand (\S+)|"
                          r"Trying to call reduce for callable (\S+)|Unsupported class (\S+)")


def allowed_globals(import_deepspeed: bool = False) -> list[Any]:
    """The DeepSpeed data classes to allow: those of modules already imported, or (``import_deepspeed``)
    all that can be imported. DeepSpeed is not imported for files that do not need it (its import
    takes seconds and prints an accelerator warning)."""
    import importlib
    import sys

    found = []
    for module, name in DEEPSPEED_DATA_CLASSES:
        if module not in sys.modules and not import_deepspeed:
            continue
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # DeepSpeed absent or a version without this class
            continue
    return found


def _weights_only_load(load, f, **kwargs) -> Any:
    """``load(f, weights_only=True, **kwargs)`` with DeepSpeed's data classes allowed; a file that
    names one of them before DeepSpeed was imported is read again once it is."""
    import torch

    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return load(f, weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        wanted = _UNSUPPORTED.search(str(exc))
        names = {f"{m}.{n}" for m, n in DEEPSPEED_DATA_CLASSES}
        if not wanted or not names.intersection(wanted.groups()):
            raise
    if hasattr(f, "seek"):
        f.seek(0)
    with torch.serialization.safe_globals(allowed_globals(import_deepspeed=True)):
        return load(f, weights_only=True, **kwargs)


def refusal_reason(exc: BaseException) -> str:
    """What a weights-only load refused, in a few words, from torch's multi-line message."""
    text = str(exc)
    match = _UNSUPPORTED.search(text)
    if match:
        name = next(g for g in match.groups() if g)
        return f"it asks to run or build the Python object {name!r}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln]
    return lines[-1] if lines else type(exc).__name__


def refused(path: str | os.PathLike, exc: BaseException, what: str = "file") -> UserError:
    return UserError(f"{what} {path}: refused to load: {refusal_reason(exc)}; d4d reads only tensors and "
                     "plain values from files (torch.load weights_only=True) and never runs code from one")


def load_tensors(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False,
                 what: str = "file") -> Any:
    """``torch.load(path, weights_only=True)`` with DeepSpeed's data classes allowed.

    Raises :class:`UserError` naming ``what`` and ``path`` when the file is missing, is not a torch
    file, or holds anything beyond tensors and plain data (such a file is never unpickled)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return _weights_only_load(torch.load, path, map_location=map_location, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise refused(path, exc, what) from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{what} {path}: cannot read it: {first}") from None


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within the block, every ``torch.load`` (also those inside DeepSpeed and Lightning that pass
    ``weights_only`` off) loads weights only, with DeepSpeed's data classes allowed. A refused file
    raises ``pickle.UnpicklingError`` as torch does; callers turn it into a UserError (:func:`refused`)."""
    import torch

    original = torch.load

    def guarded(f, map_location=None, *_pickle_module, **kwargs):
        kwargs.pop("pickle_module", None)  # a custom unpickler is exactly what is not allowed here
        kwargs.pop("weights_only", None)
        return _weights_only_load(original, f, map_location=map_location, **kwargs)

    torch.load = guarded
    try:
        yield
    finally:
        torch.load = original
