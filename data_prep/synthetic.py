"""Build the embedded synthetic dataset: procedural dynamic scenes along the eight camera motions.

    python -m data_prep.synthetic --out data/synthetic [--clips 320] [--val-clips 64] [--test-clips 64]
        [--frames 16] [--size 64] [--seed 0] [--shard-size 64] [--static-fraction 0.0] [--workers 1]

Writes ``OUT/{train,val,test}/shard-NNNNNN.tar`` (samples of :mod:`d4d.data.schema`: frames.mp4,
c2w.npy, intrinsics.npy, depth.npy, mask.npy, meta.json), ``OUT/manifest.json`` (arguments, counts per split
and label) and ``OUT/heldout/sample_<i>.jpg`` + ``labels.json`` (first frames of test clips, for
classifier demos). Clip ``i`` of a split has motion ``MOTIONS[i % 8]`` (balanced labels) and its
scene is drawn from ``default_rng(scene_seed)``, ``scene_seed`` derived from (seed, split, i) and
stored in meta.json; the same arguments give byte-identical files whatever ``--workers``.

Resume: the work is cut into groups, one per shard (``--shard-size`` consecutive clips of a split).
A group writes its shard (``.tmp``, renamed when complete) and its held-out JPEGs, then its record
``OUT/parts/<split>-NNNNNN.json`` (counts, labels, fingerprint of the arguments). A rerun with the same
arguments skips every group whose record and files are there and renders only the missing ones (a
rerun over a finished output renders nothing and rewrites only ``manifest.json`` and ``labels.json``);
with other arguments every group is redone and shards, records and JPEGs of the earlier run that the
new one does not produce are removed.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import multiprocessing as mp
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from d4d.data.procedural import caption, render_clip
from d4d.data.writer import ShardWriter, encode_sample
from d4d.geometry.motions import MOTIONS
from d4d.utils.cli_args import OneLineParser, float_in, nonneg_int, positive_int
from d4d.utils.errors import UserError
from d4d.utils.paths import check_output_dir

log = logging.getLogger("data_prep.synthetic")

SPLITS = ("train", "val", "test")
FPS = 8.0


class _ReproducibleShardWriter(ShardWriter):
    """A :class:`ShardWriter` whose tar members carry a fixed mtime, so that the same samples give
    byte-identical shards (webdataset stamps the current time otherwise)."""

    def _open(self) -> None:
        super()._open()
        self._tar.mtime = 0.0


@dataclasses.dataclass(frozen=True)
class ClipTask:
    split: str
    index: int
    seed: int
    frames: int
    size: int
    static_fraction: float


def scene_seed(seed: int, split: str, index: int) -> int:
    """The 32-bit seed of clip ``index`` of ``split``; ``default_rng(scene_seed)`` re-creates its scene."""
    return int(np.random.SeedSequence([seed, SPLITS.index(split), index]).generate_state(1)[0])


def is_static(seed: int, split: str, index: int, fraction: float) -> bool:
    # A stream apart from the scene's, so that the fraction does not change which scene a seed gives.
    return bool(np.random.default_rng([seed, SPLITS.index(split), index, 1]).random() < fraction)


def make_sample(task: ClipTask) -> tuple[dict[str, Any], dict[str, Any], np.ndarray]:
    """Render and encode one clip -> (WebDataset sample, its meta, first frame uint8 (H, W, 3))."""
    motion = MOTIONS[task.index % len(MOTIONS)]
    sseed = scene_seed(task.seed, task.split, task.index)
    static = is_static(task.seed, task.split, task.index, task.static_fraction)
    clip = render_clip(motion, np.random.default_rng(sseed), task.frames, task.size, static=static)
    key = f"{task.split}_{task.index:06d}"
    meta = {
        "dataset": "synthetic", "clip_id": key, "motion": motion, "motion_confidence": 1.0,
        "caption": caption(clip.scene), "fps": FPS, "metric_depth": True, "split": task.split,
        "scene_seed": sseed, "dynamic": clip.scene.dynamic,
    }
    sample = encode_sample(key, clip.frames, meta, clip.c2w, clip.K, clip.depth, clip.mask, fps=FPS)
    return sample, meta, clip.frames[0]


def _init_worker() -> None:
    # One thread per process: no oversubscription, and the same float results as --workers 1.
    torch.set_num_threads(1)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m data_prep.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--clips", type=positive_int, default=320, help="training clips")
    p.add_argument("--val-clips", type=nonneg_int, default=64)
    p.add_argument("--test-clips", type=nonneg_int, default=64)
    p.add_argument("--frames", type=positive_int, default=16, help="frames per clip")
    p.add_argument("--size", type=int, default=64, help="square frame size in pixels (even, >= 16)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--shard-size", type=positive_int, default=64, help="clips per shard")
    p.add_argument("--static-fraction", type=float_in(0.0, 1.0), default=0.0,
                   help="fraction of clips without moving objects")
    p.add_argument("--workers", type=positive_int, default=1, help="rendering processes")
    p.add_argument("--heldout", type=nonneg_int, default=16, help="first frames of test clips saved as JPEG")
    a = p.parse_args(argv)
    if a.size < 16 or a.size % 2:
        p.error(f"--size must be even and >= 16 (H.264 needs even sizes), got {a.size}")
    try:
        check_output_dir(a.out, "--out")
    except UserError as exc:
        p.error(str(exc))
    return a


PARTS = "parts"


def _fingerprint(args: argparse.Namespace) -> str:
    """Hash of the arguments that change the output (not --out or --workers)."""
    kept = {k: str(v) for k, v in sorted(vars(args).items()) if k not in ("out", "workers")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@dataclasses.dataclass(frozen=True)
class Group:
    """Clips ``start .. stop-1`` of ``split``: one shard ``OUT/<split>/shard-<index>.tar``."""

    split: str
    index: int
    start: int
    stop: int

    @property
    def shard(self) -> str:
        return f"shard-{self.index:06d}.tar"

    @property
    def record(self) -> str:
        return f"{self.split}-{self.index:06d}.json"

    def heldout(self, n: int) -> list[str]:
        """Names of the held-out JPEGs this group writes (test clips with index < ``n``)."""
        return [f"sample_{i}.jpg" for i in range(self.start, min(self.stop, n))] if self.split == "test" else []


def _groups(counts: dict[str, int], shard_size: int) -> list[Group]:
    return [Group(split, j, j * shard_size, min(counts[split], (j + 1) * shard_size))
            for split in SPLITS for j in range(-(-counts[split] // shard_size))]


def _done(out: Path, group: Group, fp: str, heldout: int) -> dict[str, Any] | None:
    """The group's record when it finished under the same arguments and its files are all there."""
    rec_path = out / PARTS / group.record
    try:
        rec = json.loads(rec_path.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("fingerprint") != fp or not (out / group.split / group.shard).is_file():
        return None
    if not all((out / "heldout" / name).is_file() for name in group.heldout(heldout)):
        return None
    return rec


def _remove_stale(out: Path, groups: list[Group], pending: list[Group], heldout: int) -> None:
    """Delete what this run will not keep: unfinished temporaries, shards/records/JPEGs of groups this
    run does not produce (an earlier, larger run), and the files of the groups about to be redone."""
    keep_shards = {(g.split, g.shard) for g in groups if g not in pending}
    keep_records = {g.record for g in groups if g not in pending}
    keep_jpgs = {name for g in groups if g not in pending for name in g.heldout(heldout)}
    for split in SPLITS:
        for old in (out / split).glob("shard-*.tar*"):
            if (split, old.name) not in keep_shards:
                old.unlink()
    for old in (out / PARTS).glob("*.json*"):
        if old.name not in keep_records:
            old.unlink()
    for old in (out / "heldout").glob("sample_*.jpg"):
        if old.name not in keep_jpgs:
            old.unlink()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the CLI; returns the manifest."""
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same floats whatever --workers
    try:
        return _build(args)
    finally:
        torch.set_num_threads(threads)


def _build(args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out
    counts = {"train": args.clips, "val": args.val_clips, "test": args.test_clips}
    heldout_dir = out / "heldout"
    for folder in (heldout_dir, out / PARTS, *(out / split for split in SPLITS)):
        folder.mkdir(parents=True, exist_ok=True)
    fp = _fingerprint(args)
    groups = _groups(counts, args.shard_size)
    records: dict[Group, dict[str, Any]] = {}
    for g in groups:
        rec = _done(out, g, fp, args.heldout)
        if rec is not None:
            records[g] = rec
    pending = [g for g in groups if g not in records]
    _remove_stale(out, groups, pending, args.heldout)
    tasks = [ClipTask(g.split, i, args.seed, args.frames, args.size, args.static_fraction)
             for g in pending for i in range(g.start, g.stop)]
    log.info("synthetic: %d of %d groups to render (%d done earlier), %d clips",
             len(pending), len(groups), len(groups) - len(pending), len(tasks))

    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.workers > 1 and len(tasks) > 1:
            pool = stack.enter_context(mp.get_context("spawn").Pool(args.workers, initializer=_init_worker))
            results = pool.imap(make_sample, tasks, chunksize=4)  # imap keeps the task order
        else:
            results = map(make_sample, tasks)
        bar = stack.enter_context(tqdm(total=len(tasks), desc="synthetic", unit="clip", dynamic_ncols=True))
        for g in pending:
            labels: Counter = Counter()
            dynamic = 0
            heldout: dict[str, str] = {}
            # on an error the writer deletes its unfinished shard; the group has no record, so it is redone
            with _ReproducibleShardWriter(out / g.split, prefix="shard", max_count=1 << 40, max_bytes=1 << 62,
                                          start_index=g.index) as writer:
                for _ in range(g.start, g.stop):
                    sample, meta, first = next(results)
                    writer.write(sample)
                    labels[meta["motion"]] += 1
                    dynamic += int(meta["dynamic"])
                    index = int(meta["clip_id"].rsplit("_", 1)[1])
                    if g.split == "test" and index < args.heldout:
                        name = f"sample_{index}.jpg"
                        Image.fromarray(first).save(heldout_dir / name, format="JPEG", quality=95)
                        heldout[name] = meta["motion"]
                    bar.update(1)
            records[g] = {"dataset": "synthetic", "split": g.split, "group": g.index, "fingerprint": fp,
                          "clips": g.stop - g.start, "shard": g.shard, "dynamic_clips": dynamic,
                          "motions": dict(labels), "heldout": heldout}
            _write_json(out / PARTS / g.record, records[g])
    seconds = time.perf_counter() - start

    heldout = {name: motion for g in groups for name, motion in records[g]["heldout"].items()}
    (heldout_dir / "labels.json").write_text(json.dumps(heldout, indent=2, sort_keys=True) + "\n")
    splits = {}
    for split in SPLITS:
        mine = [g for g in groups if g.split == split]
        motions: Counter = Counter()
        for g in mine:
            motions.update(records[g]["motions"])
        splits[split] = {"clips": counts[split], "dynamic_clips": sum(records[g]["dynamic_clips"] for g in mine),
                         "shards": [g.shard for g in mine], "motions": {m: motions[m] for m in MOTIONS}}
    manifest = {
        "dataset": "synthetic",
        # Without --out, so that the same arguments give the same manifest wherever it is written.
        "args": {k: v for k, v in sorted(vars(args).items()) if k != "out"},
        "motions": list(MOTIONS),
        "fps": FPS,
        "splits": splits,
        "heldout": len(heldout),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    total = sum(counts.values())
    log.info("%d clips (train %d, val %d, test %d) of %d frames at %dx%d in %s; rendered %d in %.1f s "
             "(%.1f clips/s)",
             total, counts["train"], counts["val"], counts["test"], args.frames, args.size, args.size,
             out, len(tasks), seconds, len(tasks) / max(seconds, 1e-9))
    return manifest


if __name__ == "__main__":
    main()
