"""Train the debug recipe for two steps, then sample with ``python -m d4d.sample_video`` as a user would."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from d4d.data.video import decode_mp4
from d4d.geometry.cameras import read_realestate_cameras
from tests.conftest import REPO, run_module


@pytest.fixture(scope="module")
def trained(synthetic_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dyn")
    recipe = tmp / "dynamic.yaml"
    recipe.write_text((REPO / "recipes" / "debug" / "dynamic.yaml").read_text().replace("data/synthetic", str(synthetic_data)))
    run_module("d4d.fit", str(recipe), "--run_dir", str(tmp / "run"), "--data.init_args.num_workers", "0",
               "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
               "--model.init_args.val_samples", "1", "--model.init_args.val_steps", "2", timeout=600)
    return tmp / "run"


def _error(*args: str) -> str:
    proc = run_module("d4d.sample_video", *args, check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("d4d.sample_video: error: ")
    return last


def test_training_writes_checkpoint_and_validation_samples(trained):
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["d4d_stage"] == "dynamic" and ckpt["d4d_training_data"] == {"num_frames": 5, "image_size": [32, 32]}
    assert any(k.startswith("model.vae.") for k in ckpt["state_dict"])  # tiny random base: kept
    plots = sorted((trained / "plots").glob("val_step*"))
    assert {p.suffix for p in plots} == {".png", ".mp4"}
    assert decode_mp4(next(p for p in plots if p.suffix == ".mp4").read_bytes()).shape == (5, 32, 64, 3)  # real | generated


def test_sample_video_command(trained, tmp_path):
    image = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "out"
    proc = run_module("d4d.sample_video", str(image), "--checkpoint", str(trained / "checkpoints" / "last.ckpt"),
                      "--prompt", "a red box", "--motion", "look up", "--steps", "2", "--frames", "9",
                      "--text-cfg", "3", "--seed", "1", "--out", str(out), timeout=300)
    assert "wrote" in proc.stdout
    assert decode_mp4((out / "video.mp4").read_bytes()).shape == (9, 32, 32, 3)
    assert len(list((out / "frames").glob("*.png"))) == 9
    assert len(read_realestate_cameras(out / "cameras.txt")) == 9
    info = json.loads((out / "info.json").read_text())
    assert info["guidance"] == {"text": 3.0, "camera": 1.0} and info["steps"] == 2 and info["stage"] == "dynamic"
    cams = json.loads((out / "cameras.json").read_text())
    assert cams["label"] == "look up" and len(cams["c2w"]) == 9


def test_sample_video_user_errors(trained, tmp_path):
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    ckpt = str(trained / "checkpoints" / "last.ckpt")
    assert "checkpoint not found: nope.ckpt" in _error(str(image), "--checkpoint", "nope.ckpt", "--out", str(tmp_path / "o"))
    torch.save({"d4d_stage": "sculpture"}, tmp_path / "x.ckpt")
    assert "d4d_stage='sculpture'" in _error(str(image), "--checkpoint", str(tmp_path / "x.ckpt"), "--out", str(tmp_path / "o"))
    assert "unknown motion 'spin'" in _error(str(image), "--checkpoint", ckpt, "--motion", "spin", "--out", str(tmp_path / "o"))
    assert "1 + 4 k frames" in _error(str(image), "--checkpoint", ckpt, "--frames", "6", "--out", str(tmp_path / "o"))
    assert "missing.png" in _error(str(tmp_path / "missing.png"), "--checkpoint", ckpt, "--out", str(tmp_path / "o"))
