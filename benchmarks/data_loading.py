"""Samples/s of the shard pipeline against loose per-clip folders of JPEGs, through a DataLoader.

    python -m benchmarks.data_loading                      # 200 clips, 16 frames of 64x64, workers 0 and 2
    python -m benchmarks.data_loading --clips 400 --size 128 --workers 0 4

Writes the same synthetic clips three ways into a temporary folder: WebDataset shards with
``frames.mp4``, shards with ``frames.npy``, and one folder per clip (``000.jpg``... plus ``c2w.npy``,
``intrinsics.npy``, ``depth.npy``, ``meta.json``) read by a plain map-style Dataset that decodes the JPEGs
with PIL. The mp4 shards are also read over HTTP, served by ``python -m http.server`` on 127.0.0.1
during the run (curl per shard, as for any http(s) shard spec): that row against the local one is
the cost of the network path itself, without a network's latency or bandwidth. Every variant ends
in the same validated ClipSample and the same tensors, so the figures compare storage formats and
transports, not amounts of work. One warm-up epoch per configuration is not
timed (worker start-up, page cache); the figures are medians over the timed epochs, taken in turns.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from d4d.data.schema import ClipSample
from d4d.data.shards import build_clip_pipeline
from d4d.data.writer import ShardWriter, encode_sample


def synthetic_clip(seed: int, frames: int, size: int) -> dict[str, np.ndarray]:
    """A camera panning right over a smooth random texture: frames uint8 ``(T, S, S, 3)``,
    c2w ``(T, 4, 4)`` (OpenCV, translation along +x), K ``(T, 3, 3)``, depth float32 ``(T, S, S)``.

    Smooth content moving coherently is what H.264 compresses well on real footage; white noise
    would make the mp4 variant look far worse than it is.
    """
    g = torch.Generator().manual_seed(seed)
    margin = size // 2
    low = torch.rand(4, 1, 8, 8 + 4, generator=g)  # RGB texture + depth, wider than the view for the pan
    canvas = F.interpolate(low, size=(size, size + margin), mode="bicubic", align_corners=False)[:, 0]
    texture = (canvas[:3] * 255).clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    depth_canvas = (1.0 + 4.0 * canvas[3].clamp(0, 1)).numpy()
    shifts = np.linspace(0, margin, frames).round().astype(int)
    video = np.stack([texture[:, s:s + size] for s in shifts])
    depth = np.stack([depth_canvas[:, s:s + size] for s in shifts]).astype(np.float32)
    focal = float(size)
    c2w = np.tile(np.eye(4, dtype=np.float32), (frames, 1, 1))
    c2w[:, 0, 3] = shifts * 3.0 / focal  # pixels of pan at ~3 units of depth, in world units
    K = np.tile(np.array([[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1]], np.float32), (frames, 1, 1))
    return {"frames": video, "c2w": c2w, "K": K, "depth": depth}


def write_variants(root: Path, clips: int, frames: int, size: int, shard_size: int) -> dict[str, Path]:
    """The same clips as mp4 shards, npy shards and loose folders under ``root``."""
    from PIL import Image

    out = {"shards (mp4)": root / "shards_mp4", "shards (npy)": root / "shards_npy",
           "loose (jpg)": root / "loose"}
    with ShardWriter(out["shards (mp4)"], max_count=shard_size) as mp4, \
            ShardWriter(out["shards (npy)"], max_count=shard_size) as npy:
        for i in range(clips):
            clip = synthetic_clip(i, frames, size)
            meta = {"dataset": "synthetic", "clip_id": f"clip{i:05d}", "fps": 8.0}
            for writer, fmt in ((mp4, "mp4"), (npy, "npy")):
                writer.write(encode_sample(f"clip{i:05d}", clip["frames"], meta, c2w=clip["c2w"], K=clip["K"],
                                           depth=clip["depth"], frame_format=fmt))
            folder = out["loose (jpg)"] / f"clip{i:05d}"
            folder.mkdir(parents=True)
            for t, frame in enumerate(clip["frames"]):
                Image.fromarray(frame).save(folder / f"{t:03d}.jpg", quality=95)  # as ShardWriter's jpg
            np.save(folder / "c2w.npy", clip["c2w"])
            np.save(folder / "intrinsics.npy", clip["K"])
            np.save(folder / "depth.npy", clip["depth"].astype(np.float16))  # as the shards store it
            (folder / "meta.json").write_text(json.dumps(meta))
    return out


class LooseClipFolders(Dataset):
    """One folder per clip: ``NNN.jpg`` frames decoded with PIL, plus the ``.npy`` arrays and meta."""

    def __init__(self, root: Path, transform=None):
        self.folders = sorted(p for p in Path(root).iterdir() if p.is_dir())
        self.transform = transform

    def __len__(self) -> int:
        return len(self.folders)

    def __getitem__(self, index: int):
        from PIL import Image

        folder = self.folders[index]
        frames = []
        for path in sorted(folder.glob("*.jpg")):
            with Image.open(path) as image:
                frames.append(np.array(image.convert("RGB")))
        raw = {"__key__": folder.name, "frames.npy": np.stack(frames),
               "meta.json": json.loads((folder / "meta.json").read_text())}
        for name in ("c2w.npy", "intrinsics.npy", "depth.npy"):
            raw[name] = np.load(folder / name)
        sample = ClipSample.from_raw(raw)
        return sample if self.transform is None else self.transform(sample)


def to_tensors(sample: ClipSample) -> dict[str, torch.Tensor]:
    """What a training stage's transform would hand the collate: fixed-shape tensors."""
    return {"frames": sample.frames_float(), "c2w": sample.c2w, "K": sample.K, "depth": sample.depth}


def samples_per_second(datasets: dict[str, Dataset], workers: int, batch_size: int,
                       repeats: int) -> dict[str, float]:
    """Median samples/s of each dataset over ``repeats`` epochs, the variants taking turns so that a
    change in the machine's load (other users of the CPU) hits them all alike."""
    loaders = {name: DataLoader(ds, batch_size=batch_size, num_workers=workers,
                                persistent_workers=workers > 0)
               for name, ds in datasets.items()}
    for loader in loaders.values():  # warm-up epoch: worker start-up and page cache are not compared
        for _ in loader:
            pass
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(repeats):
        for name, loader in loaders.items():
            count, start = 0, time.perf_counter()
            for batch in loader:
                count += len(batch["frames"])
            rates[name].append(count / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def serve_http(root: Path, log: Path | None = None) -> tuple[subprocess.Popen, str]:
    """``python -m http.server`` serving ``root`` on 127.0.0.1 (a free port it picks): (process, base URL).
    The server's request log goes to ``log`` (default: discarded). Stop it with :func:`stop`."""
    # port 0: the server picks a free port and prints it, so no other process can take it first
    with open(log if log is not None else os.devnull, "w") as err:
        proc = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "--bind", "127.0.0.1", "0"], cwd=root,
                                stdout=subprocess.PIPE, stderr=err, text=True)
    match = re.search(r"port (\d+)", proc.stdout.readline())
    if match is None:
        stop(proc)
        raise RuntimeError("python -m http.server did not start")
    return proc, f"http://127.0.0.1:{match.group(1)}"


def stop(proc: subprocess.Popen) -> None:
    """Stop a server of :func:`serve_http` by its PID (SIGTERM, then SIGKILL after 10 s)."""
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def folder_megabytes(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


HTTP = "shards (mp4, http)"


def main(argv: list[str] | None = None) -> dict[tuple[str, int], float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=64,
                        help="frame height and width (even; decord cannot read 8/12/16/24/48/72 px wide mp4)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                        help="DataLoader num_workers to try")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=50, help="clips per shard")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per configuration (median)")
    parser.add_argument("--out", type=Path, default=None,
                        help="keep the written data here (default: a temp dir, deleted)")
    args = parser.parse_args(argv)
    # DataLoader workers run torch on one thread; the main process does too here, because OpenMP
    # threads spinning on a CPU shared with other jobs made num_workers=0 up to 10x slower at random
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    root = Path(tempfile.mkdtemp(prefix="d4d_bench_")) if args.out is None else args.out
    if args.out is not None and root.exists() and any(root.iterdir()):
        parser.error(f"--out {root} is not empty")
    server = None
    try:
        start = time.perf_counter()
        paths = write_variants(root, args.clips, args.frames, args.size, args.shard_size)
        print(f"wrote {args.clips} clips of {args.frames}x{args.size}x{args.size} three ways in "
              f"{time.perf_counter() - start:.1f} s under {root}")
        megabytes = {name: folder_megabytes(path) for name, path in paths.items()}
        datasets = {name: (LooseClipFolders(path, to_tensors) if name.startswith("loose")
                           else build_clip_pipeline(str(path), transform=to_tensors, max_skip_fraction=0.0))
                    for name, path in paths.items()}
        server, base = serve_http(root)
        shards = sorted(p.name for p in paths["shards (mp4)"].glob("*.tar"))
        assert shards == [f"shard-{i:06d}.tar" for i in range(len(shards))], shards
        folder = paths["shards (mp4)"].name
        datasets[HTTP] = build_clip_pipeline(f"{base}/{folder}/shard-{{000000..{len(shards) - 1:06d}}}.tar",
                                             transform=to_tensors, max_skip_fraction=0.0)
        megabytes[HTTP] = megabytes["shards (mp4)"]
        rates = {}
        for w in args.workers:
            for name, rate in samples_per_second(datasets, w, args.batch_size, args.repeats).items():
                rates[name, w] = rate
    finally:
        torch.set_num_threads(threads)
        if server is not None:
            stop(server)
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)

    print(f"load average (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in os.getloadavg())} on "
          f"{os.cpu_count()} CPUs; batch size {args.batch_size}, median of {args.repeats} epochs")
    print(f"{'variant':<19}{'MB on disk':>12}" + "".join(f"{f'samples/s w={w}':>17}" for w in args.workers))
    for name in datasets:
        print(f"{name:<19}{megabytes[name]:>12.1f}"
              + "".join(f"{rates[name, w]:>17.1f}" for w in args.workers))
    for name in datasets:
        if name.startswith("shards"):
            ratios = [rates[name, w] / rates["loose (jpg)", w] for w in args.workers]
            print(f"{name + ' / loose':<31}" + "".join(f"{f'x{r:.2f}':>17}" for r in ratios))
    ratios = [rates[HTTP, w] / rates["shards (mp4)", w] for w in args.workers]
    print(f"{HTTP + ' / local':<31}" + "".join(f"{f'x{r:.2f}':>17}" for r in ratios))
    return rates


if __name__ == "__main__":
    main()
