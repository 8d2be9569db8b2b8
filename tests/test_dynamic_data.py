"""ClipDataModule windows (relative poses, stride, filters, intrinsics) and precomputed latents."""
from __future__ import annotations

import json

import pytest
import torch

from d4d.data.clip_datamodule import ClipDataModule, PrecomputedClipDataModule
from d4d.utils.errors import UserError
from tests.conftest import run_module


def _batch(dm, split="train"):
    dm.setup("fit")
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    return next(iter(loader))


def test_training_windows(synthetic_data):
    dm = ClipDataModule(str(synthetic_data / "train"), num_frames=4, image_size=(16, 24), stride_min=1, stride_max=2,
                        reverse_prob=0.5, batch_size=16, num_workers=0, shuffle=8)
    b = _batch(dm)
    assert b["frames"].shape == (16, 4, 3, 16, 24) and 0 <= b["frames"].min() and b["frames"].max() <= 1
    assert torch.allclose(b["c2w"][:, 0], torch.eye(4).expand(16, 4, 4), atol=1e-5)
    assert set(b["stride"].tolist()) <= {1, 2} and len(set(b["stride"].tolist())) == 2
    assert b["has_depth"].all() and (b["depth"] > 0).any()
    assert 0 < int(b["reversed"].sum()) < 16
    # 32x32 -> cover 24 wide (scale 0.75), crop 16 of 24 rows: fx scales by 0.75, cy by 0.75 then -4
    assert b["K"][0, 0, 2] == pytest.approx(12.0) and b["K"][0, 1, 2] == pytest.approx(8.0)


def test_reversed_windows_carry_the_reversed_motion(synthetic_data):
    from d4d.geometry.motions import REVERSED_MOTION

    kw = dict(num_frames=4, image_size=(16, 16), batch_size=16, num_workers=0, shuffle=0, seed=3)
    fwd = _batch(ClipDataModule(str(synthetic_data / "train"), reverse_prob=0.0, **kw))
    back = _batch(ClipDataModule(str(synthetic_data / "train"), reverse_prob=1.0, **kw))
    assert not fwd["reversed"].any() and back["reversed"].all() and fwd["key"] == back["key"]
    assert back["motion"] == [REVERSED_MOTION.get(m, m) for m in fwd["motion"]]
    assert any(m != r for m, r in zip(fwd["motion"], back["motion"]))


def test_dynamic_and_static_filters(synthetic_data):
    for flag, value in (("dynamic_only", True), ("static_only", False)):
        dm = ClipDataModule(str(synthetic_data / "val"), str(synthetic_data / "val"), num_frames=5, image_size=(32, 32),
                            batch_size=64, num_workers=0, **{flag: True})
        b = _batch(dm, "val")
        assert (b["dynamic"] == value).all() and 0 < len(b["key"]) < 16
    with pytest.raises(UserError, match="cannot both"):
        ClipDataModule("x", static_only=True, dynamic_only=True)
    with pytest.raises(UserError, match="data.train_shards"):
        ClipDataModule("/nonexistent/shards").setup("fit")


def test_filtered_epoch_length_counts_kept_windows(synthetic_data, tmp_path):
    dm = ClipDataModule(str(synthetic_data / "train"), num_frames=4, image_size=(16, 16), batch_size=1,
                        num_workers=0, shuffle=4, epoch_length=20, static_only=True)
    dm.setup("fit")
    items = list(dm.train_dataloader())
    assert len(items) == 20 and not any(bool(b["dynamic"]) for b in items)
    # A filter that keeps nothing is a clear error, not an empty (or endless) epoch.
    only_dynamic = tmp_path / "dyn"
    run_module("data_prep.synthetic", "--out", str(only_dynamic), "--clips", "3", "--val-clips", "0",
               "--test-clips", "0", "--frames", "4", "--size", "16", "--heldout", "0")
    dm = ClipDataModule(str(only_dynamic / "train"), num_frames=4, image_size=(16, 16), batch_size=1,
                        num_workers=0, epoch_length=5, static_only=True)
    dm.setup("fit")
    with pytest.raises(UserError, match="no static clip"):
        list(dm.train_dataloader())


def test_precomputed_latents_round_trip(synthetic_data, tmp_path):
    out = tmp_path / "lat"
    run_module("data_prep.precompute_latents", "--shards", str(synthetic_data / "val"), "--out", str(out),
               "--tiny", "{}", "--frames", "5", "--size", "32", "32", "--eval-windows", "--keep-frames",
               "--per-file", "10", timeout=300)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["windows"] == 16 and manifest["files"] == 2 and manifest["tiny"] == {}
    dm = PrecomputedClipDataModule(str(out), str(out), batch_size=4, num_workers=0)
    b = _batch(dm, "val")
    assert b["latents"].shape == (4, 4, 5, 8, 8) and b["condition"].shape == (4, 5, 5, 8, 8)
    assert b["text"].shape == (4, 512, 32) and b["frames"].shape == (4, 5, 3, 32, 32)
    from d4d.modules.dynamic import DynamicVideoModule

    module = DynamicVideoModule(backbone=None, tiny={}, camera_hidden=16)
    raw = {"frames": b["frames"], "c2w": b["c2w"], "K": b["K"], "caption": b["caption"], "depth": b["depth"].float(),
           "has_depth": b["has_depth"]}
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():  # same windows, same noise: the precomputed path gives the on-the-fly loss (fp16 storage)
        a = module.flow_loss(b, gen(), dropout=False)
        c = module.flow_loss(raw, gen(), dropout=False)
    assert a.item() == pytest.approx(c.item(), rel=2e-2)
    # latents encoded by other encoders than the model's are refused, naming the folder
    module._check_precomputed(dm)  # same tiny spec: accepted
    dm.setup("fit")
    other = DynamicVideoModule(backbone=None, tiny={"vae_base_dim": 16}, camera_hidden=16)
    with pytest.raises(UserError, match=r"data\.train_dir: .*lat was encoded with"):
        other._check_precomputed(dm)


@pytest.mark.parametrize("workers", [0, 2])
def test_filtered_epoch_has_epoch_length_samples_with_workers(synthetic_data, workers):
    """static_only / dynamic_only filter the stream; epoch_length is still the rank's sample count,
    shared by the loader workers (each worker once kept a whole epoch_length: 2 workers, 2x the steps)."""
    dm = ClipDataModule(str(synthetic_data / "train"), num_frames=4, image_size=(16, 16), stride_min=1, stride_max=1,
                        static_only=True, batch_size=2, epoch_length=8, num_workers=workers, shuffle=4)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 4 and sum(len(b["frames"]) for b in batches) == 8
