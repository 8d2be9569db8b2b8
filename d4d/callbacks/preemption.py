"""Slurm preemption: on the requeue signal (``#SBATCH --signal=USR1@<secs>``) save a checkpoint at
the next step boundary, requeue the job and stop; the requeued job resumes from it.

Lightning's own ``SLURMEnvironment(auto_requeue=True)`` saves inside the signal handler, i.e. at
whatever bytecode the main thread was running (possibly half-way through an optimizer step), and
each rank acts on its own. Here the handler only sets a flag; after every training batch the ranks
agree (one all-reduce of a bool) and, if any rank was signalled, all of them save
``<run_dir>/hpc_ckpt_<step>.ckpt`` at the same step, rank 0 runs ``scontrol requeue $SLURM_JOB_ID``
and the trainer stops. ``d4d.fit`` installs this callback, with ``SLURMEnvironment(auto_requeue=False)``,
whenever it runs inside a Slurm batch job; ``resume: auto`` picks the hpc checkpoint up.
"""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from lightning.pytorch import Callback

from d4d.utils.logging import get_logger

log = get_logger(__name__)


class SlurmRequeue(Callback):
    """Checkpoint-and-requeue on ``signum`` (default SIGUSR1). ``requeue=False`` only saves and stops
    (useful outside Slurm and in tests)."""

    def __init__(self, signum: int = signal.SIGUSR1, requeue: bool = True):
        self.signum = int(signum)
        self.requeue = requeue
        self.signalled = False
        self.preempted = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        self.signalled = True

    def on_fit_start(self, trainer, pl_module) -> None:
        self._previous = signal.signal(self.signum, self._handler)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            return
        self.signalled, self.preempted = False, True
        path = Path(trainer.default_root_dir) / f"hpc_ckpt_{trainer.global_step}.ckpt"
        log.info("preemption signal: saving %s and stopping", path)
        trainer.save_checkpoint(path)
        trainer.should_stop = True
        job = os.environ.get("SLURM_JOB_ID")
        if trainer.is_global_zero and self.requeue and job:
            array = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else job
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if result.returncode:
                log.error("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())
            else:
                log.info("requeued Slurm job %s", job)
