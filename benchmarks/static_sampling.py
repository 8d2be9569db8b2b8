"""Long-path sampling of the static module: 80 frames in chunks anchored on generated views (SEVA's
two passes, :func:`d4d.models.static.sampling.plan_chunks`). Are chunk boundaries visible as jumps?

For a checkpoint (``--checkpoint``: a ``d4d.fit`` checkpoint of the static stage, or the file
``benchmarks.static_consistency --save`` writes), generate ``--frames`` frames from one held-out
synthetic image along ``--motion``, then compare the frame-to-frame mean absolute difference
``|f[i+1] - f[i]|`` across pairs generated in different chunks (boundaries) with pairs generated
in the same chunk (the baseline, same run). A ratio near 1 means no visible seams.

    python -m benchmarks.static_sampling --checkpoint CKPT [--frames 80] [--motion orbit] [--steps 50]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def chunk_of_frames(chunks: list[dict], num_frames: int) -> list[int]:
    owner = [-1] * num_frames
    for i, c in enumerate(chunks):
        for t in c["targets"]:
            owner[t] = i
    return owner


def boundary_stats(frames: torch.Tensor, chunks: list[dict]) -> dict:
    """Mean ``|f[i+1] - f[i]|`` over pairs from the same chunk and over pairs from different chunks
    (frame 0, the input, belongs to no chunk and is left out)."""
    owner = chunk_of_frames(chunks, frames.shape[0])
    diffs = (frames[1:] - frames[:-1]).abs().mean((1, 2, 3))
    within = [diffs[i].item() for i in range(1, frames.shape[0] - 1) if owner[i] == owner[i + 1]]
    across = [diffs[i].item() for i in range(1, frames.shape[0] - 1) if owner[i] != owner[i + 1]]
    return {"diffs": diffs, "owner": owner, "within": sum(within) / max(1, len(within)),
            "across": sum(across) / max(1, len(across)), "n_within": len(within), "n_across": len(across)}


def figure(path: Path, frames: torch.Tensor, stats: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = frames.shape[0]
    show = list(range(0, n, max(1, n // 10)))[:10]
    fig = plt.figure(figsize=(12, 4.2))
    grid = fig.add_gridspec(2, len(show), height_ratios=[1, 1.3])
    for c, i in enumerate(show):
        ax = fig.add_subplot(grid[0, c])
        ax.imshow(frames[i].permute(1, 2, 0).numpy())
        ax.set_title(f"frame {i}", fontsize=7)
        ax.axis("off")
    ax = fig.add_subplot(grid[1, :])
    diffs, owner = stats["diffs"], stats["owner"]
    ax.plot(range(1, n), diffs.numpy(), color="black", lw=1, label="|f[i] - f[i-1]|")
    cross = [i + 1 for i in range(1, n - 1) if owner[i] != owner[i + 1]]
    ax.scatter(cross, diffs[[c - 1 for c in cross]].numpy(), color="tab:red", s=14, zorder=3,
               label=f"chunk boundary (mean {stats['across']:.4f})")
    ax.axhline(stats["within"], color="tab:blue", ls="--", lw=1, label=f"within-chunk mean {stats['within']:.4f}")
    ax.set_xlabel("frame")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default=None, help="synthetic shards whose first static val clip gives the image "
                                                "(default: a random image)")
    p.add_argument("--frames", type=int, default=80)
    p.add_argument("--motion", default="orbit")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--figure", default="docs/static_sampling.png")
    p.add_argument("--out", default=None, help="also write video.mp4, frames, cameras here (d4d.video.io)")
    args = p.parse_args()
    from tqdm import tqdm

    from d4d.modules.static import StaticVideoModule
    from d4d.video.interface import VideoRequest
    from d4d.video.paths import resolve_camera_path

    module = StaticVideoModule.from_checkpoint(args.checkpoint)
    h, w = (int(s) for s in module.hparams.image_size)
    if args.data:
        from benchmarks.static_consistency import loader

        image = next(iter(loader(str(Path(args.data) / "val"), 1, False, h)))["frames"][0, 0]
    else:
        image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(args.seed))
    camera = resolve_camera_path(args.motion, args.frames, h, w)
    bar = tqdm(total=1, desc="sampling", file=sys.stdout, mininterval=10)

    def progress(done, total, what):
        bar.total = total
        bar.n = done
        bar.refresh()

    start = time.perf_counter()
    result = module.generate(VideoRequest(image=image, camera=camera, seed=args.seed, num_steps=args.steps,
                                          guidance={"cfg": args.cfg}), progress)
    bar.close()
    seconds = time.perf_counter() - start
    stats = boundary_stats(result.frames, result.info["chunks"])
    print(f"{args.frames} frames, {args.motion}, {len(result.info['chunks'])} chunks of <= "
          f"{result.info['window']} views, {args.steps} Euler steps, cfg {args.cfg}: {seconds:.0f} s "
          "(2 shared CPU cores, under load)")
    print(f"frame-to-frame |diff|: within chunks {stats['within']:.4f} ({stats['n_within']} pairs), "
          f"across chunk boundaries {stats['across']:.4f} ({stats['n_across']} pairs), "
          f"ratio {stats['across'] / max(stats['within'], 1e-12):.2f}")
    if args.figure:
        figure(REPO / args.figure, result.frames, stats,
               f"{args.frames}-frame {args.motion}, debug model: frame-to-frame difference")
        print(f"figure: {args.figure}")
    if args.out:
        from d4d.video.io import write_video_outputs

        write_video_outputs(result, args.out)
        print(f"outputs: {args.out}")


if __name__ == "__main__":
    main()
