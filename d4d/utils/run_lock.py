"""One training run per run directory: ``<run_dir>/.d4d.lock``.

Two ``d4d.fit`` processes writing one run directory interleave their checkpoints, ``config.yaml``
and wandb run id, and ``--resume auto`` then picks a checkpoint of either. Global rank 0 of a run
therefore creates the lock file (``O_EXCL``: exactly one creator wins) holding its host, PID, Slurm
job id and start time, and removes it when the run ends. A second run on the same directory stops
with one line naming the first.

A lock left behind by a run that was killed (``SIGKILL``, a node failure) is *stale* and is taken
over, with a warning, when

* it names this host and its PID is no longer alive (or is alive but is not ``d4d.fit``'s process
  any more: the start time recorded in ``/proc/<pid>/stat`` differs), or
* it names the Slurm job this process belongs to (a requeued job runs again on any node: the earlier
  attempt of the same job id is over).

A lock from another host outside that job cannot be checked from here; the error says which host and
PID hold it, and that the file can be deleted when that run is known to be gone.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from d4d.utils.errors import UserError
from d4d.utils.logging import get_logger

log = get_logger(__name__)

LOCK_NAME = ".d4d.lock"
_HELD: list["RunDirLock"] = []


def _process_start_ticks(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/<pid>/stat), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _identity() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start_ticks": _process_start_ticks(pid),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def stale_reason(holder: dict[str, Any]) -> str | None:
    """Why the run recorded in a lock file is known to be over, or None when it may still run."""
    me = _identity()
    job = holder.get("slurm_job_id")
    if job and job == me["slurm_job_id"]:
        return f"it belongs to an earlier attempt of this Slurm job ({job})"
    if holder.get("host") != me["host"]:
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return "it records no valid PID"
    if pid == me["pid"]:
        return None
    if not _pid_alive(pid):
        return f"process {pid} on this host is gone"
    ticks = holder.get("start_ticks")
    if ticks is not None and _process_start_ticks(pid) not in (None, ticks):
        return f"PID {pid} now belongs to another process"
    return None


class RunDirLock:
    """The lock of one run directory, held from :meth:`acquire` until :meth:`release` (or exit)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.held = False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(_identity(), f)
            f.write("\n")
        return True

    def _holder(self) -> dict[str, Any]:
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def acquire(self) -> "RunDirLock":
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise UserError(f"run_dir {self.run_dir}: not a directory (a file is in the way)") from None
        except OSError as exc:
            raise UserError(f"run_dir {self.run_dir}: cannot create it ({exc.strerror})") from None
        for _ in range(3):
            try:
                if self._create():
                    self.held = True
                    _HELD.append(self)
                    atexit.register(self.release)
                    return self
            except OSError as exc:
                raise UserError(f"run_dir {self.run_dir}: cannot write there ({exc.strerror})") from None
            holder = self._holder()
            me = _identity()
            if holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
                self.held = True  # this process holds it already (a second fit in one interpreter)
                return self
            if holder.get("host") == me["host"] and holder.get("pid") == os.getppid():
                return self  # a rank that the run holding the lock started (Lightning re-runs the command)
            if not holder:  # being written by the winner this instant, or empty: look again
                time.sleep(0.2)
                holder = self._holder()
            reason = stale_reason(holder) if holder else "the lock file is empty or unreadable"
            if reason is None:
                raise UserError(
                    f"run_dir {self.run_dir}: another run is using it (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, started {holder.get('started')}"
                    + (f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else "")
                    + f"); give another --run_dir, or delete {self.path} if that run is gone")
            log.warning("run_dir %s: taking over a stale lock (%s)", self.run_dir, reason)
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        raise UserError(f"run_dir {self.run_dir}: could not take the run lock {self.path}")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            if self._holder().get("pid") == os.getpid():
                self.path.unlink()
        except OSError:
            pass


def release_held_locks() -> None:
    """Release every run-directory lock this process took (``d4d.fit.main`` calls it on the way out)."""
    while _HELD:
        _HELD.pop().release()
