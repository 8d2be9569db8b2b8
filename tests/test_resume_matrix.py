"""Exact resume in every stage, killed in epoch 0 and in a later epoch, with 0 and 2 loader workers.

Each case trains a debug recipe for 3 epochs of 4 steps through ``python -m d4d.fit``, once
uninterrupted (in parallel with the rest), and once SIGKILLed at the start of step 2 (epoch 0),
resumed with ``--resume auto``, SIGKILLed again at the start of step 6 (epoch 1) and resumed to the
end. A test callback
(:mod:`tests.batch_digests`) writes a digest of every training batch: every batch any of the three
processes trained on equals the uninterrupted run's batch at that position, and the final weights
are bit-identical.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

EPOCHS, STEPS_PER_EPOCH = 3, 4
KILLS = (2, 6)  # global steps at whose start the run is killed: inside epoch 0, inside epoch 1
TINY_RESNET = '{"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"}'

# per stage: the debug recipe and the options that make an epoch STEPS_PER_EPOCH steps
STAGES = {
    "classifier": ("classifier", ["--data.init_args.episodes_per_epoch", str(STEPS_PER_EPOCH),
                                  "--data.init_args.image_size", "32",
                                  "--model.init_args.resnet_overrides", TINY_RESNET]),
    "dynamic": ("dynamic", ["--data.init_args.epoch_length", str(4 * STEPS_PER_EPOCH)]),  # batch 4
    "static": ("static", ["--data.init_args.epoch_length", str(2 * STEPS_PER_EPOCH)]),    # batch 2
    "4dgen": ("4dgen_224_linear", ["--data.init_args.epoch_length", str(8 * STEPS_PER_EPOCH)]),  # batch 8
}


def _args(recipe, run, workers: int, extra: list[str], digests, kill_at: int = -1) -> list[str]:
    callback = {"class_path": "tests.batch_digests.BatchDigests",
                "init_args": {"path": str(digests), "kill_at_step": kill_at}}
    # a CSV logger: wandb's service would add seconds to each of the 4 processes a case starts
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run)}}
    return [str(recipe), "--run_dir", str(run), "--trainer.max_epochs", str(EPOCHS), "--trainer.max_steps", "-1",
            "--trainer.deterministic", "true", "--trainer.enable_progress_bar", "false",
            "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
            "--test_after_fit", "false", f"--trainer.logger={json.dumps(logger)}",
            "--data.init_args.num_workers", str(workers), *extra,
            "--checkpoint_every_n_steps", "1", "--keep_last_k", "2",
            f"--trainer.callbacks+={json.dumps(callback)}"]


def _fit(args: list[str], log) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    return subprocess.Popen([sys.executable, "-m", "d4d.fit", *args], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, log, expected: int) -> str:
    proc.wait(600)
    text = log.read_text()
    assert proc.returncode == expected, f"d4d.fit returned {proc.returncode}, expected {expected}:\n{text[-3000:]}"
    return text


def _read(path) -> list[tuple[int, int, int, str]]:
    rows = [line.split() for line in path.read_text().splitlines()]
    return [(int(e), int(b), int(s), d) for e, b, s, d in rows]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.fixture(scope="module")
def recipes(synthetic_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("recipes")
    for name, _ in STAGES.values():
        text = (REPO / "recipes" / "debug" / f"{name}.yaml").read_text()
        (out / f"{name}.yaml").write_text(text.replace("data/synthetic", str(synthetic_data)))
    return out


@pytest.mark.slow  # ~1 min per case on a loaded 2-core CPU
@pytest.mark.parametrize("workers", [0, 2], ids=lambda w: f"{w}workers")
@pytest.mark.parametrize("stage", list(STAGES))
def test_killed_in_epoch_0_and_later_resumes_bit_identical(stage, workers, recipes, tmp_path):
    name, extra = STAGES[stage]
    recipe = recipes / f"{name}.yaml"
    total = EPOCHS * STEPS_PER_EPOCH

    # The uninterrupted run goes in parallel with the interrupted chain (one process each: 2 cores)
    reference, ref_digests, ref_log = tmp_path / "reference", tmp_path / "reference.digests", tmp_path / "ref.log"
    with open(ref_log, "w") as out:
        ref_proc = _fit(_args(recipe, reference, workers, extra, ref_digests), out)
    try:
        run, digests = tmp_path / "killed", tmp_path / "killed.digests"
        for i, kill_at in enumerate((*KILLS, -1)):
            log = tmp_path / f"part{i}.log"
            with open(log, "w") as out:
                proc = _fit(_args(recipe, run, workers, extra, digests, kill_at=kill_at)
                            + (["--resume", "auto"] if i else []), out)
            text = _wait(proc, log, -9 if kill_at >= 0 else 0)
        _wait(ref_proc, ref_log, 0)
    finally:
        if ref_proc.poll() is None:
            ref_proc.kill()
            ref_proc.wait()
    assert f"after {KILLS[1] % STEPS_PER_EPOCH} batches" in text  # the last part continued mid-epoch

    expected = {(s, d) for _, _, s, d in _read(ref_digests)}
    steps = sorted(s for s, _ in expected)
    assert steps == list(range(total)), f"the reference trained steps {steps}"
    by_step = dict(expected)
    # the digests tell batches apart (a few repeats are chance: the static stage draws pairs of
    # 8-frame windows from the 12 static clips of the test data)
    assert len(set(by_step.values())) > total // 2

    seen = _read(digests)
    assert [s for _, _, s, _ in seen] == list(range(KILLS[0])) + list(range(KILLS[0], KILLS[1])) + \
        list(range(KILLS[1], total)), "each process started at the step its checkpoint ended"
    wrong = [(e, b, s) for e, b, s, d in seen if by_step[s] != d]
    assert not wrong, f"{len(wrong)} of {len(seen)} batches differ from the uninterrupted run, e.g. " \
                      f"(epoch, batch, step) {wrong[:4]}"

    final = f"step{total:08d}.ckpt"
    kept = sorted(p.name for p in (run / "checkpoints").glob("step*.ckpt"))
    assert kept == [f"step{total - 1:08d}.ckpt", final]  # keep_last_k 2, across the three processes
    ref, got = _weights(reference / "checkpoints" / final), _weights(run / "checkpoints" / final)
    assert ref.keys() == got.keys()
    different = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not different, f"{len(different)} tensors differ after two resumes, e.g. {different[:3]}"
