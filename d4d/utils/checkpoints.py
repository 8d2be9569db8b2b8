"""Reading a d4d checkpoint file, with the user's mistakes as one-line errors."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from d4d.utils.errors import UserError
from d4d.utils.safe_load import load_tensors


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Weights-only ``torch.load`` (:mod:`d4d.utils.safe_load`) of a Lightning/d4d checkpoint (a
    dict). A missing file, an unreadable one, one holding more than tensors and plain data, or one
    that is not a dict raises :class:`UserError` naming the path; callers check ``d4d_stage``."""
    path = Path(path)
    ckpt = load_tensors(path, map_location=map_location, mmap=mmap, what="checkpoint")
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is not a checkpoint (a {type(ckpt).__name__}, not a dict)")
    return ckpt
