"""slurm/common.sh's d4d_train without a cluster (``srun`` replaced by a shell function that prints
what it would run): the progress bar of a training job refreshes every PROGRESS_EVERY batches, not
after every batch into the log. The real-cluster runs are in tests/test_slurm.py."""
from __future__ import annotations

import subprocess

import pytest

from tests.conftest import REPO

SLURM_ENV = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
             "SLURM_GPUS_ON_NODE": "2", "MASTER_ADDR": "127.0.0.1", "PATH": "/usr/bin:/bin"}


def _launch(extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    script = ('source slurm/common.sh; srun() { echo "TQDM_MINITERS=$TQDM_MINITERS srun $*"; }; '
              'STAGE=classifier; DEFAULT_RECIPE=recipes/debug/classifier.yaml; d4d_train --trainer.max_steps 3')
    return subprocess.run(["bash", "-c", script], cwd=REPO, env={**SLURM_ENV, **extra_env},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("env, every", [({}, "50"), ({"PROGRESS_EVERY": "200"}, "200"), ({"PROGRESS_EVERY": "1"}, "1")])
def test_training_jobs_refresh_the_progress_bar_every_n_batches(env, every):
    out = _launch(env)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith(f"TQDM_MINITERS={every} srun ")
    assert "-m d4d.fit recipes/debug/classifier.yaml --trainer.num_nodes 1 --trainer.devices 2" in line


def test_bad_progress_every_is_one_line():
    out = _launch({"PROGRESS_EVERY": "often"})
    assert out.returncode == 2
    assert out.stderr.strip() == "d4d slurm: error: PROGRESS_EVERY often: expected an integer >= 1"


def test_lightning_reads_the_variable(monkeypatch):
    from lightning.pytorch.callbacks import TQDMProgressBar

    monkeypatch.setenv("TQDM_MINITERS", "50")
    assert TQDMProgressBar().refresh_rate == 50  # the bar Trainer adds by default
    assert TQDMProgressBar(refresh_rate=100).refresh_rate == 100  # a recipe's larger value is kept
