"""Procedural dynamic 3D scenes along the eight canonical motions: the embedded default data.

The pieces live in three modules and are re-exported here:

* :mod:`d4d.data.procedural_scene` - the scene description (:class:`Scene`, :class:`Shape`,
  :class:`Material`, :class:`Trajectory`), the cameras of a clip (:class:`CameraPath`) and
  :func:`caption`.
* :mod:`d4d.data.procedural_layouts` - the layout rule :func:`sample_scene` that makes the motion
  recognisable from the first frame (the rule per motion is tabled there).
* :mod:`d4d.data.procedural_render` - :func:`render`, a vectorised ray-caster usable from any
  camera at any time (novel views of the same scene).

:func:`render_clip` ties them together for one clip. To re-create a clip of the synthetic shards,
``sample_scene(meta["motion"], np.random.default_rng(meta["scene_seed"]), static=not meta["dynamic"])``.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from d4d.data.procedural_layouts import sample_scene
from d4d.data.procedural_render import FAR, NEAR, render
from d4d.data.procedural_scene import (
    FOV_DEG, CameraPath, Material, Scene, Shape, Trajectory, caption, intrinsics, pitch_c2w,
)

__all__ = [
    "FAR", "FOV_DEG", "NEAR", "CameraPath", "Clip", "Material", "Scene", "Shape", "Trajectory",
    "caption", "frame_grid", "intrinsics", "pitch_c2w", "render", "render_clip", "sample_scene",
]


@dataclasses.dataclass
class Clip:
    """Arrays of one rendered clip, in the units of :mod:`d4d.data.schema`.

    ``frames`` uint8 (T, H, W, 3); ``c2w`` float32 (T, 4, 4) world (y down, metres); ``K`` float32
    (T, 3, 3); ``depth`` float32 (T, H, W) z-depth, 0 = sky; ``mask`` bool (T, H, W) moving objects.
    """

    frames: np.ndarray
    c2w: np.ndarray
    K: np.ndarray
    depth: np.ndarray
    mask: np.ndarray
    scene: Scene
    path: CameraPath


def render_clip(motion: str, rng: np.random.Generator, num_frames: int, size: int,
                static: bool = False) -> Clip:
    """Sample a scene for ``motion`` with ``rng`` and render ``num_frames`` square frames of ``size``."""
    scene, path = sample_scene(motion, rng, static=static)
    c2w = path.c2w(num_frames)
    K = path.K(size, size).expand(num_frames, 3, 3)
    rgb, depth, mask = render(scene, c2w, K, size, size)
    return Clip(rgb.numpy(), c2w.numpy(), K.contiguous().numpy(), depth.numpy(), mask.numpy(), scene, path)


def frame_grid(clips: list[Clip], frames: tuple[float, ...] = (0.0, 0.5, 1.0)) -> np.ndarray:
    """uint8 image with one row per clip and one column per relative frame position (for docs)."""
    rows = []
    for clip in clips:
        T = clip.frames.shape[0]
        picks = [clip.frames[round(f * (T - 1))] for f in frames]
        padded = [np.pad(p, ((1, 1), (1, 1), (0, 0)), constant_values=255) for p in picks]  # white grid lines
        rows.append(np.concatenate(padded, 1))
    return np.concatenate(rows, 0)

