"""The seven real RealEstate10K clips through the 4D generator: initialisation (Depth Anything V2 +
DIS flow + scale alignment), a trained reconstruction network, per-scene optimisation with pose
correction. Prints per-clip timings, PSNR of the re-rendered input frames before/after optimisation,
and writes one point-cloud picture.

    python -m benchmarks.fourd_re10k --network runs/debug/4dgen_224_linear/checkpoints/last.ckpt \
        [--depth-model DIR_OR_ID] [--figure docs/fourd_re10k.png]

Without ``--depth-model`` the initialisation uses a randomly initialised Depth Anything (no weights
can be downloaded here): the run then checks the pipeline on real images and cameras, not depth quality.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from d4d.data.video import decode_mp4
from d4d.fourd.init import DepthEstimator
from d4d.fourd.optimise import OptimConfig, psnr
from d4d.fourd.reconstruct import reconstruct
from d4d.fourd.viz import point_cloud_figure, save_figure
from d4d.geometry.cameras import read_realestate_cameras, resize_and_center_crop
from d4d.modules.fourdgen import load_network
from d4d.video.interface import CameraPath

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "realestate10k"


def load_clip(root: Path, clip: str, frames: int, stride: int, hw: tuple[int, int]):
    cams = read_realestate_cameras(root / "pose_files" / f"{clip}.txt")
    video = decode_mp4((root / "videos" / f"{clip}.mp4").read_bytes())
    idx = list(range(0, min(len(video), len(cams)), stride))[:frames]
    rgb = torch.from_numpy(np.ascontiguousarray(video[idx])).permute(0, 3, 1, 2).float() / 255
    K = cams.K(rgb.shape[-2], rgb.shape[-1])[idx[0]].float()
    plan = resize_and_center_crop(K, tuple(rgb.shape[-2:]), hw)
    return plan.apply(rgb).clamp(0, 1), CameraPath(c2w=cams.c2w[idx].float(), K=plan.K, height=hw[0], width=hw[1], label=clip)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--network", type=Path, required=True, help="a 4dgen checkpoint")
    p.add_argument("--depth-model", default=None)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--size", default="48x64")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--pose-steps", type=int, default=15)
    p.add_argument("--figure", type=lambda v: Path(v) if v else None, default=REPO / "docs" / "fourd_re10k.png",
                   help='the point-cloud picture of the first clip ("" for none)')
    args = p.parse_args()
    torch.manual_seed(0)
    hw = tuple(int(v) for v in args.size.split("x"))
    net, _ = load_network(args.network)
    depth_model = DepthEstimator(args.depth_model, None if args.depth_model else {}, input_size=56)
    clips = sorted(f.stem for f in (args.data / "videos").glob("*.mp4"))
    print(f"{len(clips)} clips, {args.frames} frames (stride {args.stride}) at {hw[0]}x{hw[1]}")
    print(f"{'clip':18s} {'points':>7s} {'PSNR before':>11s} {'PSNR after':>10s} {'pose corr (deg)':>15s} {'depth scale':>11s} {'s':>6s}")
    for n, clip in enumerate(clips):
        t0 = time.time()
        frames, camera = load_clip(args.data, clip, args.frames, args.stride, hw)
        rec = reconstruct(frames, camera, net, depth_model, optimise=False, max_points=8000)
        scene = rec.scene
        with torch.no_grad():
            before = np.mean([psnr(scene.render_frame(i)[0], frames[i]) for i in range(scene.num_frames)])
        from d4d.fourd.optimise import optimise_scene

        optimise_scene(scene, frames, OptimConfig(pose_steps=args.pose_steps, steps=args.steps, frames_per_step=2))
        with torch.no_grad():
            after = np.mean([psnr(scene.render_frame(i)[0], frames[i]) for i in range(scene.num_frames)])
            rot = scene.pose_delta[1:, :3].norm(dim=-1).max() * 180 / np.pi
        print(f"{clip:18s} {scene.xyz.shape[0]:7d} {before:11.2f} {after:10.2f} {float(rot):15.3f} {rec.init.info.get('scale_source', '-'):>11s} {time.time() - t0:6.1f}")
        if n == 0 and args.figure:
            with torch.no_grad():
                xyz, col, _ = scene.points_at(0.0)
                fig = point_cloud_figure(xyz, col, camera.K, hw[0], hw[1], frames, scene.cameras_c2w[0],
                                         title=f"RealEstate10K {clip}: init + debug network + 4D optimisation")
            print(f"picture: {save_figure(fig, args.figure)}")


if __name__ == "__main__":
    main()
