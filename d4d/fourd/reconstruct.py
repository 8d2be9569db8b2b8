"""Video + camera path -> persistent 4D scene: ``reconstruct(...)`` and ``python -m d4d.fourd.reconstruct``.

Pipeline (paper "4D from Motion via Camera-Pose-Aware Reconstruction"):

1. temporal-structure initialisation (:func:`d4d.fourd.init.initialise`): Depth Anything V2 depth,
   DIS flow, per-frame scale alignment, back-projection with the requested poses;
2. the reconstruction network (optional, a 4dgen checkpoint): per-pixel world points and
   confidences; its scale is matched to the initialisation's (one median ratio), so the scene stays
   in the units of the camera path;
3. the canonical point set + deformation field (:class:`d4d.fourd.scene.PointScene4D`), optimised per
   scene with pose correction (:func:`d4d.fourd.optimise.optimise_scene`).

CLI: ``python -m d4d.fourd.reconstruct INPUT --out DIR [--network CKPT] [--depth-model ID]``; INPUT is a
shard (``.tar``, a directory of shards, or a brace pattern; ``--index`` picks the clip) or a
RealEstate10K video with ``--cameras FILE.txt``. Writes ``scene.pt``, the section-7 per-frame export
and ``points.png``.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Callable

import torch

from d4d.fourd.init import DepthEstimator, InitResult, initialise
from d4d.fourd.optimise import OptimConfig, optimise_scene
from d4d.fourd.scene import PointScene4D
from d4d.utils.cli_args import OneLineParser, int_at_least, nonneg_int, positive_int, size_hw
from d4d.utils.errors import UserError, exit_with_error
from d4d.utils.logging import get_logger
from d4d.utils.paths import check_output_dir
from d4d.video.interface import CameraPath

Tensor = torch.Tensor
ProgressFn = Callable[[int, int, str], None]
log = get_logger(__name__)
PROG = "d4d.fourd.reconstruct"


@dataclasses.dataclass
class Reconstruction:
    """What :func:`reconstruct` returns: the scene, the initialisation and the network's point maps
    (``points (F, H, W, 3)``, ``confidence (F, H, W)``; the initialisation's when no network)."""

    scene: PointScene4D
    init: InitResult
    points: Tensor
    confidence: Tensor
    history: dict


@torch.no_grad()
def network_point_maps(network, frames: Tensor, c2w: Tensor, K: Tensor, patch_size: int | None = None,
                       with_local: bool = False) -> tuple[Tensor, ...]:
    """Run the reconstruction network on one clip; frames are resized to multiples of the patch size
    (and K with them) and the outputs resized back. Returns world points ``(F, H, W, 3)`` and
    confidence ``(F, H, W)`` (and, with ``with_local``, the points in each frame's own camera)."""
    import torch.nn.functional as F

    p = patch_size or network.patch_size
    f, _, h, w = frames.shape
    nh, nw = max(p, round(h / p) * p), max(p, round(w / p) * p)
    Kn = K.clone().float()
    Kn[0] *= nw / w
    Kn[1] *= nh / h
    x = F.interpolate(frames.float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    dev = next(network.parameters()).device
    out = network(x[None].to(dev), c2w[None].float().to(dev), Kn[None].to(dev))
    pts = out["world"][0].permute(0, 3, 1, 2)
    pts = F.interpolate(pts, size=(h, w), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    conf = F.interpolate(out["conf"][0][:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    if not with_local:
        return pts.cpu(), conf.cpu()
    loc = out["local"][0].permute(0, 3, 1, 2)
    loc = F.interpolate(loc, size=(h, w), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    return pts.cpu(), conf.cpu(), loc.cpu()


def path_scale(world: Tensor, local: Tensor, conf: Tensor, c2w: Tensor, min_baseline: float = 1e-3) -> tuple[float, str]:
    """Scale that takes the network's points into the units of the camera path.

    Each frame's camera centre in the network's units is where its own-camera points land in the
    world with the path's rotation: ``c_i = sum_p w_p (X_world - R_i X_local) / sum_p w_p`` (weights:
    confidence). The scale is the least-squares ``s`` of ``s c_i ~= t_i`` over frames (``t_i``: the
    path's centres relative to frame 0). Returns ``(s, "path")``, or ``(1.0, "unobservable")`` when the
    path barely translates (rotation only) or the fit is degenerate."""
    rel = c2w.double()
    t = rel[:, :3, 3] - rel[:1, :3, 3]
    if float(t.norm(dim=-1).max()) < min_baseline:
        return 1.0, "unobservable"
    wgt = conf.double().clamp_min(0)[..., None]
    rotated = torch.einsum("fij,fhwj->fhwi", rel[:, :3, :3], local.double())
    centres = ((world.double() - rotated) * wgt).sum((1, 2)) / wgt.sum((1, 2)).clamp_min(1e-12)
    centres = centres - centres[:1]
    num, den = float((centres * t).sum()), float((centres * centres).sum())
    if den <= 1e-12 or num <= 0:
        return 1.0, "unobservable"
    return num / den, "path"


def reconstruct(frames: Tensor, camera: CameraPath, network=None, depth_model: DepthEstimator | None = None,
                optimise: bool | OptimConfig = True, max_points: int = 20000, flow: str = "dis",
                progress: ProgressFn | None = None) -> Reconstruction:
    """Turn ``frames (F, 3, H, W)`` in [0, 1] and their camera path into a :class:`PointScene4D`.

    Args:
        camera: :class:`~d4d.video.interface.CameraPath` (c2w OpenCV, K at (H, W)).
        network: a :class:`~d4d.fourd.network.ReconstructionNet` (e.g. from
            :func:`d4d.modules.fourdgen.load_network`) or None (initialisation point maps only).
        depth_model: the initialisation's depth network (default: a :class:`DepthEstimator` must be given
            when no network is; with a network and no depth model the network's depth is used alone).
        optimise: False (no per-scene optimisation), True (default :class:`OptimConfig`) or a config.
    """
    f, _, h, w = frames.shape
    if camera.c2w.shape[0] != f:
        raise UserError(f"the camera path has {camera.c2w.shape[0]} poses for {f} frames")
    if (camera.height, camera.width) != (h, w):
        raise UserError(f"the camera path is for {camera.height}x{camera.width}, the frames are {h}x{w}")
    if depth_model is None and network is None:
        raise UserError("reconstruct needs a depth model, a network, or both")
    K = camera.K.float()
    if depth_model is not None:
        init = initialise(frames, camera.c2w, K, depth_model, flow)
    else:
        from d4d.geometry.cameras import relative_poses

        rel = relative_poses(camera.c2w.double(), 0).float()
        init = InitResult(depth=torch.zeros(f, h, w), flow=torch.zeros(max(0, f - 1), 2, h, w),
                          points=torch.zeros(f, h, w, 3), c2w=rel, K=K.expand(f, 3, 3), info={})
    if progress:
        progress(0, 1, "initialised")
    if network is not None:
        points, conf, local = network_point_maps(network, frames, init.c2w, K, with_local=True)
        if depth_model is None:  # no initialisation depth: take the units from the path's translations
            s, source = path_scale(points, local, conf, init.c2w)
            points = points * s
            init.info.update({"network_scale": s, "network_scale_source": source})
            if source != "path":
                log.info("network point scale: the camera path does not translate, kept the network's units")
        else:  # express the network's points in the units of the camera path
            from d4d.geometry.points import transform_points
            from d4d.geometry.cameras import invert_se3

            z_net = transform_points(invert_se3(init.c2w), points)[..., 2]
            ok = (z_net > 0) & (init.depth > 0)
            if ok.any():
                s = (init.depth[ok] / z_net[ok]).median()
                points = transform_points(init.c2w,
                                          transform_points(invert_se3(init.c2w), points) * s)
    else:
        points, conf = init.points, torch.ones(f, h, w)
    scene = PointScene4D.from_point_maps(points, frames, conf, init.c2w, K, max_points=max_points)
    history: dict = {}
    if optimise:
        cfg = optimise if isinstance(optimise, OptimConfig) else OptimConfig()
        history = optimise_scene(scene, frames, cfg, progress)
    return Reconstruction(scene=scene, init=init, points=points, confidence=conf, history=history)


# ------------------------------------------------------------------------------------- CLI
def _load_input(args) -> tuple[Tensor, CameraPath, str]:
    src = Path(args.input)
    if src.suffix == ".mp4":
        if not args.cameras:
            raise UserError(f"{src}: a video needs --cameras (a RealEstate10K camera file)")
        from d4d.data.video import decode_mp4
        from d4d.geometry.cameras import read_realestate_cameras

        cams = read_realestate_cameras(args.cameras)
        video = decode_mp4(src.read_bytes())
        n = min(len(video), len(cams))
        idx = list(range(0, n, args.stride))[: args.frames]
        frames = torch.from_numpy(video[idx]).permute(0, 3, 1, 2).float() / 255
        c2w = cams.c2w[idx].float()
        K = cams.K(frames.shape[-2], frames.shape[-1])[idx[0]].float()
        name = src.stem
    else:
        from d4d.data.shards import build_clip_pipeline

        try:
            clips = build_clip_pipeline(str(src))
            clip = next(c for i, c in enumerate(clips) if i == args.index)
        except StopIteration:
            raise UserError(f"{src}: fewer than {args.index + 1} clips") from None
        except ValueError as exc:
            raise UserError(f"{src}: {exc}") from None
        if clip.c2w is None:
            raise UserError(f"{src}: clip {clip.key!r} has no camera")
        idx = list(range(0, clip.num_frames, args.stride))[: args.frames]
        frames, c2w, K, name = clip.frames_float()[idx], clip.c2w[idx], clip.K[idx[0]], clip.key
    if args.size:
        from d4d.geometry.cameras import resize_and_center_crop

        hw = tuple(args.size) if not isinstance(args.size, str) else tuple(int(v) for v in args.size.lower().split("x"))
        plan = resize_and_center_crop(K, tuple(frames.shape[-2:]), hw)
        frames, K = plan.apply(frames).clamp(0, 1), plan.K
    camera = CameraPath(c2w=c2w, K=K, height=frames.shape[-2], width=frames.shape[-1], label=name)
    return frames, camera, name


def main(argv: list[str] | None = None) -> None:
    p = OneLineParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0], error_prog=PROG)
    p.add_argument("input", help="shard / shard directory / brace pattern, or an .mp4 with --cameras")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--cameras", type=Path, help="RealEstate10K camera file for an .mp4 input")
    p.add_argument("--index", type=nonneg_int, default=0, help="clip index in the shards")
    p.add_argument("--frames", type=int_at_least(2), default=16, help="frames to use (after --stride)")
    p.add_argument("--stride", type=positive_int, default=1, help="take every n-th frame")
    p.add_argument("--size", type=size_hw(2), default=None, help="resize + centre crop to HxW, e.g. 96x128")
    p.add_argument("--network", type=Path, help="a 4dgen checkpoint (d4d.fit) for the point maps")
    p.add_argument("--depth-model", default=None, help="Depth Anything V2 directory or hub id")
    p.add_argument("--random-depth-model", action="store_true", help="a tiny random depth model (tests only)")
    p.add_argument("--depth-size", type=positive_int, default=518, help="short side fed to the depth model (x14)")
    p.add_argument("--steps", type=nonneg_int, default=None,
                   help="joint optimisation steps (0: none; default: the checkpoint's scene_optimisation, else 300)")
    p.add_argument("--pose-steps", type=nonneg_int, default=None,
                   help="pose-correction steps (default: the checkpoint's scene_optimisation, else 60)")
    p.add_argument("--max-points", type=positive_int, default=20000, help="canonical points of the scene")
    args = p.parse_args(argv)
    try:
        check_output_dir(args.out, "--out")
        from tqdm import tqdm

        frames, camera, name = _load_input(args)
        from d4d.modules.fourdgen import load_network, scene_optimisation_config

        network, meta = None, {}
        if args.network:
            network, meta = load_network(args.network)
        cfg = scene_optimisation_config(meta, steps=args.steps, pose_steps=args.pose_steps)
        depth_model = None
        if args.depth_model or args.random_depth_model:
            depth_model = DepthEstimator(args.depth_model, None if args.depth_model else {}, args.depth_size)
        bar = tqdm(total=cfg.steps + cfg.pose_steps, desc=name, file=sys.stderr)

        def progress(done: int, total: int, what: str) -> None:
            bar.set_postfix_str(what)
            bar.n = done
            bar.refresh()

        optimise = cfg if cfg.steps or cfg.pose_steps else False
        rec = reconstruct(frames, camera, network, depth_model, optimise, args.max_points, progress=progress)
        bar.close()
        args.out.mkdir(parents=True, exist_ok=True)
        rec.scene.save(args.out / "scene.pt")
        rec.scene.export_frames(args.out)
        from d4d.fourd.viz import point_cloud_figure, save_figure

        xyz, col, _ = rec.scene.points_at(0.0)
        save_figure(point_cloud_figure(xyz, col, camera.K, camera.height, camera.width, frames,
                                       rec.scene.cameras_c2w[0], title=name), args.out / "points.png")
        print(f"{name}: {rec.scene.xyz.shape[0]} points, {rec.scene.num_frames} frames -> {args.out}")
    except UserError as exc:
        exit_with_error(str(exc), PROG)


if __name__ == "__main__":
    main()
