"""Does per-scene 4D optimisation help? Re-rendered PSNR at held-out times and cameras.

A synthetic scene (procedural ray-caster, dynamic, ``--motion``) is rendered at ``2n - 1`` times;
the even frames are the input video, the odd ones (new times *and* new cameras) are held out. The
input's point maps come from a trained 4dgen network (``--checkpoint``; its depth scale is matched
to the ground truth by one median, the same for both rows) or, without one, from the ground-truth
depth with 5% multiplicative noise. Rows: the un-optimised scene (union of the point maps, zero
deformation) and the optimised scene (pose correction + joint optimisation), both rendered with
the same splatting renderer at the held-out cameras/times. Also writes a picture with ``--figure``.

    python -m benchmarks.fourd_optimisation [--checkpoint CKPT] [--steps 150] [--figure docs/fourd_optimisation.png]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from d4d.data.procedural_layouts import sample_scene
from d4d.data.procedural_render import render
from d4d.fourd.optimise import OptimConfig, optimise_scene, psnr
from d4d.fourd.reconstruct import network_point_maps
from d4d.fourd.scene import PointScene4D
from d4d.geometry.cameras import invert_se3, relative_poses
from d4d.geometry.points import depth_to_points, transform_points


def held_out_psnr(scene: PointScene4D, frames: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor, outs: list[int]) -> tuple[float, list]:
    n = frames.shape[0]
    vals, imgs = [], []
    with torch.no_grad():
        for j in outs:
            rgb, _, _ = scene.render(c2w[j], K, frames.shape[-2], frames.shape[-1], j / (n - 1))
            vals.append(psnr(rgb, frames[j]))
            imgs.append(rgb)
    return float(np.mean(vals)), imgs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--motion", default="orbit")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--inputs", type=int, default=5, help="input frames n (2n - 1 rendered)")
    p.add_argument("--size", default="48x48")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--pose-steps", type=int, default=20)
    p.add_argument("--flow-steps", type=int, default=OptimConfig.flow_steps,
                   help="motion phase: the deformation fitted to optical flow first (OptimConfig.flow_steps)")
    p.add_argument("--figure", type=Path, default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    h, w = (int(v) for v in args.size.split("x"))
    scene_def, cam = sample_scene(args.motion, np.random.default_rng(args.seed))
    n = 2 * args.inputs - 1
    world_c2w = cam.c2w(n)
    K = cam.K(h, w)
    rgb, depth, _ = render(scene_def, world_c2w, K, h, w, torch.linspace(0, 1, n))
    frames = rgb.permute(0, 3, 1, 2).float() / 255
    c2w = relative_poses(world_c2w.double(), 0).float()
    ins, outs = list(range(0, n, 2)), list(range(1, n, 2))
    gt = depth[ins].clone()
    gt[gt == 0] = gt[gt > 0].max() * 2  # sky: far away
    if args.checkpoint:
        from d4d.modules.fourdgen import load_network

        net, _ = load_network(args.checkpoint)
        with torch.no_grad():
            pts, conf = network_point_maps(net, frames[ins], c2w[ins], K)
        z = transform_points(invert_se3(c2w[ins]), pts)[..., 2]
        s = (gt / z.clamp_min(1e-6))[z > 0].median()
        pts = transform_points(c2w[ins], transform_points(invert_se3(c2w[ins]), pts) * s)
        source = f"network {args.checkpoint}"
    else:
        noisy = gt * (1 + 0.05 * torch.randn_like(gt))
        pts, _ = depth_to_points(noisy, K.expand(len(ins), 3, 3), c2w[ins])
        conf = torch.ones(len(ins), h, w)
        source = "ground-truth depth + 5% noise"
    scene = PointScene4D.from_point_maps(pts, frames[ins], conf, c2w[ins], K, max_points=len(ins) * h * w)
    before, imgs_before = held_out_psnr(scene, frames, c2w, K, outs)
    t0 = time.time()
    optimise_scene(scene, frames[ins], OptimConfig(pose_steps=args.pose_steps, steps=args.steps, frames_per_step=2,
                                                 flow_steps=args.flow_steps))
    took = time.time() - t0
    after, imgs_after = held_out_psnr(scene, frames, c2w, K, outs)
    print(f"synthetic {args.motion} scene (seed {args.seed}), {len(ins)} input frames, {len(outs)} held-out "
          f"times/cameras, {h}x{w}; point maps: {source}")
    print(f"{'':28s} {'held-out PSNR (dB)':>18s}")
    print(f"{'un-optimised point maps':28s} {before:18.2f}")
    print(f"{'optimised 4D scene':28s} {after:18.2f}")
    print(f"gain {after - before:+.2f} dB; optimisation {args.pose_steps}+{args.steps} steps in {took:.0f} s")
    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from d4d.fourd.viz import save_figure

        k = len(outs) // 2
        fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
        for ax, img, name in zip(axes, (frames[outs[k]], imgs_before[k], imgs_after[k]),
                                 ("held-out frame", f"un-optimised {before:.1f} dB", f"optimised {after:.1f} dB")):
            ax.imshow(img.clamp(0, 1).permute(1, 2, 0).numpy())
            ax.set_title(name)
            ax.axis("off")
        fig.tight_layout()
        print(f"picture: {save_figure(fig, args.figure)}")


if __name__ == "__main__":
    main()
