"""Camera-path resolution for the video commands: a motion name, an alias/preset, or a camera file.

``resolve_camera_path(spec, ...)`` turns what a user types after ``--motion`` into a
:class:`~d4d.video.interface.CameraPath` (OpenCV c2w, frame 0 the identity, pixel K at the output size):

* a label or any alias of :data:`d4d.geometry.motions.MOTION_ALIASES` (``zoom_in``, ``"orbit left"``,
  ``move-forward`` ...): the analytic path of :func:`~d4d.geometry.motions.named_motion_path` over the
  clip, with ``K`` from ``fov_deg`` (horizontal);
* a RealEstate10K camera file (``.txt``): every ``stride``-th row from the first, made relative to
  it, ``K`` from the file's normalised intrinsics at the output size;
* a JSON file as written by :func:`d4d.video.io.write_camera_json` (``c2w``, ``K``, ``height``,
  ``width``); ``K`` is rescaled when the output size differs.

Bad specs raise :class:`~d4d.utils.errors.UserError` naming the spec.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from d4d.geometry.cameras import intrinsics_matrix, read_realestate_cameras, relative_poses, resize_intrinsics
from d4d.geometry.motions import named_motion_path
from d4d.utils.errors import UserError
from d4d.video.interface import CameraPath


def default_intrinsics(height: int, width: int, fov_deg: float = 60.0) -> torch.Tensor:
    """``(3, 3)`` pixel K with horizontal field of view ``fov_deg``, square pixels, centred."""
    f = width / (2 * math.tan(math.radians(fov_deg) / 2))
    return intrinsics_matrix(f, f, width / 2, height / 2).float()


def _from_realestate(path: Path, num_frames: int, height: int, width: int, stride: int) -> CameraPath:
    try:
        cams = read_realestate_cameras(path)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    idx = list(range(0, len(cams), stride))[:num_frames]
    if len(idx) < num_frames:
        raise UserError(f"{path}: {len(cams)} camera rows give only {len(idx)} frames at stride {stride}, "
                        f"{num_frames} requested")
    c2w = relative_poses(cams.c2w[idx], 0).float()
    return CameraPath(c2w, cams.K(height, width)[0].float(), height, width, label=str(path))


def _from_json(path: Path, num_frames: int, height: int, width: int) -> CameraPath:
    try:
        data = json.loads(path.read_text())
        c2w = torch.tensor(data["c2w"], dtype=torch.float64)
        K = torch.tensor(data["K"], dtype=torch.float32)
        src_hw = (int(data["height"]), int(data["width"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: not a camera-path JSON with c2w, K, height, width ({exc})") from None
    if c2w.ndim != 3 or c2w.shape[1:] != (4, 4) or K.shape != (3, 3):
        raise UserError(f"{path}: c2w must be (F, 4, 4) and K (3, 3), got {tuple(c2w.shape)}, {tuple(K.shape)}")
    if c2w.shape[0] < num_frames:
        raise UserError(f"{path}: {c2w.shape[0]} cameras, {num_frames} requested")
    K = resize_intrinsics(K, src_hw, (height, width))
    return CameraPath(relative_poses(c2w[:num_frames], 0).float(), K, height, width, label=str(path))


def resolve_camera_path(spec: str, num_frames: int, height: int, width: int, stride: int = 1,
                        fov_deg: float = 60.0, magnitude: float | None = None, scene_depth: float = 1.0) -> CameraPath:
    """``spec`` (motion name, alias, or camera file) -> :class:`CameraPath` of ``num_frames`` frames.

    ``stride`` picks every ``stride``-th row of a camera file; analytic motions span the whole clip
    whatever the stride (their speed is set by ``magnitude``, default
    :data:`d4d.geometry.motions.DEFAULT_MAGNITUDE`).
    """
    if num_frames < 1 or stride < 1:
        raise UserError(f"frames and stride must be >= 1, got {num_frames}, {stride}")
    path = Path(spec)
    if path.suffix.lower() in (".txt", ".json") or path.is_file():
        if not path.is_file():
            raise UserError(f"camera file not found: {spec}")
        if path.suffix.lower() == ".json":
            return _from_json(path, num_frames, height, width)
        return _from_realestate(path, num_frames, height, width, stride)
    try:
        c2w = named_motion_path(spec, num_frames, magnitude, scene_depth)
    except ValueError as exc:
        raise UserError(f"--motion: {exc}") from None
    return CameraPath(c2w.float(), default_intrinsics(height, width, fov_deg), height, width, label=spec)
