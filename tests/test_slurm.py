"""slurm/train_*.sh on a real two-node Slurm (tests/slurm_cluster.py): DDP over 2 nodes x 1 task on
CPU to completion with identical weights on both ranks, preemption (SIGUSR1 -> checkpoint ->
requeue -> resume in the same wandb run) and the task-layout check."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.slurm_cluster import _free_ports, slurm_cluster  # noqa: F401 - the fixture

TINY = '{"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"}'
FOURDGEN = REPO / "recipes" / "debug" / "4dgen_224_linear.yaml"


def _recipe(synthetic_data: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """The 4D generator's debug recipe once it exists, else the classifier's, on the test shards,
    with overrides that keep a run to a few seconds per step."""
    source = FOURDGEN if FOURDGEN.is_file() else REPO / "recipes" / "debug" / "classifier.yaml"
    if os.environ.get("D4D_SLURM_TEST_RECIPE"):  # e.g. recipes/debug/classifier.yaml
        source = REPO / os.environ["D4D_SLURM_TEST_RECIPE"]
    recipe = tmp_path / source.name
    recipe.write_text(source.read_text().replace("data/synthetic", str(synthetic_data)))
    common = ["--test_after_fit", "false", "--trainer.enable_progress_bar", "false",
              "--data.init_args.num_workers", "0"]
    if source.name == "classifier.yaml":
        # no validation: the test shards hold a single val shard, which only one of two ranks can read
        return recipe, common + ["--data.init_args.image_size", "32", "--model.init_args.resnet_overrides", TINY,
                                 "--trainer.limit_val_batches", "0"]
    return recipe, common + ["--trainer.limit_val_batches", "0"]


def _submit(cluster, recipe, run_dir, sbatch_args, fit_args, out):
    env = {"RECIPE": str(recipe), "RUN_DIR": str(run_dir), "PYTHON": str(REPO / ".venv" / "bin" / "python"),
           "WANDB_MODE": "offline", "WANDB_SILENT": "true", "MASTER_PORT": str(_free_ports(1)[0])}
    if not Path(env["PYTHON"]).exists():
        import sys
        env["PYTHON"] = sys.executable
    return cluster.sbatch("slurm/train_4dgen.sh", f"--output={out}", "--cpus-per-task=1", *sbatch_args,
                          script_args=fit_args, env=env, cwd=REPO)


def test_two_nodes_ddp_to_completion(slurm_cluster, synthetic_data, tmp_path):  # noqa: F811
    recipe, args = _recipe(synthetic_data, tmp_path)
    run, weights, out = tmp_path / "run", tmp_path / "weights", tmp_path / "job.out"
    args += ["--trainer.max_steps", "4", "--trainer.max_epochs", "-1", "--checkpoint_every_n_steps", "2",
             "--trainer.callbacks+=tests.slurm_cluster.SaveRankWeights",
             "--trainer.callbacks.dirpath", str(weights)]
    job = _submit(slurm_cluster, recipe, run, ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1"], args, out)
    info = slurm_cluster.wait(job, timeout=400)
    log = out.read_text()
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert "2 nodes x 1 tasks" in log
    assert "GLOBAL_RANK: 1" in log or "MEMBER: 2/2" in log  # Lightning's DDP start-up lines
    ranks = [torch.load(weights / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    steps = sorted(p.name for p in (run / "checkpoints").glob("step*.ckpt"))
    assert steps == ["step00000002.ckpt", "step00000004.ckpt"]
    saved = torch.load(run / "checkpoints" / "step00000004.ckpt", weights_only=False)
    assert saved["global_step"] == 4
    assert all(torch.equal(saved["state_dict"][k], ranks[0][k]) for k in ranks[0])


@pytest.mark.slow  # ~1-3 min on a loaded 2-core CPU
def test_preemption_requeues_and_resumes(slurm_cluster, synthetic_data, tmp_path):  # noqa: F811
    recipe, args = _recipe(synthetic_data, tmp_path)
    run, out = tmp_path / "run", tmp_path / "job.out"
    args += ["--trainer.max_steps", "10", "--trainer.max_epochs", "-1", "--checkpoint_every_n_steps", "2"]
    job = _submit(slurm_cluster, recipe, run, ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1"], args, out)
    deadline = time.time() + 300
    while not list((run / "checkpoints").glob("step*.ckpt")) and time.time() < deadline:
        assert slurm_cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), out.read_text()[-3000:]
        time.sleep(0.5)
    wandb_id = (run / "wandb_run_id").read_text()
    slurm_cluster.run("scancel", "--signal=USR1", str(job))  # what --signal=USR1@180 does before the limit
    info = slurm_cluster.wait(job, timeout=500)
    log = out.read_text()
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert int(info["Restarts"]) == 1, info
    hpc = sorted(run.glob("hpc_ckpt_*.ckpt"))
    assert len(hpc) == 1, log[-3000:]
    assert "preemption signal: saving" in log and "requeued Slurm job" in log
    assert "(restart 1)" in log
    saved = torch.load(run / "checkpoints" / "step00000010.ckpt", weights_only=False)
    assert saved["global_step"] == 10
    stopped_at = torch.load(hpc[0], weights_only=False)["global_step"]
    assert 0 < stopped_at < 10
    # the requeued job resumed from the preemption checkpoint (or a step checkpoint of that same step)
    resumed_from = re.search(r"resuming from (\S+\.ckpt)", log.split("(restart 1)")[1]).group(1)
    # a step checkpoint it resumed from may since have been pruned by keep_last_k: its name holds the step
    named = re.fullmatch(r"step(\d+)\.ckpt", Path(resumed_from).name)
    resumed_step = int(named.group(1)) if named else torch.load(resumed_from, weights_only=False)["global_step"]
    assert resumed_step == stopped_at
    assert (run / "wandb_run_id").read_text() == wandb_id
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2  # two sessions of one run id
    assert all(wandb_id.strip() in p.name for p in (run / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("sbatch_args, message", [
    (["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=1"], "2 tasks per node but 1 GPUs per node"),
    (["--nodes=2", "--ntasks=3", "--ntasks-per-node=2", "--gpus-per-node=1"], "is uneven"),
], ids=["tasks-vs-gpus", "uneven-tasks"])
def test_layout_mismatch_is_a_clear_error(slurm_cluster, synthetic_data, tmp_path, sbatch_args, message):  # noqa: F811
    recipe, args = _recipe(synthetic_data, tmp_path)
    out = tmp_path / "job.out"
    job = _submit(slurm_cluster, recipe, tmp_path / "run", sbatch_args, args, out)
    info = slurm_cluster.wait(job, timeout=120)
    log = out.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"].startswith("2:"), log
    assert f"d4d slurm: error: Slurm task layout" in log and message in log, log
    assert "d4d.fit" not in log  # nothing was launched
