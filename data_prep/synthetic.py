"""Build the embedded synthetic dataset: procedural dynamic scenes along the eight camera motions.

    python -m data_prep.synthetic --out data/synthetic [--clips 320] [--val-clips 64] [--test-clips 64]
        [--frames 16] [--size 64] [--seed 0] [--shard-size 64] [--static-fraction 0.0] [--workers 1]

Writes ``OUT/{train,val,test}/shard-NNNNNN.tar`` (samples of :mod:`d4d.data.schema`: frames.mp4,
c2w.npy, intrinsics.npy, depth.npy, mask.npy, meta.json), ``OUT/manifest.json`` (arguments, counts per split
and label) and ``OUT/heldout/sample_<i>.jpg`` + ``labels.json`` (first frames of test clips, for
classifier demos). Clip ``i`` of a split has motion ``MOTIONS[i % 8]`` (balanced labels) and its
scene is drawn from ``default_rng(scene_seed)``, ``scene_seed`` derived from (seed, split, i) and
stored in meta.json; the same arguments give byte-identical files whatever ``--workers``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import multiprocessing as mp
import sys
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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog="python -m data_prep.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--clips", type=int, default=320, help="training clips")
    p.add_argument("--val-clips", type=int, default=64)
    p.add_argument("--test-clips", type=int, default=64)
    p.add_argument("--frames", type=int, default=16, help="frames per clip")
    p.add_argument("--size", type=int, default=64, help="square frame size in pixels (even, >= 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=64, help="clips per shard")
    p.add_argument("--static-fraction", type=float, default=0.0,
                   help="fraction of clips without moving objects")
    p.add_argument("--workers", type=int, default=1, help="rendering processes")
    p.add_argument("--heldout", type=int, default=16, help="first frames of test clips saved as JPEG")
    a = p.parse_args(argv)
    checks = [
        (a.clips >= 1, f"--clips must be >= 1, got {a.clips}"),
        (a.val_clips >= 0, f"--val-clips must be >= 0, got {a.val_clips}"),
        (a.test_clips >= 0, f"--test-clips must be >= 0, got {a.test_clips}"),
        (a.frames >= 1, f"--frames must be >= 1, got {a.frames}"),
        (a.size >= 16 and a.size % 2 == 0,
         f"--size must be even and >= 16 (H.264 needs even sizes), got {a.size}"),
        (a.seed >= 0, f"--seed must be >= 0, got {a.seed}"),
        (a.shard_size >= 1, f"--shard-size must be >= 1, got {a.shard_size}"),
        (0.0 <= a.static_fraction <= 1.0, f"--static-fraction must be in [0, 1], got {a.static_fraction}"),
        (a.workers >= 1, f"--workers must be >= 1, got {a.workers}"),
        (a.heldout >= 0, f"--heldout must be >= 0, got {a.heldout}"),
    ]
    for ok, why in checks:
        if not ok:
            p.error(why)
    return a


def _clear(folder: Path, pattern: str) -> None:
    """Remove outputs of an earlier run (a smaller run would otherwise leave stale shards behind)."""
    for old in folder.glob(pattern):
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
    tasks = [ClipTask(split, i, args.seed, args.frames, args.size, args.static_fraction)
             for split in SPLITS for i in range(counts[split])]
    heldout_dir = out / "heldout"
    heldout_dir.mkdir(parents=True, exist_ok=True)
    _clear(heldout_dir, "sample_*.jpg")
    labels: dict[str, Counter] = {s: Counter() for s in SPLITS}
    dynamic: Counter = Counter()
    heldout: dict[str, str] = {}

    start = time.perf_counter()
    with contextlib.ExitStack() as stack:  # on an error the writers delete their unfinished shard
        writers = {}
        for split in SPLITS:
            (out / split).mkdir(parents=True, exist_ok=True)
            _clear(out / split, "shard-*.tar*")
            writers[split] = stack.enter_context(
                _ReproducibleShardWriter(out / split, prefix="shard", max_count=args.shard_size))
        if args.workers > 1:
            pool = stack.enter_context(mp.get_context("spawn").Pool(args.workers, initializer=_init_worker))
            results = pool.imap(make_sample, tasks, chunksize=4)  # imap keeps the task order
        else:
            results = map(make_sample, tasks)
        for task, (sample, meta, first) in tqdm(zip(tasks, results), total=len(tasks), desc="synthetic",
                                                unit="clip", dynamic_ncols=True):
            writers[task.split].write(sample)
            labels[task.split][meta["motion"]] += 1
            dynamic[task.split] += int(meta["dynamic"])
            if task.split == "test" and task.index < args.heldout:
                name = f"sample_{task.index}.jpg"
                Image.fromarray(first).save(heldout_dir / name, format="JPEG", quality=95)
                heldout[name] = meta["motion"]
    seconds = time.perf_counter() - start

    (heldout_dir / "labels.json").write_text(json.dumps(heldout, indent=2, sort_keys=True) + "\n")
    manifest = {
        "dataset": "synthetic",
        # Without --out, so that the same arguments give the same manifest wherever it is written.
        "args": {k: v for k, v in sorted(vars(args).items()) if k != "out"},
        "motions": list(MOTIONS),
        "fps": FPS,
        "splits": {
            s: {"clips": counts[s], "dynamic_clips": dynamic[s],
                "shards": [p.name for p in writers[s].shards],
                "motions": {m: labels[s][m] for m in MOTIONS}}
            for s in SPLITS
        },
        "heldout": len(heldout),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    log.info("wrote %d clips (train %d, val %d, test %d) of %d frames at %dx%d to %s in %.1f s "
             "(%.1f clips/s)",
             len(tasks), counts["train"], counts["val"], counts["test"], args.frames, args.size, args.size,
             out, seconds, len(tasks) / max(seconds, 1e-9))
    return manifest


if __name__ == "__main__":
    main()
