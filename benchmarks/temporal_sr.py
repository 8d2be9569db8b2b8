"""Depth-guided temporal super-resolution (``d4d.temporal_sr``) against linear frame blending, with and
without a 4D scene's motion.

A procedural scene (``d4d.data.procedural``) is ray-cast at ``(F - 1) * k + 1`` frames along its camera
path (the ground truth); every k-th frame with its rendered depth and camera is the input, the others
are to be made. Methods:

* ``linear blend``: ``(1 - a) I_i + a I_{i+1}``;
* ``static warp``: depth-guided warp assuming a static scene between neighbours (no ``scene``);
* ``4D scene``: the same warp moved by a :class:`~d4d.fourd.scene.PointScene4D` built from the input
  frames' point maps and optimised per scene (``--scene-steps``), as ``d4d.generate`` does;
* ``true motion``: the warp moved by an oracle scene whose ``points_at(t)`` follows the procedural
  objects' true trajectories (the ceiling of what a deformation field can give the warp).

Printed per clip and on average: temporal flicker (:func:`d4d.metrics.temporal_flicker`, Lai et al.
warping error, lower = steadier; the ground truth's is the floor), PSNR of the made frames against
the true ones (all pixels, and the pixels of moving objects), and seconds per clip.

    .venv/bin/python -m benchmarks.temporal_sr [--clips 7] [--frames 8] [--size 64] [--factor 2] \\
        [--scenes both|static|dynamic] [--scene-steps 60] [--plot docs/generate_temporal_sr.png]
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
from d4d.geometry.points import depth_to_points  # noqa: E402
from d4d.metrics import temporal_flicker  # noqa: E402
from d4d.temporal_sr import linear_blend, temporal_super_resolution  # noqa: E402

METHODS = ("linear blend", "static warp", "4D scene", "true motion")


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """PSNR (dB) of ``(..., 3, H, W)`` images in [0, 1], over ``mask (..., H, W)`` pixels if given."""
    err = (a.float() - b.float()).pow(2).mean(-3)
    mse = err.mean() if mask is None else (err[mask].mean() if mask.any() else torch.tensor(float("nan")))
    return float(10 * torch.log10(1.0 / mse.clamp_min(1e-10)))


class TrajectoryScene:
    """An oracle 4D scene (``points_at(t)``, ``num_frames``) of a procedural clip: the input frames'
    pixels lifted with their true depth; points on a moving object follow its true trajectory
    (``Shape.trajectory.offset``), the rest stand still. Times ``t = j / (F - 1)`` as the clip's."""

    def __init__(self, scene, depth: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor, max_points=20000):
        f = depth.shape[0]
        self.num_frames = f
        times = torch.linspace(0, 1, f) if f > 1 else torch.zeros(1)
        world, _ = depth_to_points(depth.float(), K.float().expand(f, 3, 3), c2w.float())
        canon, owner = [], []
        for j in range(f):
            ok = depth[j] > 0
            p = world[j][ok]
            who = torch.full((len(p),), -1)
            for s_idx, s in enumerate(scene.shapes):
                if not s.moving:
                    continue
                q = p - s.centres(times[j : j + 1])[0]
                if s.kind == "box":
                    sdf = (q.abs() - torch.tensor(s.half)).amax(-1)
                else:
                    sdf = q.norm(dim=-1) - s.half[0]
                on = (sdf.abs() < 1e-3 * depth[j][ok] + 1e-4) & (who < 0)
                who[on] = s_idx
                p[on] -= s.trajectory.offset(times[j : j + 1])[0]  # back to the object's t = 0 place
            canon.append(p)
            owner.append(who)
        pts, who = torch.cat(canon), torch.cat(owner)
        keep = torch.randperm(len(pts), generator=torch.Generator().manual_seed(0))[:max_points]
        self.xyz, self.owner, self.shapes = pts[keep], who[keep], scene.shapes

    def points_at(self, t: float):
        xyz = self.xyz.clone()
        for s_idx in self.owner.unique().tolist():
            if s_idx >= 0:
                sel = self.owner == s_idx
                xyz[sel] += self.shapes[s_idx].trajectory.offset(torch.tensor([float(t)]))[0]
        return xyz, torch.full_like(xyz, 0.5), torch.ones(len(xyz))


def optimised_scene(frames, depth, c2w, K, steps: int, flow_steps: int = 200):
    """A :class:`PointScene4D` from the input frames' true point maps, optimised for ``steps`` joint
    steps (no pose correction: the cameras are exact), as ``d4d.generate`` builds its scene."""
    from d4d.fourd.optimise import OptimConfig, optimise_scene
    from d4d.fourd.scene import PointScene4D

    f = frames.shape[0]
    world, _ = depth_to_points(depth.float(), K.float().expand(f, 3, 3), c2w.float())
    scene = PointScene4D.from_point_maps(world, frames, (depth > 0).float(), c2w, K, max_points=20000)
    optimise_scene(scene, frames, OptimConfig(pose_steps=0, steps=steps, flow_steps=flow_steps))
    return scene.eval()


def make_clip(motion: str, seed: int, frames: int, size: int, factor: int, static: bool):
    scene, path = sample_scene(motion, np.random.default_rng(seed), static=static)
    n = (frames - 1) * factor + 1
    c2w = path.c2w(n)
    K = path.K(size, size)
    rgb, depth, mask = render(scene, c2w, K.expand(n, 3, 3), size, size)
    video = torch.as_tensor(rgb).permute(0, 3, 1, 2).float() / 255
    return scene, video, torch.as_tensor(depth).float(), mask, c2w.float(), K.float()


def run_clip(motion, seed, args, static: bool) -> tuple[dict, dict]:
    """``({method: (flicker, psnr_new, psnr_moving, seconds)}, {method: video})`` for one clip."""
    scene, gt, depth, mask, c2w, K = make_clip(motion, seed, args.frames, args.size, args.factor, static)
    idx = list(range(0, gt.shape[0], args.factor))
    new = [i for i in range(gt.shape[0]) if i % args.factor]
    videos, secs = {"ground truth": gt}, {"ground truth": 0.0}
    t0 = time.perf_counter()
    videos["linear blend"] = linear_blend(gt[idx], args.factor)
    secs["linear blend"] = time.perf_counter() - t0
    sources = {"static warp": None}
    if args.scene_steps > 0:
        t0 = time.perf_counter()
        sources["4D scene"] = optimised_scene(gt[idx], depth[idx], c2w[idx], K, args.scene_steps, args.flow_steps)
        secs["4D scene"] = time.perf_counter() - t0  # counted in its time below
    sources["true motion"] = TrajectoryScene(scene, depth[idx], c2w[idx], K)
    for name, source in sources.items():
        t0 = time.perf_counter()
        sr = temporal_super_resolution(gt[idx], depth[idx], c2w[idx], K, args.factor, scene=source)
        videos[name] = sr.frames
        secs[name] = secs.get(name, 0.0) + time.perf_counter() - t0
    moving = mask[new]
    rows = {
        name: (
            temporal_flicker(video),
            psnr(video[new], gt[new]) if name != "ground truth" else float("nan"),
            psnr(video[new], gt[new], moving) if name != "ground truth" else float("nan"),
            secs[name],
        )
        for name, video in videos.items()
    }
    return rows, {"gt": gt, "new": new, "mask": mask, **videos}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=7, help="clips per scene kind (one motion each)")
    p.add_argument("--frames", type=int, default=8, help="input frames per clip")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--factor", type=int, default=2)
    p.add_argument("--scenes", choices=("both", "static", "dynamic"), default="both")
    p.add_argument(
        "--scene-steps", type=int, default=60, help="joint steps of the optimised 4D scene (0: skip it)"
    )
    p.add_argument("--flow-steps", type=int, default=200,
                   help="motion phase of the optimised scene: its deformation fitted to optical flow first")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--plot", default=None, help="write a picture of the in-between frames here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    motions = [m for m in MOTIONS if m != "stationary"]
    kinds = ("static", "dynamic") if args.scenes == "both" else (args.scenes,)
    results: dict[str, dict[str, list]] = {}
    shown = None
    for kind in kinds:
        table = results.setdefault(kind, {})
        for c in range(args.clips):
            motion = motions[c % len(motions)]
            rows, videos = run_clip(motion, c, args, kind == "static")
            for name, vals in rows.items():
                table.setdefault(name, []).append(vals)
            print(
                f"{kind} clip {c} ({motion}): "
                + "  ".join(
                    f"{n} {v[0]:.5f}/{v[1]:.2f}/{v[2]:.2f}" for n, v in rows.items() if n != "ground truth"
                )
                + f"  (flicker / PSNR new / PSNR moving; gt flicker {rows['ground truth'][0]:.5f})",
                flush=True,
            )
            gain = rows["true motion"][2] - rows["static warp"][2]
            if kind == "dynamic" and (shown is None or gain > shown[0]):
                shown = (gain, motion, videos, rows)
    size = f"{args.size}x{args.size}"
    print(
        f"\n{args.clips} clips per kind, {args.frames} -> {(args.frames - 1) * args.factor + 1} frames "
        f"at {size}, 4D scene optimised {args.scene_steps} steps, {args.threads} thread(s), shared CPU"
    )
    head = ("scenes", "method", "flicker", "PSNR new", "PSNR moving", "s/clip")
    print("{:<8s} {:<13s} {:>9s} {:>9s} {:>12s} {:>7s}".format(*head))
    for kind, table in results.items():
        for name, vals in table.items():
            v = np.array(vals, dtype=float)
            ps = "-" if name == "ground truth" else f"{np.nanmean(v[:, 1]):.2f}"
            pm = "-" if name == "ground truth" or kind == "static" else f"{np.nanmean(v[:, 2]):.2f}"
            flicker, secs = np.nanmean(v[:, 0]), v[:, 3].mean()
            print(f"{kind:<8s} {name:<13s} {flicker:9.5f} {ps:>9s} {pm:>12s} {secs:7.3f}")
        if "static warp" in table and "linear blend" in table and kind == "dynamic":
            worse = {
                n: sum(a[1] < b[1] for a, b in zip(table[n], table["linear blend"]))
                for n in METHODS[1:]
                if n in table
            }
            print("dynamic clips worse than linear blending (PSNR new): "
                  + ", ".join(f"{n} {k}/{len(table[n])}" for n, k in worse.items()))
    if args.plot and shown is not None:
        plot(shown[2], shown[1], args.plot, results.get("dynamic", {}))


def plot(videos: dict, motion: str, path: str, table: dict) -> None:
    """Rows: methods; columns: three in-between frames of the clip where true motion helps most;
    right: mean PSNR of moving-object pixels per method over the dynamic clips."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["ground truth"] + [m for m in METHODS if m in videos]
    picks = videos["new"][: min(3, len(videos["new"]))]
    gt, mask = videos["gt"], videos["mask"]
    fig = plt.figure(figsize=(2.2 * len(picks) + 4.2, 2.0 * len(names) + 0.4))
    grid = fig.add_gridspec(len(names), len(picks) + 2, width_ratios=[1] * len(picks) + [0.15, 1.9])
    for row, name in enumerate(names):
        for col, i in enumerate(picks):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(videos[name][i].clamp(0, 1).permute(1, 2, 0).numpy())
            if row == 0:
                ax.contour(mask[i].numpy(), levels=[0.5], colors="w", linewidths=0.6)
                ax.set_title(f"frame {i} (new)", fontsize=8)
            else:
                ax.set_title(f"{psnr(videos[name][i], gt[i]):.1f} dB | moving "
                             f"{psnr(videos[name][i], gt[i], mask[i]):.1f}", fontsize=7)
            if col == 0:
                ax.set_ylabel(name, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    ax = fig.add_subplot(grid[:, -1])
    shown = [m for m in METHODS if m in table]
    vals = [np.nanmean(np.array(table[m], dtype=float)[:, 2]) for m in shown]
    ax.barh(range(len(shown)), vals, color=["#999999", "#e08030", "#3070c0", "#30a050"][: len(shown)])
    ax.set_yticks(range(len(shown)), shown, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(min(vals) - 2, max(vals) + 1)
    for k, v in enumerate(vals):
        ax.text(v, k, f" {v:.2f}", va="center", fontsize=8)
    ax.set_xlabel("PSNR of moving-object pixels,\nnew frames (dB, mean over dynamic clips)", fontsize=8)
    fig.suptitle(f"in-between frames of a clip with moving objects ({motion}); white: moving objects",
                 fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
