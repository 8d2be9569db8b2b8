"""A rank-aware logger: only global rank 0 prints INFO; every rank prints warnings and errors."""
from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s %(levelname)s %(name)s%(rank)s: %(message)s"


def global_rank() -> int:
    """The process's global rank from the launcher's environment (0 outside distributed runs)."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    return 0


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rank = global_rank()
        record.rank = f"[rank{rank}]" if rank else ""
        return rank == 0 or record.levelno >= logging.WARNING


class _CurrentStderr(logging.StreamHandler):
    """A stream handler that writes to ``sys.stderr`` as it is when a record is logged (not as it was
    when the handler was made), so redirected or replaced stderr (a notebook, a test) gets the lines."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def get_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` under the ``d4d`` hierarchy, configured once with a rank filter."""
    root = logging.getLogger("d4d")
    if not getattr(root, "_d4d_configured", False):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(_RankFilter())
        root.addHandler(handler)
        root.setLevel(os.environ.get("D4D_LOG_LEVEL", "INFO"))
        root.propagate = False
        root._d4d_configured = True  # type: ignore[attr-defined]
    return logging.getLogger(name if name.startswith("d4d") else f"d4d.{name}")
