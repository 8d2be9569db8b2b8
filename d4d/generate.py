"""``python -m d4d.generate IMAGE --out DIR [options]``: one image (+ prompt) -> camera-controlled
video -> persistent 4D scene -> a smoother, higher frame-rate video.

Stages (each logs its progress and time):

1. trajectory: ``--motion NAME`` (a label or alias, see :mod:`d4d.video.paths`), a camera file
   (RealEstate10K ``.txt`` / d4d ``.json``), or ``auto``: the motion classifier (``--selector CKPT``,
   :func:`d4d.select.motion_probabilities`) or a Qwen2.5-VL (``--vlm MODEL``,
   :class:`d4d.selectors.vlm.VLMSelector`) picks one of the eight motions; the probabilities are printed;
2. video: the dynamic and/or static module (``--module``) through the
   :class:`~d4d.video.interface.VideoGenerator` contract;
3. 4D: :func:`d4d.fourd.reconstruct.reconstruct` with the 4D generator network (``--fourd CKPT``),
   optionally a Depth Anything V2 (``--depth-model``) for the initialisation, and per-scene
   optimisation with pose correction (``--no-optimise`` skips it); its steps come from
   ``--pose-steps`` / ``--optimise-steps``, else the 4D checkpoint's ``scene_optimisation``, else the
   :class:`~d4d.fourd.optimise.OptimConfig` defaults (:mod:`d4d.generation.optimisation`; printed);
4. depth-guided temporal super-resolution (:mod:`d4d.temporal_sr`) by ``--fps-factor``, with the 4D
   scene's deformation field moving the points between frames (``--sr-motion static``: without).

Layout of a result folder (``DIR``, or ``DIR/dynamic`` and ``DIR/static`` with ``--module both``)::

    video.mp4 frames/ cameras.txt cameras.json info.json preview.png   the generated video (d4d.video.io)
    scene.pt cameras_corrected.txt cameras_corrected.json             the 4D scene (load_scene), its cameras
    depth/ confidence/ color/ camera/ points/                         per frame, reference.md section 7
    sr/video.mp4 sr/cameras.txt sr/cameras.json sr/depth/ ...         the temporally super-resolved video
    summary.png  run.json                                             picture; arguments, selection, timings

``python -m d4d.view DIR`` (or ``--view``) browses a result folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from d4d.utils.cli_args import (
    OneLineParser, finite_float, float_in, int_at_least, int_in, nonneg_float, nonneg_int, positive_float,
    positive_int, torch_device,
)
from d4d.utils.errors import UserError, exit_with_error
from d4d.utils.logging import get_logger
from d4d.utils.paths import check_output_dir

PROG = "d4d.generate"
MODULES = ("dynamic", "static")
DYNAMIC_GUIDANCE_RANGE = (0.0, 20.0)  # as DynamicVideoModule.generate checks it
log = get_logger(PROG)


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=f"python -m {PROG}",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        error_prog=PROG,
    )
    p.add_argument("image", help="input image (PNG/JPEG)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--prompt", default="", help="text prompt")
    p.add_argument(
        "--motion", default="auto", help="auto, a motion name/alias, or a camera file (.txt/.json)"
    )
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--selector", help="motion-classifier checkpoint for --motion auto")
    sel.add_argument("--vlm", help="Qwen2.5-VL directory or hub id for --motion auto")
    p.add_argument("--module", choices=("dynamic", "static", "both"), default="dynamic")
    p.add_argument("--dynamic", help="dynamic video-module checkpoint")
    p.add_argument("--static", help="static video-module checkpoint")
    p.add_argument("--weights", choices=("ema", "raw"), default=None,
                   help="video-module weights: ema (the default when a checkpoint has them) or raw")
    p.add_argument("--fourd", required=True, help="4D generator (4dgen) checkpoint")
    p.add_argument(
        "--depth-model", default=None, help="Depth Anything V2 directory or hub id for the 4D initialisation"
    )
    p.add_argument(
        "--frames",
        type=int_at_least(2),
        default=None,
        help="frames to generate (default: the training clip length; with --module both, the dynamic one's)",
    )
    p.add_argument("--height", type=positive_int, default=None, help="output height (default: the training size)")
    p.add_argument("--width", type=positive_int, default=None, help="output width (default: the training size)")
    p.add_argument("--steps", type=positive_int, default=None, help="sampling steps (stage default)")
    p.add_argument("--text-cfg", type=finite_float, default=None, help="dynamic: text guidance scale (default 5.5)")
    p.add_argument(
        "--camera-cfg", type=finite_float, default=None, help="dynamic: camera guidance scale (default 1.0)"
    )
    p.add_argument("--cfg", type=finite_float, default=None, help="static: guidance scale in [1, 7] (default 4)")
    p.add_argument("--trajectory-scale", type=finite_float, default=1.0, help="multiplies the path's translations")
    p.add_argument("--magnitude", type=nonneg_float, default=None, help="size of an analytic motion")
    p.add_argument(
        "--fov",
        type=float_in(0.0, 180.0, lo_open=True, hi_open=True),
        default=60.0,
        help="horizontal field of view for analytic motions (degrees, in (0, 180))",
    )
    p.add_argument("--stride", type=positive_int, default=2, help="rows of a camera file per generated frame")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--fps", type=positive_float, default=8.0, help="frame rate of the generated video")
    p.add_argument("--fps-factor", type=positive_int, default=2, help="temporal super-resolution factor (1: off)")
    p.add_argument(
        "--sr-scale", type=positive_float, default=1.0, help="also upscale the super-resolved video by this"
    )
    p.add_argument(
        "--sr-motion",
        choices=("scene", "static"),
        default="scene",
        help="temporal SR: move points with the 4D scene's deformation field (default), or assume a "
        "static scene",
    )
    p.add_argument("--no-optimise", action="store_true", help="skip the per-scene 4D optimisation")
    p.add_argument(
        "--optimise-steps",
        type=nonneg_int,
        default=None,
        help="joint 4D optimisation steps (default: the 4D checkpoint's scene_optimisation, else 300)",
    )
    p.add_argument(
        "--pose-steps",
        type=nonneg_int,
        default=None,
        help="pose-correction steps (default: the 4D checkpoint's scene_optimisation, else 60)",
    )
    p.add_argument("--max-points", type=positive_int, default=20000, help="points of the 4D scene")
    p.add_argument("--device", type=torch_device, default="auto",
                   help="auto (cuda when available, else cpu), cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for torch (default: torch's; 1 is much faster on an oversubscribed machine)",
    )
    p.add_argument("--view", action="store_true", help="open the 4D viewer on the result at the end")
    p.add_argument("--port", type=int_in(1, 65535), default=8080, help="--view: the viewer's port (default 8080)")
    return p


class Stage:
    """``with Stage("video"):`` logs the start and the seconds taken; ``.progress`` logs steps."""

    def __init__(self, name: str, timings: dict):
        self.name, self.timings, self._last = name, timings, 0.0

    def __enter__(self) -> "Stage":
        log.info("%s ...", self.name)
        self.start = time.perf_counter()
        return self

    def __exit__(self, exc_type, *_):
        secs = time.perf_counter() - self.start
        if exc_type is None:
            self.timings[self.name] = round(secs, 3)
            log.info("%s done in %.1f s", self.name, secs)

    def progress(self, done: int, total: int, what: str) -> None:
        now = time.perf_counter()
        if done >= total or now - self._last > 2.0:  # at most a line every 2 s, and the last step
            self._last = now
            log.info("%s: %s %d/%d (%.1f s)", self.name, what, done, total, now - self.start)


def _check_args(args) -> list[str]:
    """Cheap checks before anything loads; returns the modules to run."""
    modules = list(MODULES) if args.module == "both" else [args.module]
    for m in modules:
        ckpt = getattr(args, m)
        if not ckpt:
            raise UserError(f"--module {args.module} needs --{m} CKPT")
        if not Path(ckpt).is_file():
            raise UserError(f"--{m}: checkpoint not found: {ckpt}")
    for flag, path in (("--fourd", args.fourd), ("--selector", args.selector)):
        if path and not Path(path).is_file():
            raise UserError(f"{flag}: checkpoint not found: {path}")
    if args.motion == "auto" and not (args.selector or args.vlm):
        raise UserError(
            "--motion auto needs --selector CLASSIFIER_CKPT or --vlm MODEL (or give --motion NAME)"
        )
    lo, hi = DYNAMIC_GUIDANCE_RANGE
    for flag, value in (("--text-cfg", args.text_cfg), ("--camera-cfg", args.camera_cfg)):
        if value is not None and not lo <= value <= hi:
            raise UserError(f"{flag} {value:g}: guidance scale out of range [{lo:g}, {hi:g}]")
    if args.cfg is not None:
        from d4d.models.static.sampling import CFG_RANGE

        if not CFG_RANGE[0] <= args.cfg <= CFG_RANGE[1]:
            raise UserError(
                f"--cfg {args.cfg:g}: guidance scale out of range [{CFG_RANGE[0]:g}, {CFG_RANGE[1]:g}]"
            )
    for flag, value, least in (
        ("--fps-factor", args.fps_factor, 1),
        ("--frames", args.frames, 2),
        ("--steps", args.steps, 1),
        ("--stride", args.stride, 1),
        ("--threads", args.threads, 1),
        ("--optimise-steps", args.optimise_steps, 0),
        ("--pose-steps", args.pose_steps, 0),
    ):
        if value is not None and value < least:
            raise UserError(f"{flag} {value}: must be >= {least}")
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: not a TCP port (1-65535)")
    if args.sr_scale <= 0 or args.fps <= 0:
        raise UserError(f"--sr-scale {args.sr_scale:g} / --fps {args.fps:g}: must be > 0")
    if args.motion != "auto":  # an unknown name or missing file fails now, not after loading models
        from d4d.video.paths import resolve_camera_path

        if not Path(args.motion).suffix:
            resolve_camera_path(args.motion, 2, 8, 8)
        elif not Path(args.motion).is_file():
            raise UserError(f"--motion: camera file not found: {args.motion}")
    return modules


def select_motion(args, image_u8, timings: dict) -> tuple[str, dict[str, float] | None]:
    """The motion spec to use and, for ``auto``, the eight probabilities (printed)."""
    if args.motion != "auto":
        return args.motion, None
    with Stage("trajectory selection", timings):
        if args.selector:
            from d4d.select import motion_probabilities

            probs = motion_probabilities(image_u8, args.selector)
            source = f"classifier {args.selector}"
        else:
            from d4d.selectors.vlm import VLMSelector

            probs = (
                VLMSelector.from_pretrained(args.vlm, device=args.device)
                .scores(image_u8.numpy(), prompt=args.prompt or None)
                .as_dict()
            )
            source = f"VLM {args.vlm}"
    best = max(probs, key=probs.get)
    print(f"motion: {best}  ({source})")
    for label, p in sorted(probs.items(), key=lambda kv: -kv[1]):
        print(f"  {label:<11s} {p:6.3f} {'#' * round(40 * p)}")
    return best, probs


def _optimisation(args, stored: dict):
    """The per-scene optimisation config (or False) and its record for run.json; prints the values used
    and where each came from (flag > ``stored``, the 4D checkpoint's scene_optimisation > default)."""
    if args.no_optimise:
        print("4D per-scene optimisation: off (--no-optimise)", flush=True)
        return False, {"enabled": False}
    import dataclasses

    from d4d.generation.optimisation import describe, resolve_optim_config

    flags = {"pose_steps": args.pose_steps, "steps": args.optimise_steps}
    config, sources = resolve_optim_config(flags, stored, f"--fourd {args.fourd}")
    line = f"4D per-scene optimisation: {describe(config, sources)}"
    print(line, flush=True)
    return config, {"enabled": True, "config": dataclasses.asdict(config), "source": sources}


def _guidance(args, module: str) -> dict[str, float] | None:
    if module == "dynamic":
        g = {k: v for k, v in (("text", args.text_cfg), ("camera", args.camera_cfg)) if v is not None}
    else:
        g = {} if args.cfg is None else {"cfg": args.cfg}
    return g or None


def run_module(args, module: str, image, motion: str, probs, out: Path, fourd) -> dict:
    """Video -> 4D -> temporal super-resolution for one video module; writes ``out``; returns a record.
    ``fourd``: ``{"network", "depth", "optimise"}`` (``optimise``: an OptimConfig or False)."""
    import torch

    from d4d.fourd.reconstruct import reconstruct
    from d4d.generation.summary import save_summary
    from d4d.sample_video import _shape, load_generator
    from d4d.temporal_sr import temporal_super_resolution
    from d4d.video.interface import CameraPath, VideoRequest, VideoResult
    from d4d.video.io import write_camera_json, write_camera_realestate, write_video_outputs
    from d4d.video.paths import resolve_camera_path
    from d4d.view_layout import write_frame

    timings: dict = {}
    with Stage(f"{module}: loading", timings):
        generator = load_generator(getattr(args, module), args.device, getattr(args, "weights", None))
        if getattr(generator, "stage", module) != module:
            raise UserError(
                f"--{module} {getattr(args, module)}: a {generator.stage} checkpoint, not {module}"
            )
        frames_n, height, width = _shape(generator, args)
        camera = resolve_camera_path(motion, frames_n, height, width, args.stride, args.fov, args.magnitude)
    request = VideoRequest(
        image=image,
        camera=camera,
        prompt=args.prompt,
        seed=args.seed,
        num_steps=args.steps,
        guidance=_guidance(args, module),
        trajectory_scale=args.trajectory_scale,
    )
    with Stage(f"{module}: video", timings) as st:
        result = generator.generate(request, st.progress)
        result.info.setdefault("weights", getattr(generator, "sampling_weights", "raw"))
        paths = write_video_outputs(result, out, fps=args.fps)
    del generator
    frames = result.frames.float().clamp(0, 1)
    with Stage(f"{module}: 4D", timings) as st:
        rec = reconstruct(
            frames,
            result.camera,
            fourd["network"],
            fourd["depth"],
            fourd["optimise"],
            args.max_points,
            progress=st.progress,
        )
        scene = rec.scene.eval()
        scene.save(out / "scene.pt")
        scene.export_frames(out)
        corrected = CameraPath(
            scene.cameras_c2w.detach().float().cpu(),
            scene.K.detach().float().cpu(),
            height,
            width,
            f"{camera.label} (pose-corrected)",
        )
        write_camera_realestate(out / "cameras_corrected.txt", corrected, args.fps)
        write_camera_json(out / "cameras_corrected.json", corrected)
    record: dict = {
        "module": module,
        "motion": camera.label,
        "frames": int(frames.shape[0]),
        "size": [height, width],
        "video": str(paths["video"]),
        "info": result.info,
    }
    if rec.history:
        record["optimisation"] = {
            k: (v[-1] if isinstance(v, list) and v else v)
            for k, v in rec.history.items()
            if isinstance(v, (list, int, float))
        }
    with Stage(f"{module}: temporal super-resolution x{args.fps_factor}", timings) as st:
        import numpy as np

        depth = torch.stack(
            [torch.from_numpy(np.load(out / "depth" / f"{i:04d}.npy")) for i in range(len(frames))]
        )
        conf = torch.stack(
            [torch.from_numpy(np.load(out / "confidence" / f"{i:04d}.npy")) for i in range(len(frames))]
        )
        cams = scene.cameras_c2w.detach().float().cpu()
        sr = temporal_super_resolution(
            frames,
            depth,
            cams,
            scene.K.detach().float().cpu(),
            args.fps_factor,
            conf,
            args.sr_scale,
            progress=st.progress,
            scene=scene if args.sr_motion == "scene" else None,
        )
        sr_dir = out / "sr"
        sr_cam = CameraPath(
            sr.c2w, sr.K, sr.frames.shape[-2], sr.frames.shape[-1], f"{camera.label} x{args.fps_factor}"
        )
        write_video_outputs(
            VideoResult(
                sr.frames,
                sr_cam,
                {
                    "source": str(paths["video"]),
                    "factor": args.fps_factor,
                    "fallback_fraction": sr.fallback,
                    "moved_fraction": sr.moved,
                },
            ),
            sr_dir,
            fps=args.fps * args.fps_factor,
        )
        for i in range(sr.frames.shape[0]):
            write_frame(
                sr_dir,
                i,
                sr.depth[i],
                sr.confidence[i],
                sr.frames[i].permute(1, 2, 0),
                sr.c2w[i],
                sr.K,
                points=False,
            )
        from d4d.metrics import temporal_flicker

        record["temporal_sr"] = {
            "motion": args.sr_motion,
            "kept_static_fraction": round(sr.kept_static, 4),
            "frames": int(sr.frames.shape[0]),
            "fps": args.fps * args.fps_factor,
            "fallback_fraction": round(sr.fallback, 4),
            "moved_fraction": round(sr.moved, 4),
            "flicker_generated": temporal_flicker(frames),
            "flicker_sr": temporal_flicker(sr.frames),
        }
        log.info(
            "%s: %d -> %d frames; flicker %.5f -> %.5f; %.1f%% pixels blended linearly, "
            "%.1f%% moved by the 4D scene",
            module,
            frames.shape[0],
            sr.frames.shape[0],
            record["temporal_sr"]["flicker_generated"],
            record["temporal_sr"]["flicker_sr"],
            100 * sr.fallback,
            100 * sr.moved,
        )
    with Stage(f"{module}: summary picture", timings):
        save_summary(out / "summary.png", image, frames, result.camera.c2w, scene, camera.label, probs)
    record["timings_s"] = timings
    return record


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    try:
        check_output_dir(args.out, "--out")
        modules = _check_args(args)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        from d4d.select import read_image

        image_u8 = read_image(args.image)  # (H, W, 3) uint8
        image = image_u8.permute(2, 0, 1).float() / 255.0
        timings: dict = {}
        motion, probs = select_motion(args, image_u8, timings)
        with Stage("4D generator: loading", timings):
            from d4d.modules.fourdgen import load_network

            network, meta = load_network(args.fourd)
            optimise, optimise_record = _optimisation(args, meta.get("scene_optimisation") or {})
            depth = None
            if args.depth_model:
                from d4d.fourd.init import DepthEstimator

                depth = DepthEstimator(args.depth_model)
        out = Path(args.out)
        records = []
        for m in modules:
            target = out / m if len(modules) > 1 else out
            target.mkdir(parents=True, exist_ok=True)
            records.append(
                run_module(
                    args,
                    m,
                    image,
                    motion,
                    probs,
                    target,
                    {"network": network.to(args.device), "depth": depth, "optimise": optimise},
                )
            )
            if args.frames is None and len(modules) > 1:
                # --module both: one request (path, frame count) for both, so the results compare
                args.frames = records[-1]["frames"]
                log.info("%s: %d frames (%s's training length; --frames N to change)",
                         ", ".join(modules[1:]), args.frames, m)
        (out / "input.png").parent.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        Image.fromarray(image_u8.numpy()).save(out / "input.png")
        run = {
            "argv": sys.argv[1:] if argv is None else list(argv),
            "motion": motion,
            "probabilities": probs,
            "scene_optimisation": optimise_record,
            "results": records,
            "timings_s": timings,
            "total_s": round(time.perf_counter() - start, 2),
        }
        (out / "run.json").write_text(json.dumps(run, indent=1, default=str))
    except UserError as exc:
        exit_with_error(str(exc), PROG)
    for m, rec in zip(modules, records):
        where = out / m if len(modules) > 1 else out
        print(
            f"{m}: {rec['frames']} frames -> {where} (video.mp4, sr/video.mp4 with "
            f"{rec['temporal_sr']['frames']} frames, scene.pt, depth/ confidence/ color/ camera/ points/, "
            "summary.png)"
        )
    first = out if len(modules) == 1 else out / modules[0]
    print(f"done in {time.perf_counter() - start:.1f} s; browse with: python -m d4d.view {first}")
    if args.view:
        from d4d.view import main as view_main

        view_main([str(first), "--port", str(args.port)])


if __name__ == "__main__":
    main(sys.argv[1:])
