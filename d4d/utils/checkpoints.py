"""Reading a d4d checkpoint file, with the user's mistakes as one-line errors."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from d4d.utils.errors import UserError


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """``torch.load`` of a Lightning/d4d checkpoint (a dict). A missing file, an unreadable one or
    one that is not a dict raises :class:`UserError` naming the path; callers check ``d4d_stage``."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise UserError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is not a checkpoint (a {type(ckpt).__name__}, not a dict)")
    return ckpt
