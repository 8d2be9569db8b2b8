"""Shared fixtures: a small synthetic shard set (built once per session) and the ../shared data."""
from __future__ import annotations

import logging

import os
import subprocess
import sys
from pathlib import Path

# One torch/OpenMP thread per process, before torch is imported here or in any subprocess: the suite
# runs many small models and several processes at once (Slurm, DDP, d4d.fit subprocesses), where
# oversubscribed OpenMP threads were measured 20-50x slower per step on this 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RE10K = SHARED / "data" / "realestate10k"


def run_module(module: str, *args: str, check: bool = True, timeout: float = 600, env: dict | None = None,
               cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """``python -m module args...`` in a subprocess, as a user would run it."""
    # WANDB_SERVICE is set once any in-process test starts wandb; a subprocess that inherits it attaches
    # to that long-lived service, where a killed run's id stays registered ("run ID in use" on resume).
    base = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    full_env = {**base, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"python -m {module} {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(autouse=True)
def _no_inherited_wandb_service(monkeypatch):
    """Subprocesses a test starts must get a wandb service of their own (see :func:`run_module`)."""
    monkeypatch.delenv("WANDB_SERVICE", raising=False)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """48 train / 16 val / 16 test synthetic clips of 8 frames at 32x32, a quarter of them static scenes
    (meta ``dynamic: false``), as ``make data`` builds them (a few seconds to build)."""
    out = tmp_path_factory.mktemp("synthetic")
    run_module("data_prep.synthetic", "--out", str(out), "--clips", "48", "--val-clips", "16",
               "--test-clips", "16", "--frames", "8", "--size", "32", "--seed", "0", "--shard-size", "16",
               "--static-fraction", "0.25")
    return out


@pytest.fixture(scope="session")
def re10k_dir() -> Path:
    if not RE10K.is_dir():
        pytest.skip(f"real RealEstate10K clips not found at {RE10K} (../shared is absent)")
    return RE10K


class _LogLines(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def skip_warnings():
    """The warning lines the shard reader's skip accounting logs (one per skipped sample) during a test."""
    handler = _LogLines()
    logger = logging.getLogger("d4d.data.skips")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)
