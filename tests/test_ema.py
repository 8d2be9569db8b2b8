"""EMA of the trainable weights (``d4d.fit``'s ``ema`` key, :mod:`d4d.callbacks.ema`): the update rule
against a hand computation, the checkpoint keys, exact resume, sampling with ``--weights ema|raw``,
export, ZeRO-3 on two ranks (DeepSpeed's CPU accelerator, ``tests/deepspeed_cpu.py``) and the
one-line errors."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import REPO, run_module
from tests.test_gpu_path import deepspeed_cpu_ops  # noqa: F401  (fixture: DeepSpeed's CPU comm op, built once)

DEBUG = REPO / "recipes" / "debug"
SHORT = {"static": ["--data.init_args.epoch_length", "8", "--model.init_args.val_sample_steps", "2"],
         "dynamic": ["--data.init_args.epoch_length", "8"]}
# start_step 1, every 2 steps, decay 0.5: step 1 copies w1, step 2 keeps it, step 3 averages w3 in,
# step 4 keeps it (a resumed run's first step does no update: its EMA must equal the saved one bit for bit)
EMA_ARGS = ["--ema.decay", "0.5", "--ema.every_n_steps", "2", "--ema.start_step", "1"]


def local_recipe(name: str, data: Path, tmp_path: Path) -> Path:
    out = tmp_path / f"{name}.yaml"
    out.write_text((DEBUG / f"{name}.yaml").read_text().replace("data/synthetic", str(data)))
    return out


def fit(module: str, name: str, data: Path, tmp_path: Path, run: Path, max_steps: int, *args: str):
    proc = run_module(module, str(local_recipe(name, data, tmp_path)), "--run_dir", str(run),
                      "--trainer.max_steps", str(max_steps), "--trainer.max_epochs", "10",
                      "--trainer.limit_val_batches", "0", "--data.init_args.num_workers", "0",
                      "--checkpoint_every_n_steps", "1", "--keep_last_k", "-1",
                      "--trainer.logger.init_args.offline", "true", *SHORT[name], *EMA_ARGS, *args, timeout=600)
    assert "Traceback" not in proc.stderr
    return proc


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def check_hand_computation(c1: dict, c2: dict, c3: dict, c4: dict) -> None:
    """Step checkpoints 1..4 (``state_dict`` fp32 weights, ``ema_state_dict``) against the rule of EMA_ARGS."""
    ema1, ema2, ema3, ema4 = (c["ema_state_dict"] for c in (c1, c2, c3, c4))
    for k, v in ema3.items():
        w1, w3 = c1["state_dict"][k].float(), c3["state_dict"][k].float()
        assert torch.equal(ema1[k], w1) and torch.equal(ema2[k], w1), k  # copy at step 1, nothing at step 2
        torch.testing.assert_close(v, w1 * 0.5 + w3 * 0.5, rtol=1e-6, atol=1e-7)
        assert not torch.equal(v, c3["state_dict"][k].float()) or torch.equal(w1, w3)
        assert torch.equal(ema4[k], v), k  # restored bit for bit; no update at step 4
    assert c3["ema"] == {"decay": 0.5, "every_n_steps": 2, "start_step": 1, "updates": 1, "step": 3}
    assert c4["ema"]["updates"] == 1 and c4["ema"]["step"] == 4


# ------------------------------------------------------------------------------------------ unit
class _Tiny(torch.nn.Module):
    stage = "static"

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(3, 2)
        self.frozen = torch.nn.Linear(3, 3).requires_grad_(False)


def _trainer(step: int) -> SimpleNamespace:
    strategy = SimpleNamespace(broadcast=lambda obj, src=0: obj, root_device=torch.device("cpu"))
    return SimpleNamespace(global_step=step, is_global_zero=True, strategy=strategy)


def test_update_rule_state_and_frozen_weights():
    from d4d.callbacks.ema import EMA

    torch.manual_seed(0)
    module = _Tiny()
    ema = EMA(decay=0.9, every_n_steps=2, start_step=1)
    ema.on_train_start(_trainer(0), module)
    assert set(ema.shadow) == {"body.weight", "body.bias"}  # frozen weights are never copied
    expected = {k: v.detach().clone() for k, v in module.body.named_parameters(prefix="body")}
    saved = None
    for step in range(1, 8):
        with torch.no_grad():
            for p in module.body.parameters():
                p.add_(torch.randn_like(p))
        for batch in range(2):  # two batches per optimizer step: one update only
            ema.on_train_batch_end(_trainer(step), module, None, None, 2 * step + batch)
        for k, p in module.body.named_parameters(prefix="body"):
            if step <= 1:
                expected[k] = p.detach().clone()
            elif (step - 1) % 2 == 0:
                expected[k] = expected[k] * 0.9 + p.detach() * (1 - 0.9)
        for k, v in ema.shadow.items():
            torch.testing.assert_close(v, expected[k], rtol=1e-6, atol=1e-7)
        if step == 4:
            saved = {}
            ema.on_save_checkpoint(_trainer(step), module, saved)
            saved = {k: ({n: t.clone() for n, t in v.items()} if k == "ema_state_dict" else dict(v))
                     for k, v in saved.items()}
            frozen_at_4 = {k: v.clone() for k, v in ema.shadow.items()}
    assert ema.updates == 3 and saved["ema"]["updates"] == 1 and saved["ema"]["step"] == 4
    resumed = EMA(decay=0.9, every_n_steps=2, start_step=1)
    resumed.on_load_checkpoint(_trainer(4), module, saved)
    resumed.on_train_start(_trainer(4), module)
    assert all(torch.equal(resumed.shadow[k], frozen_at_4[k]) for k in frozen_at_4)
    assert (resumed.updates, resumed.step) == (1, 4)


def test_sampling_state_dict_choices():
    from d4d.callbacks.ema import sampling_state_dict
    from d4d.utils.errors import UserError

    raw = {"a": torch.zeros(2), "b": torch.ones(2)}
    ckpt = {"state_dict": raw, "ema_state_dict": {"a": torch.full((2,), 5.0)}}
    state, kind = sampling_state_dict(ckpt, None, "x.ckpt")
    assert kind == "ema" and torch.equal(state["a"], torch.full((2,), 5.0)) and state["b"] is raw["b"]
    assert sampling_state_dict(ckpt, "raw", "x.ckpt") == (raw, "raw")
    assert sampling_state_dict({"state_dict": raw}, None, "x.ckpt") == (raw, "raw")
    with pytest.raises(UserError, match="--weights ema: x.ckpt holds no EMA weights"):
        sampling_state_dict({"state_dict": raw}, "ema", "x.ckpt")


# ------------------------------------------------------------------------------------- d4d.fit
@pytest.mark.slow
def test_static_fit_checkpoint_resume_sampling_and_export(synthetic_data, tmp_path):
    run = tmp_path / "run"
    fit("d4d.fit", "static", synthetic_data, tmp_path, run, 3)
    resumed = fit("d4d.fit", "static", synthetic_data, tmp_path, run, 4, "--resume", "auto")
    assert "ema: restored" in resumed.stderr
    ckpts = [load(run / "checkpoints" / f"step{s:08d}.ckpt") for s in (1, 2, 3, 4)]
    from d4d.modules.static import StaticVideoModule

    module = StaticVideoModule.from_checkpoint(run / "checkpoints" / "step00000004.ckpt", weights="raw")
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(ckpts[3]["ema_state_dict"]) == trainable and trainable < set(ckpts[3]["state_dict"])
    assert not any(k.startswith(("vae.", "image_encoder.")) for k in ckpts[3]["ema_state_dict"])
    check_hand_computation(*ckpts)

    # sampling: EMA weights by default, raw ones on request
    from d4d.sample_video import load_generator

    last = run / "checkpoints" / "step00000004.ckpt"
    ema_module = load_generator(str(last), "cpu")
    params = dict(ema_module.named_parameters())
    assert ema_module.sampling_weights == "ema" and module.sampling_weights == "raw"
    assert all(torch.equal(params[k], v) for k, v in ckpts[3]["ema_state_dict"].items())
    raw_params = dict(module.named_parameters())
    assert all(torch.equal(raw_params[k], ckpts[3]["state_dict"][k]) for k in trainable)
    assert any(not torch.equal(params[k], raw_params[k]) for k in trainable)

    from PIL import Image

    Image.new("RGB", (32, 32), (120, 80, 40)).save(tmp_path / "in.png")
    out = tmp_path / "sample"
    run_module("d4d.sample_video", str(tmp_path / "in.png"), "--checkpoint", str(last), "--out", str(out),
               "--steps", "1", "--device", "cpu", timeout=300)
    assert json.loads((out / "info.json").read_text())["weights"] == "ema"

    # --weights ema on a checkpoint without EMA: one line, exit 2
    plain = {k: v for k, v in load(last).items() if k not in ("ema_state_dict", "ema")}
    torch.save(plain, tmp_path / "plain.ckpt")
    proc = run_module("d4d.sample_video", str(tmp_path / "in.png"), "--checkpoint", str(tmp_path / "plain.ckpt"),
                      "--out", str(tmp_path / "sample2"), "--weights", "ema", "--device", "cpu", check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert lines[-1].startswith("d4d.sample_video: error: --weights ema:") and "no EMA weights" in lines[-1]

    # export carries the EMA
    run_module("d4d.export_checkpoint", str(last), str(tmp_path / "export.pt"), timeout=300)
    exported = load(tmp_path / "export.pt")
    assert all(torch.equal(exported["ema_state_dict"][k], v) for k, v in ckpts[3]["ema_state_dict"].items())
    assert exported["ema"] == ckpts[3]["ema"]


@pytest.mark.parametrize("recipe,args,message", [
    ("static", ["--ema.decay", "1.5"], "ema.decay: expected a number in [0, 1), got 1.5"),
    ("static", ["--ema.every_n_steps", "0"], "ema.every_n_steps: expected an integer >= 1"),
    ("classifier", ["--ema", "{}"], "ema: only the diffusion stages (static, dynamic) take it"),
])
def test_bad_ema_options_are_one_line_errors(recipe, args, message, tmp_path):
    proc = run_module("d4d.fit", str(DEBUG / f"{recipe}.yaml"), "--run_dir", str(tmp_path / "run"),
                      "--trainer.logger.init_args.offline", "true", *args, check=False, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[-1].startswith("d4d.fit: error: ") and message in lines[-1], lines[-1]


# ----------------------------------------------------------------------------- ZeRO-3, 2 ranks
@pytest.mark.slow
def test_dynamic_zero3_two_ranks(synthetic_data, tmp_path, deepspeed_cpu_ops):
    """ZeRO-3 + bf16 on two ranks: the EMA is of DeepSpeed's gathered fp32 master weights (the module's
    own parameters are empty bf16 partitions there), kept by rank 0 in its model-states file, restored
    on resume, carried by the export."""
    from tests.test_gpu_path import deepspeed_state

    run = tmp_path / "run"
    common = ["--deepspeed", "zero3", "--trainer.devices", "2", "--trainer.precision", "bf16-mixed"]
    fit("tests.deepspeed_cpu", "dynamic", synthetic_data, tmp_path, run, 3, *common)
    resumed = fit("tests.deepspeed_cpu", "dynamic", synthetic_data, tmp_path, run, 4, *common, "--resume", "auto")
    assert "ema: restored" in resumed.stderr
    last = run / "checkpoints" / "step00000004.ckpt"
    rank1 = load(last / "checkpoint" / "zero_pp_rank_1_mp_rank_00_model_states.pt")
    assert "ema_state_dict" not in rank1 and "ema_state_dict" in deepspeed_state(last)  # rank 0 only
    exported = []
    for step in (1, 2, 3, 4):
        out = tmp_path / f"export{step}.pt"
        run_module("d4d.export_checkpoint", str(run / "checkpoints" / f"step{step:08d}.ckpt"), str(out), timeout=300)
        exported.append(load(out))
    ema = exported[3]["ema_state_dict"]
    assert ema and all(v.dtype == torch.float32 and v.numel() > 0 for v in ema.values())
    assert not any(k.startswith(("model.transformer.", "model.vae.", "model.text_encoder.")) for k in ema)
    check_hand_computation(*exported)
