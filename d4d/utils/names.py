"""Names read from data (clip ids, sample keys, run names) made safe to use as one file name.

A clip id comes from a shard's ``meta.json`` or a tar member name, i.e. from whoever made the
shard: ``../../x``, ``/etc/x``, ``a/b``, a NUL byte or a newline must never steer where d4d writes.
:func:`safe_filename` keeps letters, digits, ``-``, ``_`` and inner dots, replaces everything else,
refuses ``.``/``..`` and leading dots, bounds the length, and appends a short hash of the original
whenever it changed anything, so two different ids never share a file.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path, PurePosixPath

MAX_LENGTH = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: object, fallback: str = "item") -> str:
    """One path component for ``name`` that stays inside the directory it is joined to."""
    text = str(name)
    clean = _UNSAFE.sub("_", text).strip("._") or fallback
    clean = re.sub(r"\.{2,}", ".", clean)[:MAX_LENGTH]
    if clean != text:
        clean = f"{clean}-{hashlib.sha1(text.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"
    return clean


def path_inside(root: str | os.PathLike, relative: object) -> Path | None:
    """``root / relative`` for a relative name read from data (``file_name`` of an annotation file),
    or None when it would leave ``root`` (absolute, ``..``, a NUL byte, a link pointing outside)."""
    text = str(relative)
    rel = PurePosixPath(text.replace("\\", "/"))
    if not text or "\x00" in text or rel.is_absolute() or ".." in rel.parts:
        return None
    path = Path(root) / rel
    try:
        if not path.resolve().is_relative_to(Path(root).resolve()):
            return None
    except (OSError, RuntimeError):  # a symlink loop
        return None
    return path
