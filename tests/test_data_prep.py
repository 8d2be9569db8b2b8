"""data_prep: RealEstate10K (seven real clips), COCO and image folders -> shards read back through
the schema validation and the classifier DataModule; determinism, Slurm slicing, kill-and-resume,
one-line errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from d4d.data.shards import build_clip_pipeline
from d4d.data.video import decode_mp4
from d4d.geometry import MOTIONS, read_realestate_cameras, resize_and_center_crop
from data_prep import coco, images, merge, realestate10k

REPO = Path(__file__).resolve().parents[1]
RE10K = REPO.parent / "shared" / "data" / "realestate10k"
needs_re10k = pytest.mark.skipif(not (RE10K / "pose_files").is_dir(),
                                 reason=f"RealEstate10K sample not found at {RE10K}")
SIZE = (64, 96)


def re10k_layout(root: Path, copies: int = 1) -> tuple[Path, Path]:
    """Symlink the seven clips as <root>/cams/test/<id>.txt and <root>/videos/<id>.mp4 (``copies``
    times each, ids suffixed with the copy number after the first)."""
    cams, videos = root / "cams" / "test", root / "videos"
    cams.mkdir(parents=True)
    videos.mkdir()
    for txt in sorted((RE10K / "pose_files").glob("*.txt")):
        for c in range(copies):
            name = txt.stem + (f"c{c}" if c else "")
            (cams / f"{name}.txt").symlink_to(txt)
            (videos / f"{name}.mp4").symlink_to(RE10K / "videos" / f"{txt.stem}.mp4")
    return cams, videos


def re10k_args(cams: Path, videos: Path, out: Path, *extra: str) -> list[str]:
    return ["--cameras", str(cams), "--videos", str(videos), "--out", str(out), "--size", "64x96",
            "--shard-size", "3", *extra]


def tree_bytes(folder: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every shard under folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.tar"))}


def read_samples(folder: Path) -> list:
    return list(build_clip_pipeline(str(folder), max_skip_fraction=0.0))


@pytest.fixture(scope="module")
def re10k_run(tmp_path_factory):
    if not (RE10K / "pose_files").is_dir():
        pytest.skip(f"RealEstate10K sample not found at {RE10K}")
    root = tmp_path_factory.mktemp("re10k")
    cams, videos = re10k_layout(root)
    out = root / "out"
    manifest = realestate10k.main(re10k_args(cams, videos, out))
    return cams, videos, out, manifest


@needs_re10k
def test_re10k_videos_shards_pass_validation_with_resized_intrinsics(re10k_run):
    cams, _, out, manifest = re10k_run
    samples = read_samples(out)
    assert [s.key for s in samples] == sorted(f"{p.stem}_w0000" for p in cams.glob("*.txt"))
    assert manifest["inputs"] == manifest["accepted"] == 7 and manifest["rejected"] == []
    assert manifest["samples"] == {".": 7, "motion_images": sum(s.motion is not None for s in samples)}
    assert sum(manifest["motions"].values()) == 7
    for s in samples:
        assert tuple(s.frames.shape) == (16, *SIZE, 3)
        cam = read_realestate_cameras(cams / f"{s.meta['clip_id']}.txt")
        expected_K = resize_and_center_crop(cam.K(256, 384), (256, 384), SIZE).K  # videos are 384x256
        torch.testing.assert_close(s.K, expected_K.float())
        torch.testing.assert_close(s.c2w, cam.c2w.float())
        assert s.meta["timestamps_us"] == cam.timestamps_us.tolist()
        assert "motion" in s.meta and 0.0 <= s.meta["motion_confidence"] <= 1.0
        assert s.motion is None or s.motion in MOTIONS
    labelled = [s for s in samples if s.motion is not None]
    assert len(labelled) >= 4, {s.key: s.motion for s in samples}
    # the classifier image set: first frame of each labelled window, same label
    firsts = {s.key: s for s in read_samples(out / "motion_images")}
    assert sorted(firsts) == sorted(s.key for s in labelled)
    for s in labelled:
        assert firsts[s.key].motion == s.motion and tuple(firsts[s.key].frames.shape) == (1, *SIZE, 3)
        diff = (firsts[s.key].frames[0].float() - s.frames[0].float()).abs().mean()
        assert diff < 8, diff  # JPEG of the same first frame (mp4 vs jpg compression only)


@needs_re10k
def test_re10k_workers_and_array_tasks_give_identical_bytes(re10k_run, tmp_path):
    cams, videos, ref, manifest = re10k_run
    realestate10k.main(re10k_args(cams, videos, tmp_path / "w2", "--workers", "2"))
    assert tree_bytes(tmp_path / "w2") == tree_bytes(ref)
    for i in (1, 0):
        realestate10k.main(re10k_args(cams, videos, tmp_path / "arr", "--array-index", str(i), "--array-count", "2"))
    assert not (tmp_path / "arr" / "manifest.json").exists()
    assert merge.main([str(tmp_path / "arr")]) == manifest
    assert tree_bytes(tmp_path / "arr") == tree_bytes(ref)
    assert (tmp_path / "arr" / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()


@needs_re10k
def test_re10k_frame_folders_windows_and_rejections(re10k_run, tmp_path):
    cams_src, videos, _, _ = re10k_run
    ids = sorted(p.stem for p in cams_src.glob("*.txt"))[:4]
    cams, frames = tmp_path / "cams" / "test", tmp_path / "frames"
    cams.mkdir(parents=True)
    stamps = {}
    for clip in ids:
        (cams / f"{clip}.txt").symlink_to(cams_src / f"{clip}.txt")
        stamps[clip] = read_realestate_cameras(cams / f"{clip}.txt").timestamps_us.tolist()
        video = decode_mp4((videos / f"{clip}.mp4").read_bytes())
        (frames / clip).mkdir(parents=True)
        for t, frame in zip(stamps[clip], video):
            Image.fromarray(frame).save(frames / clip / f"{t}.png")
    (frames / ids[1] / f"{stamps[ids[1]][5]}.png").unlink()  # a row without its frame
    Image.fromarray(video[0]).save(frames / ids[2] / f"{stamps[ids[2]][0] - 1}.png")  # a frame without a row
    (cams / "nonfinite.txt").write_text("url\n" + "0 0.5 0.8 0.5 0.5 0 0 " + " ".join(["nan"] * 12) + "\n")
    (cams / "novideo.txt").symlink_to(cams_src / f"{ids[0]}.txt")
    (cams / f"{ids[3]}.txt").unlink()
    (cams / f"{ids[3]}.txt").write_text((cams_src / f"{ids[3]}.txt").read_text())
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({ids[0]: "a bright living room"}))
    out = tmp_path / "out"
    manifest = realestate10k.main(["--cameras", str(cams), "--frames", str(frames), "--out", str(out),
                                   "--size", "32x32", "--window", "8", "--stride", "4", "--captions", str(captions)])
    reasons = {r["id"]: r["reason"] for r in manifest["rejected"]}
    assert reasons[ids[1]].startswith("missing frames") and reasons["novideo"].startswith("missing frames")
    assert reasons[ids[2]].startswith("fewer rows than frames")
    assert reasons["nonfinite"].startswith("non-finite pose")
    assert manifest["accepted"] == 2 and manifest["samples"]["."] == 6  # windows 0, 4, 8 of 16 frames
    samples = {s.key: s for s in read_samples(out)}
    assert sorted(samples) == [f"{c}_w{w:04d}" for c in (ids[0], ids[3]) for w in (0, 4, 8)]
    s = samples[f"{ids[0]}_w0004"]
    assert tuple(s.frames.shape) == (8, 32, 32, 3) and s.caption == "a bright living room"
    cam = read_realestate_cameras(cams / f"{ids[0]}.txt")
    torch.testing.assert_close(s.c2w, cam.c2w[4:12].float())
    assert s.meta["timestamps_us"] == cam.timestamps_us[4:12].tolist()


@needs_re10k
def test_re10k_undecodable_and_mismatched_videos_are_rejected(tmp_path):
    src = sorted((RE10K / "pose_files").glob("*.txt"))[0]
    cams, videos = tmp_path / "cams" / "test", tmp_path / "videos"
    cams.mkdir(parents=True)
    videos.mkdir()
    rows = src.read_text().splitlines()
    for name in ("cut", "garbage", "short_rows"):
        (cams / f"{name}.txt").write_text("\n".join(rows[:-1] if name == "short_rows" else rows) + "\n")
    video = (RE10K / "videos" / f"{src.stem}.mp4").read_bytes()
    (videos / "cut.mp4").write_bytes(video[:3000])
    (videos / "garbage.mp4").write_bytes(b"not a video")
    (videos / "short_rows.mp4").write_bytes(video)
    manifest = realestate10k.main(["--cameras", str(cams), "--videos", str(videos), "--out", str(tmp_path / "o"),
                                   "--size", "32x32"])
    reasons = {r["id"]: r["reason"] for r in manifest["rejected"]}
    assert reasons["cut"].startswith("undecodable video") and reasons["garbage"].startswith("undecodable video")
    assert reasons["short_rows"] == "fewer rows than frames: video has 16 frames, camera file 15 rows"
    assert manifest["accepted"] == 0 and manifest["samples"] == {".": 0, "motion_images": 0}
    assert not list((tmp_path / "o").rglob("*.tar"))


@needs_re10k
def test_motion_images_feed_the_classifier_datamodule(re10k_run):
    from d4d.data.motion_datamodule import MotionImageDataModule

    _, _, out, manifest = re10k_run
    dm = MotionImageDataModule(train_shards=str(out / "motion_images"), val_shards=str(out / "motion_images"),
                               image_size=32, num_workers=0, val_batch_size=64)
    dm.setup("fit")
    images_, labels = next(iter(dm.val_dataloader()))
    assert tuple(images_.shape) == (manifest["samples"]["motion_images"], 3, 32, 32)
    hist = {m: int((labels == MOTIONS.index(m)).sum()) for m in MOTIONS}
    assert {m: n for m, n in hist.items() if n} == {m: n for m, n in manifest["motions"].items() if m != "unlabelled"}


@needs_re10k
def test_killed_run_resumes_to_the_same_bytes(tmp_path):
    cams, videos = re10k_layout(tmp_path, copies=2)  # 14 clips, 7 groups of 2
    args = ["--cameras", str(cams), "--videos", str(videos), "--size", "32x48", "--shard-size", "2"]
    killed = tmp_path / "killed"
    env = {**os.environ, "D4D_PREP_THROTTLE_S": "0.5", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.realestate10k", *args, "--out", str(killed)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (killed / "shard-000000.tar").exists():
            assert proc.poll() is None and time.time() < deadline, "run ended before its first shard"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    done = sorted(p.name for p in (killed / "parts").glob("group-*.json"))
    assert len(done) < 7 and not (killed / "manifest.json").exists()  # it really stopped midway
    stamp = {n: (killed / "parts" / n).stat().st_mtime_ns for n in done}
    realestate10k.main([*args, "--out", str(killed)])
    assert {n: (killed / "parts" / n).stat().st_mtime_ns for n in done} == stamp  # finished groups skipped
    realestate10k.main([*args, "--out", str(tmp_path / "whole")])
    assert tree_bytes(killed) == tree_bytes(tmp_path / "whole")
    assert sorted(p.name for p in killed.glob("*.tar")) == [f"shard-{g:06d}.tar" for g in range(7)]
    assert not list(killed.rglob("*.tmp"))
    assert (killed / "manifest.json").read_bytes() == (tmp_path / "whole" / "manifest.json").read_bytes()


# ------------------------------------------------------------------------------------------- COCO
@pytest.fixture
def coco_fixture(tmp_path):
    img_dir = tmp_path / "val2017"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(img_dir / "000000000001.jpg")
    Image.fromarray(rng.integers(0, 255, (50, 30, 3), dtype=np.uint8)).save(img_dir / "000000000002.png")
    (img_dir / "000000000003.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    imgs = [{"id": i, "file_name": n, "width": 1, "height": 1}
            for i, n in ((2, "000000000002.png"), (1, "000000000001.jpg"), (3, "000000000003.jpg"))]
    caps = {"images": imgs, "annotations": [
        {"id": 10, "image_id": 1, "caption": "a cat on a sofa"}, {"id": 5, "image_id": 1, "caption": "a cat "},
        {"id": 11, "image_id": 2, "caption": "a red bus"}, {"id": 12, "image_id": 3, "caption": "lost"}]}
    inst = {"images": imgs, "categories": [{"id": 17, "name": "cat"}, {"id": 6, "name": "bus"}, {"id": 62, "name": "couch"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 62}, {"id": 2, "image_id": 1, "category_id": 17},
                            {"id": 3, "image_id": 2, "category_id": 6}]}
    (tmp_path / "captions_val2017.json").write_text(json.dumps(caps))
    (tmp_path / "instances_val2017.json").write_text(json.dumps(inst))
    return tmp_path


def test_coco_images_captions_categories_and_rejects(coco_fixture):
    d = coco_fixture
    out = d / "out"
    manifest = coco.main(["--images", str(d / "val2017"), "--captions", str(d / "captions_val2017.json"),
                          "--instances", str(d / "instances_val2017.json"), "--out", str(out), "--size", "24"])
    assert manifest["inputs"] == 3 and manifest["accepted"] == 2
    assert [r["id"] for r in manifest["rejected"]] == ["000000000003.jpg"]
    assert manifest["rejected"][0]["reason"].startswith("unreadable image")
    samples = read_samples(out)
    assert [s.key for s in samples] == ["coco_000000000001", "coco_000000000002"]
    a, b = samples
    assert tuple(a.frames.shape) == (1, 24, 24, 3) and a.c2w is None
    assert a.meta["captions"] == ["a cat", "a cat on a sofa"] and a.caption == "a cat"
    assert a.meta["categories"] == ["cat", "couch"] and a.meta["original_size"] == [40, 60]
    assert b.meta["categories"] == ["bus"] and b.meta["image_id"] == 2 and b.meta["split"] == "val2017"
    coco.main(["--images", str(d / "val2017"), "--captions", str(d / "captions_val2017.json"), "--instances",
               str(d / "instances_val2017.json"), "--out", str(d / "again"), "--size", "24", "--shard-size", "1"])
    coco.main(["--images", str(d / "val2017"), "--captions", str(d / "captions_val2017.json"), "--instances",
               str(d / "instances_val2017.json"), "--out", str(d / "again2"), "--size", "24", "--shard-size", "1",
               "--workers", "2"])
    assert tree_bytes(d / "again") == tree_bytes(d / "again2") and sorted(tree_bytes(d / "again")) == ["shard-000000.tar", "shard-000001.tar"]


# ----------------------------------------------------------------------------------------- images
def test_images_flat_with_prompts_and_folder_per_class(tmp_path):
    rng = np.random.default_rng(1)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(flat / f"gen.{i}.png")
    (flat / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"file": "gen.0.png", "prompt": "a castle", "motion": "zoom in"},
        {"file": "gen.1.png", "prompt": "a lake"}, {"file": "gone.png", "prompt": "?"}]) + "\n")
    manifest = images.main(["--images", str(flat), "--prompts", str(flat / "prompts.jsonl"),
                            "--out", str(tmp_path / "o1"), "--size", "16", "--shard-size", "2"])
    assert manifest["rejected"] == [{"id": "gone.png", "reason": "missing file"}] and manifest["accepted"] == 3
    s = {x.meta["file"]: x for x in read_samples(tmp_path / "o1")}
    assert s["gen.0.png"].motion == "zoom_in" and s["gen.0.png"].caption == "a castle"
    assert s["gen.2.png"].motion is None and tuple(s["gen.2.png"].frames.shape) == (1, 16, 16, 3)

    split = tmp_path / "train"
    for label in ("orbit", "look_up"):
        (split / label).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(split / label / f"{i}.jpg")
    manifest = images.main(["--images", str(split), "--out", str(tmp_path / "o2"), "--size", "0", "--workers", "2"])
    assert manifest["motions"] == {"orbit": 2, "look_up": 2}
    labels = {x.meta["file"]: (x.motion, x.meta["split"]) for x in read_samples(tmp_path / "o2")}
    assert labels == {f"{m}/{i}.jpg": (m, "train") for m in ("orbit", "look_up") for i in range(2)}


# ------------------------------------------------------------------------------------- bad input
def _bad_inputs(tmp: Path) -> list[tuple[object, list[str], Path]]:
    (tmp / "empty_split").mkdir()
    (tmp / "imgs" / "pan_left").mkdir(parents=True)
    (tmp / "not_coco.json").write_text(json.dumps({"clip": "caption"}))
    (tmp / "captions_val.json").write_text(json.dumps({"images": [], "annotations": []}))
    (tmp / "instances_train.json").write_text(json.dumps({"annotations": [], "categories": []}))
    out = ["--out", str(tmp / "out")]
    return [
        (realestate10k, ["--cameras", str(tmp / "nope"), "--videos", str(tmp), *out], tmp / "nope"),
        (realestate10k, ["--cameras", str(tmp / "empty_split"), "--videos", str(tmp), *out], tmp / "empty_split"),
        (coco, ["--images", str(tmp), "--captions", str(tmp / "not_coco.json"), *out], tmp / "not_coco.json"),
        (coco, ["--images", str(tmp), "--captions", str(tmp / "captions_val.json"), "--instances",
                str(tmp / "instances_train.json"), *out], tmp / "instances_train.json"),
        (images, ["--images", str(tmp / "imgs"), *out], tmp / "imgs" / "pan_left"),
        (merge, [str(tmp / "out")], tmp / "out" / "parts"),
    ]


def test_bad_input_exits_2_with_one_line_naming_the_path(tmp_path, capsys):
    for module, argv, path in _bad_inputs(tmp_path):
        with pytest.raises(SystemExit) as exc:
            module.main(argv)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and len(err.splitlines()) == 1 and str(path) in err, (module.__name__, err)
    # and from the shell: no traceback
    res = subprocess.run([sys.executable, "-m", "data_prep.realestate10k", "--cameras", str(tmp_path / "empty_split"),
                          "--videos", str(tmp_path), "--out", str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_array_task_comes_from_flags_then_slurm_environment(monkeypatch, capsys):
    import argparse

    from data_prep.common import array_task

    flags = argparse.Namespace(array_index=None, array_count=None)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT", raising=False)
    assert array_task(flags, "prep") == (0, 1)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert array_task(flags, "prep") == (3, 4)
    assert array_task(argparse.Namespace(array_index=1, array_count=2), "prep") == (1, 2)
    with pytest.raises(SystemExit) as exc:
        array_task(argparse.Namespace(array_index=4, array_count=4), "prep")
    assert exc.value.code == 2 and "array index 4 is not in [0, 4)" in capsys.readouterr().err
