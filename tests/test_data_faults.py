"""Data faults end runs rightly (issue 17, items 3-5).

* The skip threshold does not abort a healthy run at random: failures and good samples are counted
  at the same place (after the shuffle buffer), and the threshold fires only once the skipped
  fraction is above ``max_skip_fraction`` beyond chance. It still fires on a bad set, as one line
  naming the first bad shards, also when raised in a DataLoader worker and through ``d4d.fit``.
* Clips without cameras are skips with a reason in the 4D data module; an epoch without a usable
  sample is an error.
* A clip without ``depth.npy`` is handled per sample in the 4D data module: kept for the model's
  initialisation depth when the model has one (``model.init_depth``), else skipped and counted.

Shards are written with the project's ShardWriter; frames are tiny ``.npy`` arrays, so decoding is cheap.
"""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from torch.utils.data import DataLoader

from d4d.data.fourd_datamodule import FourDDataModule
from d4d.data.shards import build_clip_pipeline
from d4d.data.skips import TooManySkippedError
from d4d.data.writer import ShardWriter, encode_sample
from d4d.utils.errors import UserError
from tests.conftest import REPO, run_module

GARBAGE_NPY = b"\x93NUMPY garbage"


def tiny_sample(i: int) -> dict:
    """One still 8x8 clip (npy frames, no camera): for the reader's own accounting."""
    frames = np.full((1, 8, 8, 3), i % 256, np.uint8)
    return encode_sample(f"clip{i:04d}", frames, {"dataset": "synthetic"}, frame_format="npy")


def posed_sample(i: int, camera: bool = True, depth: bool = True, t: int = 4, size: int = 16) -> dict:
    """A posed clip of t frames at size x size with metric depth, as the 4D generator reads them."""
    rng = np.random.default_rng(i)
    frames = rng.integers(0, 256, (t, size, size, 3), dtype=np.uint8)
    c2w = np.tile(np.eye(4, dtype=np.float32), (t, 1, 1))
    c2w[:, 2, 3] = 0.1 * np.arange(t)
    K = np.tile(np.array([[20, 0, size / 2], [0, 20, size / 2], [0, 0, 1]], np.float32), (t, 1, 1))
    d = rng.uniform(1.0, 3.0, (t, size, size)).astype(np.float32)
    return encode_sample(f"clip{i:04d}", frames, {"dataset": "synthetic", "metric_depth": True},
                         c2w=c2w if camera else None, K=K if camera else None, depth=d if depth else None,
                         frame_format="npy")


def write(folder: Path, samples: list[dict], per_shard: int, prefix: str = "shard") -> list[Path]:
    with ShardWriter(folder, prefix=prefix, max_count=per_shard) as writer:
        for sample in samples:
            writer.write(sample)
    return writer.shards


def drain(dataset) -> int:
    return sum(1 for _ in dataset)




# ------------------------------------------------------------------------ 3: the skip threshold
@pytest.fixture(scope="module")
def healthy_set(tmp_path_factory) -> Path:
    """48 shards of 10 clips with 7 undecodable clips, and 2 shards that are not tars at all:
    9 failures among 482 items, a long-run skip rate of 1.87%, well under the default 5%."""
    root = tmp_path_factory.mktemp("healthy")
    bad = set(range(5, 480, 68))
    samples = []
    for i in range(480):
        sample = tiny_sample(i)
        if i in bad:
            sample["frames.npy"] = GARBAGE_NPY
        samples.append(sample)
    write(root, samples, 10)
    for j in (48, 49):
        (root / f"shard-{j:06d}.tar").write_bytes(b"\x01" * 3000)
    return root


def test_threshold_does_not_fire_on_a_healthy_set_over_20_seeds(healthy_set):
    one_pass = build_clip_pipeline(str(healthy_set), max_skip_fraction=1.0)
    assert drain(one_pass) == 473
    assert one_pass.stats.as_dict() == {"seen": 482, "skipped": 9,
                                        "by_reason": {"decode_error": 7, "unreadable_shard": 2}}
    assert 0.015 < one_pass.stats.fraction < 0.021

    seen = skipped = 0
    for seed in range(20):  # the setting: a shuffle buffer, shards drawn with replacement
        dataset = build_clip_pipeline(str(healthy_set), shuffle=64, resampled=True, epoch_length=300,
                                      seed=seed)
        assert drain(dataset) == 300, f"seed {seed}"
        seen, skipped = seen + dataset.stats.seen, skipped + dataset.stats.skipped
    assert 0.008 < skipped / seen < 0.03  # the faults were met, at about their long-run rate


@pytest.fixture(scope="module")
def bad_set(tmp_path_factory) -> tuple[Path, set[str]]:
    """10 good shards, then 10 shards where 7 of 10 clips do not decode: 35% of the samples are bad."""
    root = tmp_path_factory.mktemp("bad")
    samples = []
    for i in range(200):
        sample = tiny_sample(i)
        if i >= 100 and i % 10 < 7:
            sample["frames.npy"] = GARBAGE_NPY
        samples.append(sample)
    shards = write(root, samples, 10)
    return root, {str(s) for s in shards[10:]}


def test_threshold_fires_on_a_bad_set_with_one_line_naming_the_first_bad_shards(bad_set):
    root, bad_shards = bad_set
    for seed in range(3):
        dataset = build_clip_pipeline(str(root), shuffle=64, resampled=True, epoch_length=300, seed=seed)
        with pytest.raises(TooManySkippedError) as err:
            drain(dataset)
        assert isinstance(err.value, UserError)  # entry points print it as one line, exit status 2
        assert dataset.stats.seen <= 150  # stops early: no need for a whole epoch to be sure
        message = str(err.value)
        assert "\n" not in message and err.value.__context__ is None and err.value.__cause__ is None
        named = re.search(r"first bad shards: (.*?);", message).group(1).split(", ")
        assert named and set(named) <= bad_shards
        assert re.match(r"\d+ of \d+ samples skipped \(\d+\.\d%\)", message)
        assert "[decode_error] sample 'clip01" in message


def test_threshold_error_from_a_dataloader_worker_is_one_line(bad_set):
    root, bad_shards = bad_set
    dataset = build_clip_pipeline(str(root), shuffle=16, resampled=True, epoch_length=300, seed=0,
                                  transform=lambda s: s.key)
    with pytest.raises(TooManySkippedError) as err:
        list(DataLoader(dataset, batch_size=None, num_workers=1))
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message and "Caught" not in message
    assert re.match(r"\d+ of \d+ samples skipped", message)
    named = re.search(r"first bad shards: (.*?);", message).group(1).split(", ")
    assert set(named) <= bad_shards


def test_an_exhausted_one_pass_share_is_judged_on_its_exact_rate(bad_set):
    """One pass over a finite share knows its rate exactly: no confidence margin is needed."""
    root, _ = bad_set
    with pytest.raises(TooManySkippedError, match=r"70 of 200 samples skipped \(35\.0%\)"):
        drain(build_clip_pipeline(str(root), max_skip_fraction=0.3))
    assert drain(build_clip_pipeline(str(root), max_skip_fraction=0.4)) == 130


# --------------------------------------------------------------- 4D data module: cameras, depth
def fourd(spec, **kw) -> FourDDataModule:
    args = dict(num_frames=4, image_sizes=[(16, 16)], batch_size=4, num_workers=0, shuffle=0, seed=0)
    args.update(kw)
    dm = FourDDataModule(str(spec), **args)
    dm.setup("fit")
    return dm


def batches_and_stats(dm: FourDDataModule):
    loader = dm.train_dataloader()
    batches = list(loader)
    return batches, loader.inner.stream.stats


def test_clips_without_cameras_are_counted_skips(tmp_path, skip_warnings):
    write(tmp_path, [posed_sample(i, camera=i % 3 != 0) for i in range(12)], 6)
    batches, stats = batches_and_stats(fourd(tmp_path))
    keys = [k for b in batches for k in b["key"]]
    assert keys == [f"clip{i:04d}" for i in range(12) if i % 3]
    assert [len(b["key"]) for b in batches] == [4, 4]  # full batches: skipping happens before batching
    assert stats.as_dict() == {"seen": 12, "skipped": 4, "by_reason": {"no_camera": 4}}
    assert len(skip_warnings) == 4
    assert "'clip0000'" in skip_warnings[0] and "shard-000000.tar" in skip_warnings[0]
    assert "c2w.npy" in skip_warnings[0]


def test_an_epoch_without_a_usable_clip_is_an_error(tmp_path):
    shards = write(tmp_path, [posed_sample(i, camera=False) for i in range(8)], 4)
    with pytest.raises(UserError) as err:  # one pass over the shards
        list(fourd(tmp_path).train_dataloader())
    message = str(err.value)
    assert "\n" not in message and "no usable sample" in message and str(shards[0]) in message
    assert "all 8 items read were skipped" in message and "no_camera 8" in message

    with pytest.raises(UserError) as err:  # shards drawn with replacement: no epoch of 0 steps either
        list(fourd(tmp_path, epoch_length=16, shuffle=8).train_dataloader())
    message = str(err.value)
    assert "\n" not in message and "no_camera" in message
    assert re.search(r"first bad shards: \S+shard-", message)


def test_too_short_clips_are_counted_skips(tmp_path):
    write(tmp_path, [posed_sample(i, t=4 if i % 2 else 2) for i in range(8)], 8)
    batches, stats = batches_and_stats(fourd(tmp_path))
    assert [k for b in batches for k in b["key"]] == [f"clip{i:04d}" for i in (1, 3, 5, 7)]
    assert stats.by_reason == {"too_few_frames": 4}


def _model_with(init_depth):
    return SimpleNamespace(lightning_module=SimpleNamespace(hparams={"init_depth": init_depth,
                                                                     "init_depth_config": None}))


def test_a_clip_without_depth_is_skipped_when_the_model_cannot_supervise_it(tmp_path, skip_warnings):
    write(tmp_path, [posed_sample(i, depth=i != 5) for i in range(8)], 4)
    dm = fourd(tmp_path)
    dm.trainer = _model_with(None)  # model.init_depth unset: nothing to supervise a depthless clip with
    batches, stats = batches_and_stats(dm)
    assert [k for b in batches for k in b["key"]] == [f"clip{i:04d}" for i in range(8) if i != 5]
    assert all(bool(b["has_depth"].all()) for b in batches)
    assert stats.as_dict() == {"seen": 8, "skipped": 1, "by_reason": {"no_depth": 1}}
    (line,) = skip_warnings
    assert "'clip0005'" in line and "shard-000001.tar" in line and "init_depth" in line

    dm = fourd(tmp_path, missing_depth="skip")  # said explicitly, without a model
    assert batches_and_stats(dm)[1].by_reason == {"no_depth": 1}


@pytest.mark.parametrize("how", ["model has init_depth", "explicit"])
def test_a_clip_without_depth_is_kept_for_the_models_initialisation(tmp_path, how):
    write(tmp_path, [posed_sample(i, depth=i != 5) for i in range(8)], 4)
    if how == "explicit":
        dm = fourd(tmp_path, missing_depth="initialise")
    else:
        dm = fourd(tmp_path)
        dm.trainer = _model_with("depth-anything/Depth-Anything-V2-Small-hf")
    batches, stats = batches_and_stats(dm)
    has_depth = {k: bool(h) for b in batches for k, h in zip(b["key"], b["has_depth"])}
    assert has_depth == {f"clip{i:04d}": i != 5 for i in range(8)}
    depthless = next(b for b in batches if "clip0005" in b["key"])
    assert float(depthless["depth"][depthless["key"].index("clip0005")].abs().sum()) == 0.0
    assert stats.skipped == 0


def test_missing_depth_option_is_checked():
    with pytest.raises(UserError, match=r"missing_depth must be one of auto, skip, initialise, got 'drop'"):
        FourDDataModule("x", missing_depth="drop")


# ---------------------------------------------------------------------------- end to end: d4d.fit
def fit(run: Path, shards: Path, *extra: str):
    return run_module("d4d.fit", str(REPO / "recipes" / "debug" / "4dgen_224_linear.yaml"),
                      "--run_dir", str(run), "--data.init_args.train_shards", str(shards),
                      "--data.init_args.val_shards", "null", "--data.init_args.test_shards", "null",
                      "--data.init_args.num_workers", "1", "--data.init_args.batch_size", "4",
                      "--data.init_args.epoch_length", "16", "--data.init_args.image_sizes", "[[16, 16]]",
                      "--model.init_args.encoder_config.image_size", "16", "--trainer.max_epochs", "2",
                      "--trainer.limit_val_batches", "0", "--model.init_args.val_plots", "0",
                      "--trainer.logger", "false", "--trainer.callbacks", "[]", *extra,
                      check=False, timeout=300)


def test_fit_stops_on_a_bad_set_with_one_line(tmp_path):
    samples = []
    for i in range(32):
        sample = posed_sample(i)
        if i % 2:
            sample["depth.npy"] = GARBAGE_NPY
        samples.append(sample)
    shards = write(tmp_path / "bad", samples, 8)
    proc = fit(tmp_path / "run", tmp_path / "bad")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith("d4d.fit: error:") and "samples skipped" in lines[-1]
    named = re.search(r"first bad shards: (.*?);", lines[-1]).group(1).split(", ")
    assert set(named) <= {str(s) for s in shards}


def test_fit_trains_past_a_clip_without_depth(tmp_path):
    write(tmp_path / "data", [posed_sample(i, depth=i != 5) for i in range(16)], 8)
    proc = fit(tmp_path / "run", tmp_path / "data")  # the debug recipe: model.init_depth is null
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"skipped \(no_depth\): sample 'clip0005' in \S+shard-000000\.tar", proc.stderr)


def test_fit_stops_on_clips_without_cameras(tmp_path):
    """Before: 2 epochs of 0 optimizer steps and exit status 0."""
    write(tmp_path / "data", [posed_sample(i, camera=False) for i in range(8)], 8)
    proc = fit(tmp_path / "run", tmp_path / "data")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith("d4d.fit: error:") and "no_camera" in lines[-1]
    assert re.search(r"first bad shards: \S+shard-000000\.tar", lines[-1])
