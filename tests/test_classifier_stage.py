"""The classifier stage end to end: d4d.fit on synthetic shards, then d4d.select on a held-out image."""
from __future__ import annotations

import json

import torch

from d4d.geometry.motions import MOTIONS
from d4d.modules.classifier import load_classifier
from tests.conftest import REPO, run_module


def test_fit_then_select(synthetic_data, tmp_path):
    run = tmp_path / "run"
    recipe = tmp_path / "classifier.yaml"
    recipe.write_text((REPO / "recipes/debug/classifier.yaml").read_text().replace("data/synthetic", str(synthetic_data)))
    run_module("d4d.fit", str(recipe), "--run_dir", str(run), "--trainer.max_epochs", "2",
               "--data.init_args.episodes_per_epoch", "2", "--data.init_args.image_size", "32",
               "--data.init_args.num_workers", "1", timeout=600)
    # the run directory holds everything: resolved config, checkpoints, plots, the offline wandb run
    assert (run / "config.yaml").is_file()
    ckpts = sorted((run / "checkpoints").glob("*.ckpt"))
    names = sorted(p.name for p in ckpts)
    assert len(names) == 3 and names[0].startswith("best-epoch") and names[1:] == ["epoch01-step000004.ckpt", "last.ckpt"]
    assert (run / "checkpoints" / "last.ckpt").resolve().name == "epoch01-step000004.ckpt"
    assert sorted(p.name for p in (run / "plots").glob("*.png")) == [
        "test_confusion_epoch002.png", "val_confusion_epoch000.png", "val_confusion_epoch001.png"]
    assert list((run / "wandb").glob("offline-run-*"))
    assert not (REPO / "wandb").exists()

    model, meta = load_classifier(run / "checkpoints" / "last.ckpt")
    assert meta["labels"] == list(MOTIONS) and meta["image_size"] == 32
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    steps = {p.name: torch.load(p, weights_only=False)["global_step"] for p in ckpts}
    assert state["global_step"] == 4, steps  # 2 epochs x 2 episodes

    image = synthetic_data / "heldout" / "sample_0.jpg"
    proc = run_module("d4d.select", str(image), "--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--json")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    probs = result["probabilities"]
    assert list(probs) == list(MOTIONS)
    assert abs(sum(probs.values()) - 1) < 1e-5
    assert result["motion"] == max(probs, key=probs.get)
    table = run_module("d4d.select", str(image), "--checkpoint", str(run / "checkpoints" / "last.ckpt")).stdout
    assert table.splitlines()[0] == f"motion: {result['motion']}" and len(table.splitlines()) == 9


def test_select_errors(tmp_path, synthetic_data):
    bad_image = tmp_path / "not_an_image.jpg"
    bad_image.write_text("hello")
    for args, expected in [
        ([str(bad_image), "--checkpoint", "x.ckpt"], "cannot read image"),
        ([str(tmp_path / "missing.jpg"), "--checkpoint", "x.ckpt"], "image not found"),
        ([str(synthetic_data / "heldout" / "sample_0.jpg"), "--checkpoint", str(tmp_path / "none.ckpt")],
         "checkpoint not found"),
    ]:
        proc = run_module("d4d.select", *args, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().startswith("d4d.select: error:") and expected in proc.stderr
