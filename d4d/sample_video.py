"""``python -m d4d.sample_video IMAGE --checkpoint CKPT --out DIR [options]``: one camera-controlled video.

Shared by the video stages: the checkpoint's ``d4d_stage`` entry picks the module
(:data:`STAGES`), which must implement :class:`d4d.video.interface.VideoGenerator` and a
``from_checkpoint(path, map_location)`` classmethod. The camera path comes from ``--motion``: a
motion label or alias (``zoom_in``, ``"orbit left"``, ``move-forward``), or a camera file
(RealEstate10K ``.txt`` or d4d ``.json``); see :mod:`d4d.video.paths`. Outputs (:mod:`d4d.video.io`):
``video.mp4``, ``frames/*.png``, ``cameras.txt`` (RealEstate10K), ``cameras.json``, ``info.json``,
``preview.png``.

Guidance: ``--text-cfg`` and ``--camera-cfg`` (dynamic stage: separate terms, defaults 5.5 and 1.0);
stage-specific scales pass through ``--guidance NAME=VALUE`` (e.g. ``--guidance cfg=4`` for static).
Only scales given on the command line are sent; the stage keeps its defaults for the others.
"""
from __future__ import annotations

import argparse
import importlib
import math
import sys
from pathlib import Path

from d4d.utils.checkpoints import read_checkpoint
from d4d.utils.cli_args import (
    OneLineParser, finite_float, float_in, int_at_least, nonneg_float, nonneg_int, positive_float, positive_int,
    torch_device,
)
from d4d.utils.errors import UserError, exit_with_error
from d4d.utils.paths import check_output_dir

PROG = "d4d.sample_video"
STAGES = {"dynamic": "d4d.modules.dynamic:DynamicVideoModule", "static": "d4d.modules.static:StaticVideoModule"}


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0], error_prog=PROG)
    p.add_argument("image", help="conditioning image (PNG/JPEG)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint of a video stage (.ckpt)")
    p.add_argument("--weights", choices=("ema", "raw"), default=None,
                   help="weights to sample with: ema (the default when the checkpoint has them) or raw")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--prompt", default="", help="text prompt")
    p.add_argument("--motion", default="zoom_in", help="motion name/alias, or a RealEstate10K .txt / .json camera file")
    p.add_argument("--frames", type=int_at_least(2), default=None,
                   help="frames to generate (default: the training clip length)")
    p.add_argument("--height", type=positive_int, default=None, help="output height (default: the training size)")
    p.add_argument("--width", type=positive_int, default=None, help="output width (default: the training size)")
    p.add_argument("--steps", type=positive_int, default=None, help="sampling steps (stage default: dynamic 25)")
    p.add_argument("--text-cfg", type=finite_float, default=None, help="text guidance scale (dynamic default 5.5)")
    p.add_argument("--camera-cfg", type=finite_float, default=None,
                   help="camera guidance scale (dynamic default 1.0)")
    p.add_argument("--guidance", action="append", default=[], metavar="NAME=VALUE", help="other stage guidance scales")
    p.add_argument("--trajectory-scale", type=finite_float, default=1.0, help="multiplies the path's translations")
    p.add_argument("--stride", type=positive_int, default=2, help="rows of a camera file per generated frame")
    p.add_argument("--magnitude", type=nonneg_float, default=None,
                   help="size of an analytic motion (degrees or depth fraction)")
    p.add_argument("--fov", type=float_in(0.0, 180.0, lo_open=True, hi_open=True), default=60.0,
                   help="horizontal field of view for analytic motions (degrees, in (0, 180))")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--fps", type=positive_float, default=8.0)
    p.add_argument("--device", type=torch_device, default="auto",
                   help="auto (cuda when available, else cpu), cpu, cuda, cuda:1 ...")
    return p


def load_generator(checkpoint: str, map_location: str = "cpu", weights: str | None = None):
    """Read ``d4d_stage`` from ``checkpoint`` and build that stage's module with ``from_checkpoint``.
    ``weights``: ``"ema"``, ``"raw"`` or None (EMA weights when the checkpoint has them, see
    :mod:`d4d.callbacks.ema`); the module's ``sampling_weights`` says which were loaded."""
    path = Path(checkpoint)
    try:
        ckpt = read_checkpoint(path, mmap=True)  # mmap: only d4d_stage is read here
    except UserError as exc:
        raise UserError(f"--checkpoint: {exc}") from None
    stage = ckpt.get("d4d_stage")
    if stage not in STAGES:
        raise UserError(f"--checkpoint: {checkpoint} has d4d_stage={stage!r}; expected one of {sorted(STAGES)}")
    del ckpt
    module_name, cls_name = STAGES[stage].split(":")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"stage {stage!r}: {STAGES[stage]} is not available ({exc})") from None
    if weights is None:
        return cls.from_checkpoint(path, map_location=map_location)
    return cls.from_checkpoint(path, map_location=map_location, weights=weights)


def _shape(generator, args) -> tuple[int, int, int]:
    """(frames, height, width): the command line's, else what the generator was trained on
    (its ``training_data`` dict: ``num_frames``, ``image_size``)."""
    data = getattr(generator, "training_data", None) or {}
    size = data.get("image_size") or (None, None)
    shape = (args.frames or data.get("num_frames"), args.height or size[0], args.width or size[1])
    if None in shape:
        raise UserError("the checkpoint does not record its clip size: give --frames, --height and --width")
    return int(shape[0]), int(shape[1]), int(shape[2])


def _read_image(path: str):
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        img = np.asarray(Image.open(path).convert("RGB"))
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        raise UserError(f"image {path}: cannot read it ({exc.__class__.__name__})") from None
    return torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255.0


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        check_output_dir(args.out, "--out")
        guidance: dict[str, float] = {}
        for item in args.guidance:
            name, sep, value = item.partition("=")
            try:
                guidance[name.strip()] = float(value)
            except ValueError:
                raise UserError(f"--guidance {item!r}: expected NAME=VALUE with a number") from None
            if not sep:
                raise UserError(f"--guidance {item!r}: expected NAME=VALUE")
            if not math.isfinite(guidance[name.strip()]):
                raise UserError(f"--guidance {item!r}: the value must be a finite number")
        if args.text_cfg is not None:
            guidance["text"] = args.text_cfg
        if args.camera_cfg is not None:
            guidance["camera"] = args.camera_cfg
        image = _read_image(args.image)
        from tqdm import tqdm

        from d4d.video.interface import VideoRequest
        from d4d.video.io import write_video_outputs
        from d4d.video.paths import resolve_camera_path

        generator = load_generator(args.checkpoint, args.device, args.weights)
        frames, height, width = _shape(generator, args)
        camera = resolve_camera_path(args.motion, frames, height, width, args.stride, args.fov, args.magnitude)
        request = VideoRequest(image=image, camera=camera, prompt=args.prompt, seed=args.seed, num_steps=args.steps,
                               guidance=guidance or None, trajectory_scale=args.trajectory_scale)
        with tqdm(desc="sampling", unit="step") as bar:  # closed before any error line is printed

            def progress(done: int, total: int, what: str) -> None:
                bar.total = total
                bar.set_postfix_str(what)
                bar.update(done - bar.n)

            result = generator.generate(request, progress)
        result.info.setdefault("weights", getattr(generator, "sampling_weights", "raw"))
        paths = write_video_outputs(result, args.out, fps=args.fps)
        print(f"wrote {paths['video']} ({result.frames.shape[0]} frames, {camera.label}) and cameras to {args.out}")
    except UserError as exc:
        exit_with_error(str(exc), PROG)


if __name__ == "__main__":
    main(sys.argv[1:])
