"""d4d.fit's checkpoint options: atomic writes survive SIGKILL, ``resume: auto`` picks the newest
complete checkpoint, bad ``resume``/``init_from``/``deepspeed`` values are one-line errors,
``init_from`` reports missing/unexpected keys, activation checkpointing wraps the named blocks."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch

from d4d.callbacks.checkpointing import atomic_torch_save
from d4d.fit import build_cli
from d4d.utils.errors import UserError
from d4d.utils.resume import init_weights_from, is_valid_checkpoint, latest_checkpoint, resolve_resume
from tests.conftest import REPO, run_module

DEBUG = str(REPO / "recipes" / "debug" / "classifier.yaml")
TINY = '{"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"}'

SAVER = """
import sys, torch
from d4d.callbacks.checkpointing import atomic_torch_save
big = torch.arange(4_000_000, dtype=torch.float64)
i = 0
while True:
    i += 1
    atomic_torch_save({"i": i, "data": big + i}, sys.argv[1])
    print(i, flush=True)
"""


def test_sigkill_during_saves_leaves_a_complete_checkpoint(tmp_path):
    """A writer saving 32 MB checkpoints in a loop is killed at random moments: the file under the
    final name always loads (the previous or the new checkpoint), never a truncated one."""
    path = tmp_path / "ckpts" / "step.ckpt"
    for delay in (0.9, 1.3, 1.7):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert proc.stdout.readline().strip() == "1" or path.exists()
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = torch.load(path)
        assert torch.equal(state["data"], torch.arange(4_000_000, dtype=torch.float64) + state["i"])
        assert is_valid_checkpoint(path)
    leftovers = [p for p in path.parent.iterdir() if p != path]
    assert all(".tmp" in p.name and not is_valid_checkpoint(p) for p in leftovers)


def test_latest_checkpoint_skips_incomplete_ones(tmp_path):
    ckpts = tmp_path / "checkpoints"
    atomic_torch_save({"global_step": 2}, ckpts / "step00000002.ckpt")
    time.sleep(0.02)
    atomic_torch_save({"global_step": 4}, ckpts / "step00000004.ckpt")
    assert latest_checkpoint(tmp_path).name == "step00000004.ckpt"
    time.sleep(0.02)
    whole = (ckpts / "step00000004.ckpt").read_bytes()
    (ckpts / "step00000006.ckpt").write_bytes(whole[: len(whole) // 2])  # a copy cut short
    (ckpts / "step00000008.ckpt.tmp123").write_bytes(whole)  # a save in progress
    os.symlink(ckpts / "step00000006.ckpt", ckpts / "last.ckpt")
    assert latest_checkpoint(tmp_path).name == "step00000004.ckpt"
    time.sleep(0.02)
    atomic_torch_save({"global_step": 9}, tmp_path / "hpc_ckpt_9.ckpt")  # Slurm requeue checkpoint
    assert latest_checkpoint(tmp_path).name == "hpc_ckpt_9.ckpt"
    assert resolve_resume("none", tmp_path) is None
    assert resolve_resume("auto", tmp_path / "empty") is None
    with pytest.raises(UserError, match="not a complete"):
        resolve_resume(str(ckpts / "step00000006.ckpt"), tmp_path)
    with zipfile.ZipFile(ckpts / "step00000002.ckpt") as z:
        assert z.namelist()


def _fit_error(*args: str) -> str:
    proc = run_module("d4d.fit", *args, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return [ln for ln in proc.stderr.splitlines() if ln.strip()][-1]


def test_bad_values_are_one_line_errors(tmp_path):
    line = _fit_error(DEBUG, "--resume", str(tmp_path / "missing.ckpt"), "--run_dir", str(tmp_path / "r"))
    assert line.startswith("d4d.fit: error:") and "resume:" in line and "missing.ckpt" in line
    line = _fit_error(DEBUG, "--deepspeed", "zero5", "--run_dir", str(tmp_path / "r"))
    assert "deepspeed: 'zero5'" in line and "zero2" in line and "zero3_offload" in line
    line = _fit_error(DEBUG, "--init_from", str(tmp_path / "w.pt"), "--run_dir", str(tmp_path / "r"))
    assert "init_from" in line and "does not exist" in line


def test_build_adds_checkpointing_and_resume_state(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cli = build_cli(DEBUG, ["--run_dir", str(tmp_path / "run"), "--checkpoint_every_n_steps", "5", "--keep_last_k", "2",
                            "--model.init_args.resnet_overrides", TINY])
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert "ResumeState" in names and "StepCheckpoint" in names
    step = next(c for c in cli.trainer.callbacks if type(c).__name__ == "StepCheckpoint")
    assert step.save_top_k == 2 and step._every_n_train_steps == 5 and step.dirpath == str(tmp_path / "run" / "checkpoints")
    assert type(cli.trainer.strategy.checkpoint_io).__name__ == "AtomicCheckpointIO"
    run_id = (tmp_path / "run" / "wandb_run_id").read_text().strip()
    assert cli.trainer.logger._wandb_init["id"] == run_id
    # a second start without a checkpoint to resume from is a new wandb run
    build_cli(DEBUG, ["--run_dir", str(tmp_path / "run"), "--resume", "auto"])
    assert (tmp_path / "run" / "wandb_run_id").read_text().strip() != run_id


def test_activation_checkpointing_and_init_from(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = ["--run_dir", str(tmp_path / "run"), "--model.init_args.resnet_overrides", TINY]
    source = build_cli(DEBUG, args).model
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("model.head")}
    state["model.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "weights.ckpt")

    cli = build_cli(DEBUG, args + ["--init_from", str(tmp_path / "weights.ckpt"),
                                   "--activation_checkpointing", '["ResNetBasicLayer"]'])
    model = cli.model
    model.configure_model()  # what Lightning calls before wrapping the model in its strategy
    wrapped = [n for n, m in model.named_modules() if type(m).__name__ == "CheckpointWrapper"]
    assert len(wrapped) == 2  # one basic layer per stage in the tiny ResNet
    loaded = model.state_dict()
    assert loaded.keys() == source.state_dict().keys()  # the wrapper leaves state-dict names alone
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k in loaded)
    assert not torch.equal(loaded["model.head.weight"], source.state_dict()["model.head.weight"])
    missing, unexpected = init_weights_from(model, tmp_path / "weights.ckpt")
    assert missing == ["model.head.weight", "model.head.bias"] and unexpected == ["model.extra.weight"]
    model.configure_model()  # called again (e.g. for test): nothing is wrapped twice
    assert len([m for m in model.modules() if type(m).__name__ == "CheckpointWrapper"]) == 2
