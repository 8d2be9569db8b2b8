"""Checks that an output path can be written, run right after argument parsing (before any work).

:func:`check_output_dir` and :func:`check_output_file` raise :class:`~d4d.utils.errors.UserError` with
one line naming the flag and the path when the output cannot be written there:

* an existing file where a folder is wanted, or an existing folder where a file is wanted;
* a path under a regular file (``--out results.txt/run``), or a dangling symbolic link;
* a nearest existing folder that is not writable: ``os.access(W_OK | X_OK)``, then a probe file
  created and removed at once in that folder. The probe is what catches the cases where ``os.access``
  says yes but a write fails: root (for whom ``os.access`` ignores permission bits) on a read-only
  mount, or a pseudo file system such as ``/proc``.

Nothing is created: a missing output folder is left for the command to make once the work starts.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from d4d.utils.errors import UserError

__all__ = ["check_output_dir", "check_output_file"]


def _name(flag: str, path: str | os.PathLike) -> str:
    return f"{flag} {os.fspath(path)}" if flag else os.fspath(path)


def _check_writable_dir(folder: Path, flag: str, path: str | os.PathLike) -> None:
    """``folder`` exists and is a directory: UserError unless a file can be created in it."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{_name(flag, path)}: {folder} is not writable (permission denied)")
    try:
        fd, probe = tempfile.mkstemp(prefix=".d4d-write-check-", dir=folder)
    except OSError as exc:
        why = exc.strerror or exc.__class__.__name__
        raise UserError(f"{_name(flag, path)}: {folder} is not writable (creating a file there failed: {why})") from None
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass


def _nearest_existing(path: Path, flag: str, raw: str | os.PathLike) -> Path:
    """The path itself or its nearest existing ancestor, which must be a folder (UserError otherwise)."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate) and not candidate.exists():
            raise UserError(f"{_name(flag, raw)}: {candidate} is a dangling symbolic link")
        if candidate.exists():
            if candidate != path and not candidate.is_dir():
                raise UserError(f"{_name(flag, raw)}: {candidate} is a file, so nothing can be created under it")
            return candidate
    return Path(".")  # a relative path whose first component is missing: the working directory


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` will be an output folder: UserError (one line naming ``flag`` and ``path``) when it is an
    existing file, lies under a file, or its nearest existing folder is not writable. Creates nothing;
    returns ``Path(path)``."""
    p = Path(path)
    found = _nearest_existing(p, flag, path)
    if found == p and not p.is_dir():
        raise UserError(f"{_name(flag, path)}: exists and is a file, not a folder")
    _check_writable_dir(found, flag, path)
    return p


def check_output_file(path: str | os.PathLike, flag: str = "OUT") -> Path:
    """``path`` will be an output file (written in place or by rename next to it): UserError when it is
    an existing folder, lies under a file, or the folder it goes in is not writable. Creates nothing;
    returns ``Path(path)``."""
    p = Path(path)
    if os.fspath(path).endswith(("/", os.sep)) or p.is_dir():
        raise UserError(f"{_name(flag, path)}: is a folder; give the path of a file to write")
    found = _nearest_existing(p, flag, path)
    if found == p:  # an existing file: it is replaced, which needs its folder to be writable
        found = p.parent if str(p.parent) else Path(".")
    _check_writable_dir(found, flag, path)
    return p
