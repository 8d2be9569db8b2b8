"""One run per run directory (a lock with stale-lock takeover), ``--resume`` checked against the
recipe's stage before any logger starts, temporaries of killed writes cleaned, and keep-last-k
applied over the step checkpoints on disk across a resume."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from d4d.utils.run_lock import LOCK_NAME
from tests.conftest import REPO, run_module

TINY = '{"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"}'


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch):
    # offline through the logger's own argument (_args)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture()
def recipe(synthetic_data, tmp_path):
    path = tmp_path / "classifier.yaml"
    path.write_text((REPO / "recipes/debug/classifier.yaml").read_text().replace("data/synthetic", str(synthetic_data)))
    return path


def _args(recipe, run, *extra):
    return [str(recipe), "--run_dir", str(run), "--trainer.enable_progress_bar", "false", "--test_after_fit", "false",
            "--data.init_args.episodes_per_epoch", "2", "--data.init_args.image_size", "32",
            "--data.init_args.num_workers", "0", "--model.init_args.resnet_overrides", TINY,
            "--trainer.limit_val_batches", "1", "--trainer.logger.init_args.offline", "true", *extra]


def _fit(capsys, *args) -> tuple[int, str]:
    from d4d.fit import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code
    # library console handlers made during an earlier test write to that test's closed stderr: the
    # "--- Logging error ---" reports of that are the harness's, not the command's
    err = re.sub(r"--- Logging error ---\n.*?\nArguments: [^\n]*\n", "", capsys.readouterr().err, flags=re.S)
    assert "Traceback" not in err, err[-3000:]
    return code, ([ln for ln in err.splitlines() if ln.strip()] or [""])[-1]


def _fit_process(*args) -> int:
    """A whole run in a process of its own: Lightning's offline switch for wandb is WANDB_MODE, which
    wandb reads only when its process-wide settings are made (an earlier test of this session may
    have made them already)."""
    proc = run_module("d4d.fit", *args, check=False, timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.returncode


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


_SLEEPERS: list[subprocess.Popen] = []


def _sleeper() -> subprocess.Popen:
    """A live process on this host that is not this one nor its parent."""
    if not _SLEEPERS or _SLEEPERS[0].poll() is not None:
        _SLEEPERS[:] = [subprocess.Popen(["sleep", "120"])]
    return _SLEEPERS[0]


def teardown_module():
    for proc in _SLEEPERS:
        proc.kill()
        proc.wait()


def _write_lock(run, **holder):
    run.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": 1, "start_ticks": None, "slurm_job_id": None,
              "started": "2026-01-01 00:00:00", **holder}
    (run / LOCK_NAME).write_text(json.dumps(record))


def test_second_run_on_a_run_dir_stops_naming_the_first_and_a_killed_run_is_taken_over(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    env = dict(os.environ)
    first = subprocess.Popen([sys.executable, "-m", "d4d.fit", *_args(recipe, run, "--trainer.max_epochs", "1000")],
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        config = run / "config.yaml"  # written whole once the trainer is set up
        while not (config.exists() and "keep_last_k" in config.read_text()) and first.poll() is None \
                and time.time() < deadline:
            time.sleep(0.1)
        assert first.poll() is None and (run / LOCK_NAME).exists()
        config = config.read_text()
        code, line = _fit(capsys, *_args(recipe, run, "--trainer.max_steps", "1", "--trainer.max_epochs", "7"))
        assert code == 2
        assert line.startswith("d4d.fit: error: ") and f"run_dir {run}: another run is using it (pid {first.pid} on" in line
        assert (run / "config.yaml").read_text() == config  # the second run wrote nothing
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == first.pid  # a kill leaves the lock behind
    (run / "checkpoints").mkdir(exist_ok=True)
    stale = [run / "checkpoints" / "step00000007.ckpt.tmp4242", run / "checkpoints" / "step00000009.ckpt.tmp",
             run / ".wandb_run_id.tmp4242"]
    stale[0].write_bytes(b"half a checkpoint")
    stale[1].mkdir()  # a DeepSpeed checkpoint directory caught before its rename
    stale[2].write_text("x")
    assert _fit_process(*_args(recipe, run, "--trainer.max_steps", "1", "--checkpoint_every_n_steps", "1")) == 0
    assert not any(p.exists() for p in stale)
    assert (run / "checkpoints" / "step00000001.ckpt").is_file()
    assert not (run / LOCK_NAME).exists()  # released when the run ends


@pytest.mark.parametrize("holder, taken", [
    (lambda: {"pid": _dead_pid()}, True),  # this host, process gone
    (lambda: {"pid": _sleeper().pid, "start_ticks": "1"}, True),  # PID reused by another process
    (lambda: {"pid": _sleeper().pid}, False),  # alive
    (lambda: {"pid": 12345, "host": "node-elsewhere"}, False),  # cannot be checked from here
    (lambda: {"pid": 12345, "host": "node-elsewhere", "slurm_job_id": "777"}, True),  # requeued job
])
def test_stale_lock_rules(tmp_path, monkeypatch, holder, taken):
    from d4d.utils.errors import UserError
    from d4d.utils.run_lock import RunDirLock

    monkeypatch.setenv("SLURM_JOB_ID", "777")
    run = tmp_path / "run"
    _write_lock(run, **holder())
    lock = RunDirLock(run)
    if taken:
        lock.acquire()
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
        lock.release()
        assert not (run / LOCK_NAME).exists()
    else:
        with pytest.raises(UserError, match="another run is using it"):
            lock.acquire()
        assert (run / LOCK_NAME).exists()


def test_run_dir_that_is_a_file_is_one_line(recipe, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, line = _fit(capsys, *_args(recipe, tmp_path / "file" / "run", "--trainer.max_steps", "1"))
    assert code == 2 and "run_dir" in line and "not a directory" in line
    code, line = _fit(capsys, *_args(recipe, tmp_path / "file", "--trainer.max_steps", "1"))
    assert code == 2 and "run_dir" in line and "not a directory" in line


@pytest.mark.parametrize("kind", ["other_stage", "weights_only_export", "not_torch"])
def test_resume_with_a_foreign_checkpoint_is_refused_before_any_logger(recipe, tmp_path, capsys, kind):
    # the logger is offline: had it started, it would have left files in the run directory
    path = tmp_path / "other.ckpt"
    if kind == "other_stage":
        torch.save({"state_dict": {"net.w": torch.zeros(1)}, "loops": {}, "epoch": 0, "global_step": 4,
                    "hyper_parameters": {"_class_path": "d4d.modules.fourdgen.FourDGenModule"}, "d4d_stage": "4dgen"},
                   path)
        expect = "was written by d4d.modules.fourdgen.FourDGenModule, d4d_stage '4dgen', but this recipe trains"
    elif kind == "weights_only_export":
        torch.save({"state_dict": {"model.w": torch.zeros(1)}, "source": "x"}, path)
        expect = "is not a Lightning training checkpoint"
    else:
        path.write_bytes(b"PK\x03\x04 not really")
        expect = "is not a complete Lightning or DeepSpeed checkpoint"
    run = tmp_path / "run"
    args = _args(recipe, run, "--resume", str(path), "--trainer.max_steps", "1")
    code, line = _fit(capsys, *args)
    assert code == 2 and expect in line, line
    assert not (run / "wandb").exists() and not (run / "wandb_run_id").exists()


def test_keep_last_k_holds_over_the_disk_across_a_resume(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert _fit_process(*_args(recipe, run, "--trainer.max_steps", "3", "--checkpoint_every_n_steps", "1",
                               "--keep_last_k", "3")) == 0
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step*.ckpt")) == [f"step{i:08d}.ckpt" for i in (1, 2, 3)]
    assert _fit_process(*_args(recipe, run, "--trainer.max_steps", "5", "--checkpoint_every_n_steps", "1",
                               "--keep_last_k", "2", "--resume", "auto")) == 0
    assert sorted(p.name for p in ckpts.glob("step*.ckpt")) == [f"step{i:08d}.ckpt" for i in (4, 5)]


def test_a_rank_started_by_the_lock_holder_passes_without_taking_it(tmp_path):
    """Lightning starts ranks 1.. of a one-node run by re-running the command line: a child of the
    holder is part of its run (whatever rank variables its environment carries)."""
    from d4d.utils.run_lock import RunDirLock

    run = tmp_path / "run"
    _write_lock(run, pid=os.getppid())
    before = (run / LOCK_NAME).read_text()
    lock = RunDirLock(run).acquire()
    assert not lock.held
    lock.release()
    assert (run / LOCK_NAME).read_text() == before
