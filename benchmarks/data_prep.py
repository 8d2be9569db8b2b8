"""Clips/s of RealEstate10K preparation (``data_prep.realestate10k``) with 1 and 2 worker processes.

    python -m benchmarks.data_prep                       # the seven real clips x 6, 256x256, mp4
    python -m benchmarks.data_prep --repeat 10 --size 256x384 --workers 1 2 4

Builds a temporary split folder of symlinks to the seven real clips of ``../shared/data/realestate10k``
(each clip ``--repeat`` times under new ids, so there is enough work for the pool), runs the full
preparation (decode 16 frames of 384x256, resize/crop, classify the path, encode mp4 + the first-frame
JPEG, write shards, merge the manifest) once per worker count into fresh folders, in turns, and
reports the median clips/s over ``--runs`` runs (process start-up of the pool included: it is part
of what a user waits for). It also prints the motion label given to each of the seven clips.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

from data_prep import realestate10k

RE10K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "realestate10k"


def layout(root: Path, repeat: int) -> tuple[Path, Path]:
    """<root>/cams/bench/<id>[r<k>].txt and <root>/videos/<same>.mp4, symlinks to the real clips."""
    cams, videos = root / "cams" / "bench", root / "videos"
    cams.mkdir(parents=True)
    videos.mkdir()
    for txt in sorted((RE10K / "pose_files").glob("*.txt")):
        for k in range(repeat):
            name = txt.stem + (f"r{k}" if k else "")
            (cams / f"{name}.txt").symlink_to(txt)
            (videos / f"{name}.mp4").symlink_to(RE10K / "videos" / f"{txt.stem}.mp4")
    return cams, videos


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repeat", type=int, default=6, help="copies of each of the seven clips")
    p.add_argument("--size", default="256x256", help="output H x W")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--runs", type=int, default=2, help="timed runs per worker count (median)")
    args = p.parse_args()
    if not (RE10K / "pose_files").is_dir():
        raise SystemExit(f"benchmarks.data_prep: error: RealEstate10K sample not found at {RE10K}")
    logging.getLogger("d4d").setLevel(logging.WARNING)  # keep the output to the figures
    os.environ.setdefault("TQDM_DISABLE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        cams, videos = layout(Path(tmp), args.repeat)
        clips = len(list(cams.glob("*.txt")))
        rates: dict[int, list[float]] = {w: [] for w in args.workers}
        manifest = None
        for run in range(args.runs):
            for w in args.workers:
                out = Path(tmp) / f"out_w{w}_r{run}"
                start = time.perf_counter()
                manifest = realestate10k.main(["--cameras", str(cams), "--videos", str(videos), "--out", str(out),
                                               "--size", args.size, "--shard-size", "4", "--workers", str(w)])
                rates[w].append(clips / (time.perf_counter() - start))
        labels = {}
        for shard in sorted(Path(tmp, f"out_w{args.workers[0]}_r0").glob("*.tar")):
            with tarfile.open(shard) as tar:
                for m in tar.getmembers():
                    if m.name.endswith(".meta.json"):
                        meta = json.load(tar.extractfile(m))
                        if meta["clip_id"] in {t.stem for t in (RE10K / "pose_files").glob("*.txt")}:
                            labels[meta["clip_id"]] = (meta["motion"], meta["motion_best"], meta["motion_confidence"])
    print(f"RealEstate10K preparation: {clips} clips (7 real x {args.repeat}) of 16 frames 384x256 -> "
          f"{args.size}, mp4; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    medians = {w: statistics.median(r) for w, r in rates.items()}
    for w in args.workers:
        print(f"  workers={w}: {medians[w]:6.2f} clips/s  (runs: {', '.join(f'{r:.2f}' for r in rates[w])})")
    base = medians[args.workers[0]]
    for w in args.workers[1:]:
        print(f"  speed-up workers={w} / workers={args.workers[0]}: x{medians[w] / base:.2f}")
    print(f"  label histogram (all windows): {manifest['motions']}")
    print("  labels of the seven clips (label | best template, confidence):")
    for clip, (label, best, conf) in sorted(labels.items()):
        print(f"    {clip}: {label} | {best}, {conf:.3f}")


if __name__ == "__main__":
    main()
