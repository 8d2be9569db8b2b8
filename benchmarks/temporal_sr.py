"""Depth-guided temporal super-resolution (``d4d.temporal_sr``) against linear frame blending.

A procedural scene (``d4d.data.procedural``) is ray-cast at ``2F - 1`` frames along its camera path
(the ground truth); the even frames with their rendered depth and cameras are the input, the odd ones
are to be made. For each method we print the temporal flicker (:func:`d4d.metrics.temporal_flicker`,
Lai et al. warping error, lower = steadier), the PSNR of the made frames against the true in-between
frames, and the time per clip; the ground-truth video's flicker is the floor.

    .venv/bin/python benchmarks/temporal_sr.py [--clips 4] [--frames 8] [--size 64] [--factor 2] \\
        [--scenes static|dynamic] [--plot docs/generate_temporal_sr.png]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from d4d.data.procedural import render, sample_scene  # noqa: E402
from d4d.geometry.motions import MOTIONS  # noqa: E402
from d4d.metrics import temporal_flicker  # noqa: E402
from d4d.temporal_sr import linear_blend, temporal_super_resolution  # noqa: E402


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / (a - b).pow(2).mean().clamp_min(1e-10)))


def make_clip(motion: str, seed: int, frames: int, size: int, factor: int, static: bool):
    scene, path = sample_scene(motion, np.random.default_rng(seed), static=static)
    n = (frames - 1) * factor + 1
    c2w = path.c2w(n)
    K = path.K(size, size)
    rgb, depth, _ = render(scene, c2w, K.expand(n, 3, 3), size, size)
    video = torch.as_tensor(rgb).permute(0, 3, 1, 2).float() / 255
    return video, torch.as_tensor(depth).float(), c2w.float(), K.float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--frames", type=int, default=8, help="input frames per clip")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--factor", type=int, default=2)
    p.add_argument("--plot", default=None, help="write a picture of one clip's in-between frames here")
    p.add_argument(
        "--scenes",
        choices=("static", "dynamic"),
        default="static",
        help="static scenes, or scenes with moving objects (the warp assumes a static scene)",
    )
    args = p.parse_args()
    motions = [m for m in MOTIONS if m != "stationary"]
    rows = {"ground truth": [], "linear blend": [], "depth-guided": []}
    for c in range(args.clips):
        motion = motions[c % len(motions)]
        gt, depth, c2w, K = make_clip(motion, c, args.frames, args.size, args.factor, args.scenes == "static")
        idx = list(range(0, gt.shape[0], args.factor))
        new = [i for i in range(gt.shape[0]) if i % args.factor]
        t0 = time.perf_counter()
        lin = linear_blend(gt[idx], args.factor)
        t_lin = time.perf_counter() - t0
        t0 = time.perf_counter()
        sr = temporal_super_resolution(gt[idx], depth[idx], c2w[idx], K, args.factor)
        t_sr = time.perf_counter() - t0
        for name, video, secs in (
            ("ground truth", gt, 0.0),
            ("linear blend", lin, t_lin),
            ("depth-guided", sr.frames, t_sr),
        ):
            rows[name].append((temporal_flicker(video), psnr(video[new], gt[new]), secs))
        gt_r, lin_r, sr_r = (rows[k][-1] for k in ("ground truth", "linear blend", "depth-guided"))
        print(
            f"clip {c} ({motion}): flicker gt {gt_r[0]:.5f}  linear {lin_r[0]:.5f}  "
            f"depth-guided {sr_r[0]:.5f}"
            f" | PSNR new frames linear {lin_r[1]:.2f} dB  depth-guided {sr_r[1]:.2f} dB "
            f"(fallback {100 * sr.fallback:.1f}% px)",
            flush=True,
        )
        if args.plot and c == 0:
            plot(gt, lin, sr.frames, new[:3], args.plot, motion)
    print(
        f"\n{args.clips} {args.scenes} clips, {args.frames} -> "
        f"{(args.frames - 1) * args.factor + 1} frames at "
        f"{args.size}x{args.size} (CPU, shared machine)"
    )
    print(f"{'method':<14s} {'flicker':>9s} {'PSNR new (dB)':>14s} {'s/clip':>8s}")
    for name, vals in rows.items():
        v = np.array(vals)
        psnr_txt = "-" if name == "ground truth" else f"{v[:, 1].mean():.2f}"
        print(f"{name:<14s} {v[:, 0].mean():9.5f} {psnr_txt:>14s} {v[:, 2].mean():8.3f}")


def plot(gt, lin, sr, picks, path, motion) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(picks), figsize=(2.4 * len(picks), 7.4), squeeze=False)
    for col, i in enumerate(picks):
        for row, (name, video) in enumerate(
            (("ground truth", gt), ("linear blend", lin), ("depth-guided", sr))
        ):
            ax = axes[row, col]
            ax.imshow(video[i].clamp(0, 1).permute(1, 2, 0).numpy())
            ax.set_title(
                f"{name}\nframe {i} ({psnr(video[i], gt[i]):.1f} dB)" if row else f"{name}\nframe {i}",
                fontsize=8,
            )
            ax.axis("off")
    fig.suptitle(f"in-between frames ({motion})", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
