"""Exact resume through ``python -m d4d.fit``: a run SIGKILLed after some step and resumed with
``resume: auto`` ends with weights bit-identical to an uninterrupted run (CPU, deterministic)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO, run_module

TINY = '{"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"}'
STEPS = 12  # 3 epochs x 4 episodes


def _args(recipe, run):
    return [str(recipe), "--run_dir", str(run), "--trainer.max_epochs", "3", "--trainer.deterministic", "true",
            "--trainer.enable_progress_bar", "false", "--test_after_fit", "false",
            "--data.init_args.episodes_per_epoch", "4", "--data.init_args.image_size", "32",
            "--data.init_args.num_workers", "1", "--model.init_args.resnet_overrides", TINY,
            "--checkpoint_every_n_steps", "1", "--keep_last_k", "2"]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow  # ~1-3 min on a loaded 2-core CPU
def test_sigkill_and_resume_is_bit_identical(synthetic_data, tmp_path):
    recipe = tmp_path / "classifier.yaml"
    recipe.write_text((REPO / "recipes/debug/classifier.yaml").read_text().replace("data/synthetic", str(synthetic_data)))
    reference = tmp_path / "reference"
    run_module("d4d.fit", *_args(recipe, reference), timeout=600)
    final = f"step{STEPS:08d}.ckpt"
    kept = sorted(p.name for p in (reference / "checkpoints").glob("step*.ckpt"))
    assert kept == [f"step{STEPS - 1:08d}.ckpt", final]  # keep_last_k 2

    run = tmp_path / "killed"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "d4d.fit", *_args(recipe, run)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = run / "checkpoints" / "step00000005.ckpt"  # mid-epoch 1 (epochs have 4 steps)
    deadline = time.time() + 300
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and target.exists()
    assert not (run / "checkpoints" / final).exists(), "the run finished before it was killed"
    killed_at = max(int(p.stem[4:]) for p in (run / "checkpoints").glob("step*.ckpt"))
    wandb_id = (run / "wandb_run_id").read_text()
    at_kill = _weights(run / "checkpoints" / f"step{killed_at:08d}.ckpt")

    resumed = run_module("d4d.fit", *_args(recipe, run), "--resume", "auto", timeout=600)
    log = resumed.stdout + resumed.stderr
    assert f"resuming from {run / 'checkpoints'}" in log
    if killed_at % 4:
        assert f"after {killed_at % 4} batches" in log  # the data stream continued mid-epoch
    assert (run / "wandb_run_id").read_text() == wandb_id  # the same wandb run continues

    ref, got = _weights(reference / "checkpoints" / final), _weights(run / "checkpoints" / final)
    assert ref.keys() == got.keys()
    different = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not different, f"killed after step {killed_at}: {len(different)} tensors differ, e.g. {different[:3]}"
    # and the resumed part did train: the weights moved on from the checkpoint it resumed from
    assert any(not torch.equal(v, at_kill[k]) for k, v in got.items() if v.is_floating_point())
