"""RealEstate10K camera files + frames (or videos) -> clip shards and the motion-classifier image set.

    python -m data_prep.realestate10k --cameras RE10K/train --videos VIDEOS --out data/re10k/train
        [--frames FRAMES] [--captions captions.json] [--size 256x256] [--window 16] [--stride 8]
        [--frame-format mp4|npy] [--shard-size 64] [--workers N] [--array-index I --array-count N]

Inputs: ``--cameras`` is a split folder of camera files ``<clip_id>.txt`` (see
:func:`d4d.geometry.read_realestate_cameras`). Frames come from exactly one of
``--frames DIR`` (``DIR/<clip_id>/<timestamp_us>.png|jpg``: camera row with timestamp ``t`` uses the
file whose stem is ``t``; a row without a file rejects the clip as "missing frames", a file without
a row as "fewer rows than frames") or ``--videos DIR`` (``DIR/<clip_id>.mp4`` decoded with decord,
or PyAV where decord is not installed; frame ``i`` of the video is camera row ``i``, as in the clips
CameraCtrl publishes, so the video must have exactly as many frames as rows). ``--captions`` is a
JSON object clip id -> caption.

Per clip: frames resized to cover ``--size`` (H x W) and centre-cropped, intrinsics from the same
:func:`d4d.geometry.resize_and_center_crop` plan; windows of ``--window`` frames every ``--stride``
frames (``--window 0``: the whole clip; clips shorter than the window are rejected), each a sample
``<clip_id>_w<start:04d>`` with frames, ``c2w.npy`` (OpenCV c2w), ``intrinsics.npy`` and meta
(``motion`` and ``motion_confidence`` from :func:`d4d.geometry.classify_motion`, ``motion`` null
when ambiguous, caption, fps, timestamps_us). ``OUT/motion_images/`` gets the first frame of every
labelled window as ``image.jpg`` with its ``motion`` (the classifier's training set).
"""
from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from d4d.data.video import VideoDecodeError, read_video
from d4d.data.writer import encode_sample
from d4d.geometry import classify_motion, read_realestate_cameras, resize_and_center_crop
from d4d.utils.cli_args import nonneg_int, positive_int
from d4d.utils.errors import exit_with_error

from data_prep.common import ItemResult, Parser, add_common_args, check_common, need_dir, run_prep, safe_key

PROG = "python -m data_prep.realestate10k"
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")
MOTION_IMAGES = "motion_images"


class Reject(Exception):
    """A clip that cannot be used; the message is the manifest reason."""


@dataclasses.dataclass(frozen=True)
class Settings:
    frames_dir: Path | None
    videos_dir: Path | None
    split: str
    size: tuple[int, int]
    window: int
    stride: int
    frame_format: str


def load_video(path: Path, rows: int) -> tuple[np.ndarray, float]:
    """``<clip>.mp4`` -> (uint8 ``(T, H, W, 3)``, fps); frame ``i`` is camera row ``i``."""
    if not path.is_file():
        raise Reject(f"missing video {path.name}")
    try:
        frames, fps = read_video(path)
    except VideoDecodeError as exc:
        raise Reject(f"undecodable video {path.name}: {exc}") from None
    n = len(frames)
    if n != rows:
        why = "missing frames" if n < rows else "fewer rows than frames"
        raise Reject(f"{why}: video has {n} frames, camera file {rows} rows")
    return frames, fps


def load_frame_folder(folder: Path, timestamps: list[int]) -> np.ndarray:
    """``folder/<timestamp_us>.png|jpg`` -> uint8 ``(T, H, W, 3)`` in camera-row order."""
    if not folder.is_dir():
        raise Reject(f"missing frames: no folder {folder.name}")
    files = {}
    for f in folder.iterdir():
        if f.suffix.lower() in FRAME_SUFFIXES and f.stem.isdigit():
            files[int(f.stem)] = f
    missing = [t for t in timestamps if t not in files]
    if missing:
        raise Reject(f"missing frames: {len(missing)} of {len(timestamps)} rows have no frame (first {missing[0]})")
    extra = sorted(set(files) - set(timestamps))
    if extra:
        raise Reject(f"fewer rows than frames: {len(extra)} frames have no camera row (first {extra[0]})")
    frames = []
    for t in timestamps:
        try:
            with Image.open(files[t]) as im:
                frames.append(np.asarray(im.convert("RGB")))
        except Exception as exc:  # PIL raises many types for broken files
            raise Reject(f"unreadable frame {files[t].name}: {exc}") from None
    if len({f.shape for f in frames}) != 1:
        raise Reject("frames differ in size")
    return np.stack(frames)


def process_clip(camera_file: Path, cfg: Settings, caption: str | None) -> ItemResult:
    clip_id = camera_file.stem
    res = ItemResult(item_id=clip_id)
    try:
        try:
            cams = read_realestate_cameras(camera_file)
        except ValueError as exc:
            why = "non-finite pose" if "non-finite" in str(exc) else "bad camera file"
            raise Reject(f"{why}: {exc}") from None
        if not torch.isfinite(cams.c2w).all():
            raise Reject("non-finite pose: singular world-to-camera matrix")
        stamps = cams.timestamps_us.tolist()
        if cfg.videos_dir is not None:
            frames, fps = load_video(cfg.videos_dir / f"{clip_id}.mp4", len(cams))
        else:
            frames = load_frame_folder(cfg.frames_dir / clip_id, stamps)
            span = (stamps[-1] - stamps[0]) / 1e6
            fps = (len(stamps) - 1) / span if len(stamps) > 1 and span > 0 else 0.0
        T, H, W = frames.shape[:3]
        window = cfg.window or T
        if T < window:
            raise Reject(f"clip has {T} frames, fewer than --window {window}")
        plan = resize_and_center_crop(cams.K(H, W), (H, W), cfg.size)
        images = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
        out = plan.apply(images).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        K = plan.K.float().numpy()
        c2w = cams.c2w.float().numpy()
    except Reject as exc:
        res.rejected = str(exc)
        return res
    main, firsts = [], []
    for start in range(0, T - window + 1, cfg.stride):
        sl = slice(start, start + window)
        m = classify_motion(cams.c2w[sl])
        key = f"{safe_key(clip_id)}_w{start:04d}"
        meta: dict[str, Any] = {
            "dataset": "realestate10k", "clip_id": clip_id, "window_start": start, "split": cfg.split,
            "motion": m.label, "motion_confidence": round(float(m.confidence), 6), "motion_best": m.best,
            "fps": round(fps, 6), "timestamps_us": stamps[sl], "caption": caption or "",
        }
        main.append(encode_sample(key, out[sl], meta, c2w[sl], K[sl], frame_format=cfg.frame_format,
                                  fps=fps or 8.0))
        res.labels.append(m.label)
        if m.label is not None:
            img_meta = {k: meta[k] for k in ("dataset", "clip_id", "window_start", "split", "motion",
                                              "motion_confidence", "caption")}
            firsts.append(encode_sample(key, out[start:start + 1], img_meta, frame_format="jpg"))
    res.samples = {"": main, MOTION_IMAGES: firsts}
    return res


def _task(item: tuple[str, str | None], cfg: Settings) -> ItemResult:
    return process_clip(Path(item[0]), cfg, item[1])


def parse_size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    size = (int(h), int(w or h))
    if min(size) < 2:
        raise ValueError(text)
    return size


def read_captions(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    if not path.is_file():
        exit_with_error(f"{path}: captions file does not exist", PROG)
    try:
        caps = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        exit_with_error(f"{path}: captions file is not JSON", PROG)
    if not isinstance(caps, dict) or not all(isinstance(v, str) for v in caps.values()):
        exit_with_error(f"{path}: captions must be a JSON object of clip id -> caption string", PROG)
    return caps


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the CLI; returns the manifest (or the array task's summary)."""
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--cameras", required=True, type=Path, help="split folder of <clip_id>.txt camera files")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--frames", type=Path, help="folder of <clip_id>/<timestamp_us>.png|jpg")
    src.add_argument("--videos", type=Path, help="folder of <clip_id>.mp4 (frame i = camera row i)")
    p.add_argument("--captions", type=Path, help="JSON object clip id -> caption")
    p.add_argument("--size", default="256x256", help="output H x W, e.g. 256x384")
    p.add_argument("--window", type=nonneg_int, default=16, help="frames per sample (0 = whole clip)")
    p.add_argument("--stride", type=positive_int, default=8, help="frames between window starts")
    p.add_argument("--frame-format", choices=("mp4", "npy"), default="mp4")
    add_common_args(p)
    args = p.parse_args(argv)
    check_common(args, PROG)
    try:
        size = parse_size(args.size)
    except ValueError:
        exit_with_error(f"--size must be HxW with even sizes >= 2, got {args.size!r}", PROG)
    if args.frame_format == "mp4" and (size[0] % 2 or size[1] % 2):
        exit_with_error(f"--size {args.size}: mp4 (H.264) needs even sizes; use --frame-format npy", PROG)
    if args.window < 0 or args.stride < 1:
        exit_with_error(f"--window must be >= 0 and --stride >= 1, got {args.window}, {args.stride}", PROG)
    cameras = need_dir(args.cameras, "camera split", PROG)
    files = sorted(cameras.glob("*.txt"))
    if not files:
        exit_with_error(f"{cameras}: no RealEstate10K camera files (<clip_id>.txt) in this split folder", PROG)
    source = need_dir(args.frames or args.videos, "frames" if args.frames else "videos", PROG)
    captions = read_captions(args.captions)
    cfg = Settings(frames_dir=source if args.frames else None, videos_dir=source if args.videos else None,
                   split=cameras.name, size=size, window=args.window, stride=args.stride,
                   frame_format=args.frame_format)
    items = [(str(f), captions.get(f.stem)) for f in files]
    return run_prep("realestate10k", items, partial(_task, cfg=cfg), args, PROG,
                    subdirs=("", MOTION_IMAGES), unit="clip")


if __name__ == "__main__":
    main()
