"""The path GPU users take, run for real on this CPU: every debug recipe through ``d4d.fit`` with
Lightning's own DeepSpeed strategy (d4d's subclass) on DeepSpeed's CPU accelerator and gloo
(``tests/deepspeed_cpu.py``, a test shim), ZeRO-2 and ZeRO-3 on 2 ranks, ``bf16-mixed`` and
``32-true``, activation checkpointing from the recipe; one case per recipe also saves, resumes with
``--resume auto`` and exports. Every debug recipe also runs with plain ``bf16-mixed`` (CPU autocast) and
with ``--trainer.devices 2 --trainer.strategy ddp`` launched the way Lightning launches it (rank 1
re-runs the command line). The synthetic validation split is one shard, so every 2-rank run also
checks that a rank with no validation shard of its own still validates (ZeRO-3 hung there).

What only a GPU can show (speed, memory, NCCL, fused kernels) is not claimed here.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_module

DEBUG = REPO / "recipes" / "debug"
RECIPES = ["classifier", "dynamic", "static", "4dgen_224_linear", "4dgen_512_dpt"]
TINY_RESNET = '{"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"}'
# a few optimizer steps of each stage at its debug size, one validation batch
SHORT = {
    "classifier": ["--data.init_args.image_size", "32", "--test_after_fit", "false", "--trainer.max_epochs", "1",
                   "--data.init_args.episodes_per_epoch", "2", "--model.init_args.resnet_overrides", TINY_RESNET],
    "dynamic": ["--data.init_args.epoch_length", "8", "--model.init_args.val_samples", "1",
                "--model.init_args.val_steps", "2"],
    "static": ["--data.init_args.epoch_length", "4", "--model.init_args.val_sample_steps", "2"],
    "4dgen_224_linear": ["--data.init_args.epoch_length", "16"],
    "4dgen_512_dpt": ["--data.init_args.epoch_length", "16"],
}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def deepspeed_cpu_ops():
    """DeepSpeed's CPU communication op, compiled once (about a minute, cached in ~/.cache) before the
    2-rank runs, so that no run spends its time limit compiling it, and two ranks never wait on
    each other's half-built copy."""
    code = ("import os; os.environ['DS_ACCELERATOR'] = 'cpu'\n"
            "from deepspeed.comm.torch import build_shm_op\nassert build_shm_op() is not None")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]


def local_recipe(name: str, data: Path, tmp_path: Path) -> Path:
    """A copy of a debug recipe whose data paths point at the test's synthetic shards."""
    out = tmp_path / f"{name}.yaml"
    out.write_text((DEBUG / f"{name}.yaml").read_text().replace("data/synthetic", str(data)))
    return out


def fit(name: str, data: Path, tmp_path: Path, run: Path, *args: str, max_steps: int = 2,
        check: bool = True) -> subprocess.CompletedProcess:
    proc = run_module("tests.deepspeed_cpu", str(local_recipe(name, data, tmp_path)), "--run_dir", str(run),
                      "--trainer.max_steps", str(max_steps), "--trainer.limit_val_batches", "1",
                      "--data.init_args.num_workers", "0", "--checkpoint_every_n_steps", "1",
                      *SHORT[name], *args, timeout=600, check=check)
    if check:
        assert "Traceback" not in proc.stderr
    return proc


def step_checkpoints(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("step*.ckpt"))


def deepspeed_state(ckpt: Path) -> dict:
    """Lightning's client state of a DeepSpeed checkpoint directory (global step, loops, callbacks)."""
    # ZeRO-1/2: mp_rank_00_model_states.pt; ZeRO-3: zero_pp_rank_<r>_mp_rank_00_model_states.pt per rank
    files = sorted((ckpt / "checkpoint").glob("*mp_rank_00_model_states.pt"))
    assert files, f"no model states in {ckpt}"
    return torch.load(files[0], map_location="cpu", weights_only=False)


def check_zero_checkpoint(ckpt: Path, precision: str, steps: int) -> None:
    assert ckpt.is_dir(), f"{ckpt} is not a DeepSpeed checkpoint directory"
    shards = sorted(p.name for p in (ckpt / "checkpoint").glob("*optim_states.pt"))
    assert len(shards) == 2, shards  # one optimizer shard per rank
    bf16 = all(s.startswith("bf16_zero_pp_rank") for s in shards)  # DeepSpeed's bf16 optimizer
    assert bf16 == (precision == "bf16-mixed"), shards
    state = deepspeed_state(ckpt)
    assert state["global_step"] == steps


@pytest.mark.parametrize("name", RECIPES)
# with the resume test below: ZeRO-2 and ZeRO-3 each with bf16-mixed, ZeRO-3 also 32-true (ZeRO-2 + 32-true, the
# combination that worked before, is left out to keep the suite's time)
@pytest.mark.parametrize("zero,precision", [("zero2", "bf16-mixed"), ("zero3", "32-true")])
def test_deepspeed_trains(name, zero, precision, synthetic_data, tmp_path, deepspeed_cpu_ops):
    run = tmp_path / "run"
    proc = fit(name, synthetic_data, tmp_path, run, "--deepspeed", zero, "--trainer.devices", "2",
               "--trainer.precision", precision)
    assert "activation checkpointing: wrapped" in proc.stderr or name == "classifier"
    check_zero_checkpoint(step_checkpoints(run)[-1], precision, 2)


@pytest.mark.parametrize("name", RECIPES)
def test_deepspeed_zero3_bf16_saves_resumes_and_exports(name, synthetic_data, tmp_path, deepspeed_cpu_ops):
    """ZeRO-3 + bf16 + activation checkpointing: 3 steps (into the second epoch), then ``--resume auto``
    continues the sharded weights and optimizer to step 4, then ``d4d.export_checkpoint`` gives one
    fp32 file whose weights are finite and unprefixed. (Whether the data stream continues exactly is
    issue 19's resume matrix; here max_epochs is high so only max_steps ends the runs.)"""
    run = tmp_path / "run"
    common = ["--deepspeed", "zero3", "--trainer.devices", "2", "--trainer.precision", "bf16-mixed",
              "--trainer.max_epochs", "10"]
    fit(name, synthetic_data, tmp_path, run, *common, max_steps=3)
    check_zero_checkpoint(step_checkpoints(run)[-1], "bf16-mixed", 3)
    resumed = fit(name, synthetic_data, tmp_path, run, *common, "--resume", "auto", max_steps=4)
    assert f"resuming from {run / 'checkpoints'}" in resumed.stderr
    check_zero_checkpoint(step_checkpoints(run)[-1], "bf16-mixed", 4)

    out = tmp_path / "export.pt"
    run_module("d4d.export_checkpoint", str(run), str(out), timeout=300)
    state = torch.load(out, map_location="cpu", weights_only=True)["state_dict"]
    assert state and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state.values()
                         if v.is_floating_point())
    assert not any("_checkpoint_wrapped_module" in k or k.startswith("_forward_module.") for k in state)


@pytest.mark.parametrize("name", RECIPES)
def test_plain_bf16_mixed_autocast(name, synthetic_data, tmp_path):
    """``bf16-mixed`` without DeepSpeed is CPU autocast here (CUDA autocast on a GPU): the camera
    geometry inside every stage must not mix bf16 and float32."""
    run = tmp_path / "run"
    fit(name, synthetic_data, tmp_path, run, "--trainer.precision", "bf16-mixed")
    assert step_checkpoints(run)


@pytest.mark.parametrize("name", RECIPES)
def test_ddp_two_devices_launched_by_lightning(name, synthetic_data, tmp_path):
    """``--trainer.devices 2 --trainer.strategy ddp`` outside srun/torchrun: Lightning starts rank 1
    by running the command line again, which must still hold the recipe and the overrides."""
    run = tmp_path / "run"
    proc = fit(name, synthetic_data, tmp_path, run, "--trainer.strategy", "ddp", "--trainer.devices", "2")
    assert "MEMBER: 2/2" in proc.stderr  # rank 1 joined
    ckpt = step_checkpoints(run)[-1]
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 2


def test_one_pass_training_on_two_ranks_is_a_clear_error(synthetic_data, tmp_path):
    """Without ``epoch_length`` each rank reads its share of the shards once, so ranks take different
    step counts and the first to finish waits forever: refused before anything starts."""
    args = [a for a in SHORT["dynamic"]]
    args[args.index("--data.init_args.epoch_length") + 1] = "null"
    recipe = local_recipe("dynamic", synthetic_data, tmp_path)
    proc = run_module("tests.deepspeed_cpu", str(recipe), "--run_dir", str(tmp_path / "run"),
                      "--trainer.strategy", "ddp", "--trainer.devices", "2", "--data.init_args.num_workers", "0",
                      *args, check=False, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("d4d.fit: error: ") and "data.epoch_length" in last and "2 processes" in last
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_deepspeed_bf16_on_precomputed_latents(synthetic_data, tmp_path, deepspeed_cpu_ops):
    """The dynamic stage's other data path (latents encoded once by ``data_prep.precompute_latents``)
    under ZeRO-2 + bf16: its float32 latents, CLIP and text states enter bf16 modules."""
    import json

    import yaml

    recipe = yaml.safe_load((DEBUG / "dynamic.yaml").read_text())
    tiny = recipe["model"]["init_args"]["tiny"]
    for split in ("train", "val"):
        run_module("data_prep.precompute_latents", "--shards", str(synthetic_data / split), "--out",
                   str(tmp_path / split), "--tiny", json.dumps(tiny), "--frames", "5", "--size", "32", "32",
                   "--per-file", "8", *(["--eval-windows"] if split == "val" else []), timeout=300)
    recipe["data"] = {"class_path": "d4d.data.clip_datamodule.PrecomputedClipDataModule",
                      "init_args": {"train_dir": str(tmp_path / "train"), "val_dir": str(tmp_path / "val"),
                                    "batch_size": 2, "num_workers": 0, "steps_per_epoch": 4}}
    path = tmp_path / "precomputed.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    proc = run_module("tests.deepspeed_cpu", str(path), "--run_dir", str(run), "--trainer.max_steps", "2",
                      "--trainer.limit_val_batches", "1", "--checkpoint_every_n_steps", "1", "--deepspeed", "zero2",
                      "--trainer.devices", "2", "--trainer.precision", "bf16-mixed", timeout=600)
    assert "Traceback" not in proc.stderr
    check_zero_checkpoint(step_checkpoints(run)[-1], "bf16-mixed", 2)


def test_dynamic_deepspeed_checkpoint_holds_only_trainable_weights(synthetic_data, tmp_path, deepspeed_cpu_ops):
    """On a pretrained backbone (here a tiny one saved as Wan-format files), the dynamic stage's
    DeepSpeed checkpoints leave out the frozen weights (issue 18: ~46 GB per checkpoint at full size);
    the run resumes from them and the exported file samples, the frozen part coming from the backbone."""
    from d4d.models.dynamic import build_tiny_wan, save_wan
    from d4d.modules.dynamic import DynamicVideoModule
    from d4d.video.interface import VideoRequest
    from d4d.video.paths import resolve_camera_path

    wan = tmp_path / "tiny-wan"
    save_wan(build_tiny_wan(seed=1), wan)
    run = tmp_path / "run"
    common = ["--model.init_args.backbone", str(wan), "--model.init_args.tiny", "null", "--deepspeed", "zero2",
              "--trainer.devices", "2", "--trainer.precision", "bf16-mixed", "--trainer.max_epochs", "10"]
    fit("dynamic", synthetic_data, tmp_path, run, *common, max_steps=2)
    state = deepspeed_state(step_checkpoints(run)[-1])
    saved = {k.removeprefix("_forward_module.") for k in state["module"]}
    hp = {k: v for k, v in state["hyper_parameters"].items() if not k.startswith("_")}
    module = DynamicVideoModule(**{k: v for k, v in hp.items() if k not in ("optimizer", "scheduler")})
    params = {n: p for n, p in module.named_parameters()}
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable and saved & params.keys() == trainable  # every trainable weight, no frozen one
    assert any(k.startswith("model.transformer.") for k in params.keys() - trainable)

    resumed = fit("dynamic", synthetic_data, tmp_path, run, *common, "--resume", "auto", max_steps=3)
    assert f"resuming from {run / 'checkpoints'}" in resumed.stderr
    check_zero_checkpoint(step_checkpoints(run)[-1], "bf16-mixed", 3)

    out = tmp_path / "export.pt"
    run_module("d4d.export_checkpoint", str(run), str(out), timeout=300)
    exported = torch.load(out, map_location="cpu", weights_only=True)["state_dict"]
    assert exported.keys() & params.keys() == trainable
    loaded = DynamicVideoModule.from_checkpoint(out)
    frozen = next(n for n in params.keys() - trainable if n.startswith("model.transformer."))
    assert torch.equal(dict(loaded.named_parameters())[frozen], params[frozen])  # from the backbone
    torch.manual_seed(0)
    request = VideoRequest(image=torch.rand(3, 32, 32), camera=resolve_camera_path("turn_right", 5, 32, 32),
                           prompt="a box", num_steps=2, seed=0)
    frames = loaded.generate(request).frames
    assert frames.shape == (5, 3, 32, 32) and torch.isfinite(frames).all()
