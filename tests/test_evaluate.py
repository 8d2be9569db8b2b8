"""``python -m d4d.evaluate`` end to end on the synthetic test shards, with the repeat-first baseline."""
from __future__ import annotations

import csv
import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch

from tests.conftest import run_module


def _first_clips(shard_dir, n):
    """Decode the first n clips of the test shards by hand (tar + mp4), independent of d4d.data."""
    from d4d.data.video import decode_mp4

    clips = []
    for tar_path in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            groups: dict = {}
            for m in tar.getmembers():
                key, _, field = m.name.partition(".")
                groups.setdefault(key, {})[field] = tar.extractfile(m).read()
            for key in sorted(groups):
                g = groups[key]
                frames = decode_mp4(g["frames.mp4"]) if "frames.mp4" in g else np.load(io.BytesIO(g["frames.npy"]))
                clips.append((json.loads(g["meta.json"]).get("clip_id", key), frames))
                if len(clips) == n:
                    return clips
    return clips


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    shapes = {0: (64, 3, 11), 3: (192, 64, 5), 6: (384, 192, 3), 8: (256, 384, 3), 10: (256, 256, 3)}
    state = {}
    for i, (co, ci, k) in shapes.items():
        state[f"features.{i}.weight"] = torch.randn(co, ci, k, k, generator=g) * math.sqrt(2 / (ci * k * k))
        state[f"features.{i}.bias"] = torch.zeros(co)
    path = tmp_path_factory.mktemp("w") / "alexnet-owt-7be5be79.pth"
    torch.save(state, path)
    return path


def test_repeat_first_baseline_end_to_end(synthetic_data, tmp_path, alexnet_file):
    out = tmp_path / "eval"
    proc = run_module("d4d.evaluate", "--shards", str(synthetic_data / "test"), "--out", str(out),
                      "--baseline", "repeat-first", "--baseline", "real-frames", "--max-clips", "3", "--covisibility", "none",
                      "--lpips", "d4d", "--alexnet-weights", str(alexnet_file), "--wandb", "offline", "--samples", "1")
    assert "repeat-first: mpsnr" in proc.stdout
    all_rows = list(csv.DictReader(open(out / "per_clip.csv")))
    assert len(all_rows) == 6 and {r["protocol"] for r in all_rows} == {"repeat-first", "real-frames"}
    for r in (r for r in all_rows if r["protocol"] == "real-frames"):  # the oracle: perfect image metrics
        assert float(r["mpsnr"]) == 100.0 and float(r["mssim"]) == pytest.approx(1.0)
        assert float(r["mssim_strict"]) == pytest.approx(1.0) and float(r["mlpips"]) == pytest.approx(0.0, abs=1e-6)
    rows = [r for r in all_rows if r["protocol"] == "repeat-first"]
    # without masks, mPSNR of "frame 0 repeated" is the mean over frames 1.. of PSNR(frame_i, frame_0)
    for (clip_id, frames), row in zip(_first_clips(synthetic_data / "test", 3), rows):
        x = frames.astype(np.float64) / 255
        psnr = [-10 * math.log10(((x[i] - x[0]) ** 2).mean()) for i in range(1, len(x))]
        assert row["clip_id"] == clip_id
        assert float(row["mpsnr"]) == pytest.approx(np.mean(psnr), abs=1e-6)
        assert float(row["flicker"]) == 0.0  # a still video does not flicker
        assert float(row["covisible"]) == 1.0
        assert 0 < float(row["mlpips"]) and 0 < float(row["mssim"]) < 1
    doc = json.loads((out / "aggregate.json").read_text())
    agg = doc["protocols"]["repeat-first"]
    assert agg["clips"] == 3
    assert agg["mpsnr"] == pytest.approx(np.mean([float(r["mpsnr"]) for r in rows]))
    assert doc["directions"]["mlpips"] == -1
    assert (out / "samples" / "repeat-first" / f"{rows[0]['clip_id']}.mp4").stat().st_size > 0
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))


def test_covisibility_masks_shrink_the_compared_area(synthetic_data, tmp_path):
    out = tmp_path / "eval"
    run_module("d4d.evaluate", "--shards", str(synthetic_data / "test"), "--out", str(out), "--baseline",
               "repeat-first", "--max-clips", "2", "--lpips", "off", "--wandb", "disabled")
    rows = list(csv.DictReader(open(out / "per_clip.csv")))
    cov = [float(r["covisible"]) for r in rows]
    assert all(0.05 < c < 1.0 for c in cov), cov  # moving cameras: part of each frame is not in frame 0
    assert "mlpips" not in rows[0]


@pytest.mark.parametrize("args, message", [
    (["--shards", "nope/test", "--baseline", "repeat-first"], "nope/test"),
    (["--dynamic", "missing.ckpt"], "--dynamic: checkpoint missing.ckpt not found"),
    ([], "nothing to evaluate"),
    (["--baseline", "repeat-first", "--size", "4x4"], "--size '4x4'"),
    (["--baseline", "repeat-first", "--lpips", "d4d"], "alexnet-owt-7be5be79.pth"),
])
def test_user_errors_are_one_line(synthetic_data, tmp_path, monkeypatch, capsys, args, message):
    from d4d.evaluate import main

    if "--shards" not in args:
        args = ["--shards", str(synthetic_data / "test"), *args]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "o"), "--wandb", "disabled", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("d4d.evaluate: error:") and message in err[0], err
