"""``python -m d4d.evaluate --shards DIR --out DIR [--dynamic CKPT] [--static CKPT] [--fourd CKPT]``

Evaluates video generators on test shards as Table 1 / Table 2 of the paper do: per clip the first
frame (and caption) goes in, the clip's own camera path (relative to frame 0, ``K`` from the shard)
is requested, and the generated frames 1..F-1 are compared with the real ones under covisibility
masks (mPSNR, mSSIM in its DyCheck and strict variants, mLPIPS), plus temporal flicker and, with
``--camera-trials N``, camera accuracy from COLMAP (RotErr, TransErr, CamMC). Each given generator
is a protocol; with ``--fourd`` each also gets a "+4d" protocol (its video lifted to a 4D scene and
rendered back from the requested cameras; ``--fourd-steps`` / ``--fourd-pose-steps`` set the per-scene
optimisation, default the checkpoint's ``scene_optimisation``). Writes ``per_clip.csv``, ``per_clip.json``,
``aggregate.json`` (read by ``python -m d4d.report``) and sample videos to ``--out``, and logs to
wandb (offline unless logged in; ``--wandb disabled`` to skip). See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from d4d.utils.cli_args import OneLineParser, int_at_least, nonneg_int, positive_int, torch_device
from d4d.utils.errors import UserError, exit_with_error
from d4d.utils.paths import check_output_dir

PROG = "d4d.evaluate"
# protocols that get a "+4d" row with --fourd: the two modules (Table 2) and the oracle (the ceiling of
# lifting and re-rendering); lifting a still "repeat-first" video measures nothing
FOURD_INPUTS = ("dynamic", "static", "real-frames")


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m d4d.evaluate", description=__doc__.splitlines()[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter, error_prog=PROG)
    p.add_argument("--shards", required=True,
                   help="test shards: directory, brace pattern, glob or URL "
                        "(https://host/shard-{000000..000009}.tar, pipe:CMD, file://)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--name", default=None,
                   help="run name in reports and wandb (default: the --out folder name)")
    g = p.add_argument_group("generators (at least one)")
    g.add_argument("--dynamic", help="dynamic-module checkpoint (d4d_stage: dynamic)")
    g.add_argument("--static", help="static-module checkpoint (d4d_stage: static)")
    g.add_argument("--weights", choices=("ema", "raw"), default=None,
                   help="video-module weights: ema (the default when a checkpoint has them) or raw")
    g.add_argument("--baseline", action="append", default=[], choices=["repeat-first", "real-frames"],
                   help="reference rows: repeat-first = the input frame repeated (the floor); real-frames = "
                        "the real clip (oracle: SfM noise floor of the camera metrics)")
    g.add_argument("--fourd", help="4D-generator checkpoint: adds 'dynamic+4d', 'static+4d' and "
                                   "'real-frames+4d' rows for those protocols")
    g.add_argument("--depth-model", default=None,
                   help="with --fourd: Depth Anything V2 directory or hub id for the 4D initialisation")
    g.add_argument("--fourd-steps", type=nonneg_int, default=None,
                   help="with --fourd: joint per-scene optimisation steps (default: the checkpoint's "
                        "scene_optimisation, else OptimConfig's)")
    g.add_argument("--fourd-pose-steps", type=nonneg_int, default=None,
                   help="with --fourd: pose-correction steps (default: as --fourd-steps)")
    g.add_argument("--fourd-max-points", type=positive_int, default=20000,
                   help="with --fourd: canonical points per scene")
    p.add_argument("--max-clips", type=positive_int, default=None, help="evaluate at most this many clips")
    p.add_argument("--frames", type=int_at_least(2), default=None,
                   help="use the first N frames of each clip (default all)")
    p.add_argument("--size", default=None, help="resize + centre-crop clips to HxW (default: as stored)")
    p.add_argument("--covisibility", default="first", choices=["first", "all", "depth", "none"],
                   help="mask: visible in the input frame by flow consistency (default), DyCheck's rule "
                        "over all other frames, exact reprojection with the shard's depth (synthetic "
                        "shards), or none")
    p.add_argument("--lpips", default="auto", choices=["auto", "lpips", "d4d", "off"],
                   help="mLPIPS backend (auto: the lpips package if installed, else our AlexNet)")
    p.add_argument("--alexnet-weights", default=None,
                   help="torchvision alexnet-owt-7be5be79.pth (default: the torch hub cache)")
    p.add_argument("--camera-trials", type=nonneg_int, default=0,
                   help="COLMAP pose recoveries per video (CamI2V: 5; 0 = skip); needs pycolmap "
                        "(pip install 'd4d[eval]')")
    p.add_argument("--colmap-device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where COLMAP extracts and matches features with --camera-trials (auto: cuda when "
                        "the installed pycolmap has CUDA support, e.g. pycolmap-cuda12, else cpu)")
    p.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: each stage's own)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--device", type=torch_device, default="auto",
                   help="auto (cuda when available, else cpu), cpu, cuda, cuda:1 ...")
    p.add_argument("--samples", type=nonneg_int, default=4,
                   help="write/log side-by-side videos of the first N clips")
    p.add_argument("--wandb", default="auto", choices=["auto", "online", "offline", "disabled"],
                   help="auto: online when logged in, else offline")
    p.add_argument("--project", default="d4d", help="wandb project")
    return p


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        if h < 11 or w < 11:
            raise ValueError
        return h, w
    except ValueError:
        raise UserError(f"--size {text!r}: expected HxW with both at least 11 (SSIM's window), "
                        "e.g. 256x256") from None


def _wandb_mode(mode: str) -> str:
    import os

    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE") in ("offline", "online", "disabled"):
        return os.environ["WANDB_MODE"]
    from d4d.fit import wandb_logged_in

    return "online" if wandb_logged_in() else "offline"


def build_generators(args) -> dict:
    """``{protocol name: generator}`` in the order of the flags; UserError when there is none."""
    from d4d.evaluation.generators import RealFrames, RepeatFirstFrame, load_stage_generator

    gens: dict = {}
    if args.dynamic:
        gens["dynamic"] = load_stage_generator("--dynamic", args.dynamic, "dynamic", args.device,
                                               getattr(args, "weights", None))
    if args.static:
        gens["static"] = load_stage_generator("--static", args.static, "static", args.device,
                                              getattr(args, "weights", None))
    for name in args.baseline:
        gens[name] = RepeatFirstFrame() if name == "repeat-first" else RealFrames()
    if not gens:
        raise UserError("nothing to evaluate: give --dynamic, --static and/or --baseline repeat-first")
    return gens


def run(args) -> dict:
    """The evaluation loop; returns the aggregate document (also written to ``args.out``)."""
    import torch
    from tqdm import tqdm

    from d4d.data.shards import expand_urls
    from d4d.evaluation.clips import covisibility, iter_test_clips
    from d4d.evaluation.fourd import FourDStage
    from d4d.evaluation.outputs import WandbLog, write_results, write_sample_video
    from d4d.evaluation.scoring import score_clip
    from d4d.metrics.flow import FlowEstimator
    from d4d.metrics.lpips import build_lpips
    from d4d.utils.logging import get_logger
    from d4d.utils.names import safe_filename

    log = get_logger("d4d.evaluate")
    if args.max_clips is not None and args.max_clips < 1:
        raise UserError(f"--max-clips {args.max_clips}: must be >= 1")
    if args.camera_trials < 0:
        raise UserError(f"--camera-trials {args.camera_trials}: must be >= 0")
    size = _size(args.size)
    colmap_device = None
    # pycolmap is imported here: a missing one fails before any model is loaded, and it is loaded before
    # decord (the shard reader), whose bundled libraries, loaded first, changed COLMAP's results
    if args.camera_trials > 0:
        from d4d.metrics.sfm import colmap_device as resolve_colmap_device

        colmap_device = resolve_colmap_device(args.colmap_device, "--camera-trials")
        log.info("COLMAP on %s (--colmap-device %s)", colmap_device, args.colmap_device)
    expand_urls(args.shards)  # a wrong path fails here, before any model is loaded
    gens = build_generators(args)
    if not args.fourd and (args.fourd_steps is not None or args.fourd_pose_steps is not None):
        raise UserError("--fourd-steps / --fourd-pose-steps need --fourd CKPT")
    if args.fourd_max_points < 1:
        raise UserError(f"--fourd-max-points {args.fourd_max_points}: must be >= 1")
    fourd = None
    if args.fourd:
        fourd = FourDStage(args.fourd, args.device, args.depth_model, args.fourd_steps, args.fourd_pose_steps,
                           args.fourd_max_points)
        log.info("4D generator: per-scene optimisation %d pose + %d joint steps (%s)", fourd.optim.pose_steps,
                 fourd.optim.steps, ", ".join(f"{k} from {v}" for k, v in fourd.optim_source.items())
                 or "OptimConfig defaults")
    try:
        lpips_model = None if args.lpips == "off" else build_lpips(args.lpips, args.alexnet_weights)
    except UserError as exc:
        raise UserError(f"{exc} (or pass --lpips off to skip mLPIPS)") from None
    name = args.name or args.out.name
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if fourd is not None:
        config["fourd_settings"] = fourd.describe()
    logger = WandbLog(_wandb_mode(args.wandb), args.out, name, config, args.project)
    flow = FlowEstimator()
    rows: list[dict] = []
    start = time.perf_counter()
    bar = tqdm(iter_test_clips(args.shards, args.max_clips, args.frames, size), desc="evaluate", unit="clip",
               total=args.max_clips)
    for index, clip in enumerate(bar):
        clip.masks = covisibility(clip.frames, args.covisibility, flow, clip)
        for gname, gen in gens.items():
            bar.set_postfix_str(f"{clip.clip_id} {gname}")
            if hasattr(gen, "set_clip"):
                gen.set_clip(clip.frames)
            t0 = time.perf_counter()
            result = gen.generate(clip.request(args.seed, args.steps))
            outputs = {gname: (result.frames.float().cpu(), None, time.perf_counter() - t0)}
            if fourd is not None and gname in FOURD_INPUTS:
                def progress(done: int, total: int, what: str, _g=gname) -> None:
                    bar.set_postfix_str(f"{clip.clip_id} {_g}+4d {what} {done}/{total}",
                                        refresh=done % 10 == 0 or done == total)

                t0 = time.perf_counter()
                scene = fourd.lift(result, progress)
                outputs[f"{gname}+4d"] = (fourd.render(scene, clip.camera), scene, time.perf_counter() - t0)
            for protocol, (frames, scene, seconds) in outputs.items():
                if frames.shape != clip.frames.shape:
                    raise UserError(f"{protocol}: generated {tuple(frames.shape)} for clip {clip.clip_id} "
                                    f"of {tuple(clip.frames.shape)}; pass --frames/--size the generator "
                                    "supports")
                metrics = score_clip(clip.frames, frames, clip.masks, clip.camera.c2w, clip.camera.K,
                                     lpips_model=lpips_model, flow=flow, camera_trials=args.camera_trials,
                                     colmap_device=colmap_device or "auto",
                                     fourd_c2w=None if scene is None else scene.cameras_c2w.detach(),
                                     seed=args.seed)
                rows.append({"protocol": protocol, "clip_id": clip.clip_id, "motion": clip.meta.get("motion"),
                             **metrics, "seconds": seconds})
                if index < args.samples:
                    # the clip id comes from the shard: only a sanitised form names the file
                    stem = safe_filename(clip.clip_id, "clip")
                    video = args.out / "samples" / safe_filename(protocol.replace("+", "_")) / f"{stem}.mp4"
                    path = write_sample_video(video, clip.frames, frames)
                    logger.video(protocol, stem, path)
                    if scene is not None:
                        with torch.no_grad():
                            xyz, rgb, _conf = scene.points_at(0.0)
                        logger.points(protocol, stem, xyz, rgb)
        write_results(args.out, rows, name, config, complete=False)
    if not rows:
        raise UserError(f"--shards {args.shards}: no clip was read")
    doc = write_results(args.out, rows, name, config)
    logger.finish(rows, doc)
    clips = len({r["clip_id"] for r in rows})
    log.info("evaluated %d clips x %d protocols in %.1fs -> %s", clips, len(doc["protocols"]),
             time.perf_counter() - start, args.out / "aggregate.json")
    for protocol, metrics in doc["protocols"].items():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "clips" and isinstance(v, float))
        print(f"{protocol}: {shown}")
    return doc


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        check_output_dir(args.out, "--out")
        run(args)
    except UserError as exc:
        exit_with_error(str(exc), PROG)


if __name__ == "__main__":
    main()
