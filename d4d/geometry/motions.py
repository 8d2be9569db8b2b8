"""The eight canonical camera motions of Dream4D as analytic SE(3) paths.

Conventions (``../shared/docs/reference.md`` sections 1-2): OpenCV camera axes (x right, y down,
z forward); a path is ``c2w: (T, 4, 4)`` camera-to-world with frame 0 the identity, so the world
frame *is* the first camera's frame. Translations are in the units of ``scene_depth`` (metres for
synthetic data, arbitrary SfM units for RealEstate10K).
"""
from __future__ import annotations

import math

import torch

# Label order of the official Dream4D classifier code; the index of a label is its class id.
MOTIONS: tuple[str, ...] = (
    "zoom_in",
    "zoom_out",
    "turn_left",
    "turn_right",
    "orbit",
    "look_up",
    "look_down",
    "stationary",
)

# Default magnitude per motion, in the motion's natural unit:
#   zoom_*: distance travelled as a fraction of scene_depth; turn_*/look_*: total angle in degrees;
#   orbit: arc angle in degrees around a centre at scene_depth in front of the first camera.
DEFAULT_MAGNITUDE: dict[str, float] = {
    "zoom_in": 0.4,
    "zoom_out": 0.4,
    "turn_left": 30.0,
    "turn_right": 30.0,
    "orbit": 30.0,
    "look_up": 20.0,
    "look_down": 20.0,
    "stationary": 0.0,
}


def _rot_x(angle: torch.Tensor) -> torch.Tensor:
    """(N,) radians -> (N, 3, 3) rotation about +x (positive pitches the view up, y being down)."""
    c, s = torch.cos(angle), torch.sin(angle)
    o, z = torch.ones_like(angle), torch.zeros_like(angle)
    return torch.stack([o, z, z, z, c, -s, z, s, c], -1).reshape(-1, 3, 3)


def _rot_y(angle: torch.Tensor) -> torch.Tensor:
    """(N,) radians -> (N, 3, 3) rotation about +y (positive turns the view towards +x, right)."""
    c, s = torch.cos(angle), torch.sin(angle)
    o, z = torch.ones_like(angle), torch.zeros_like(angle)
    return torch.stack([c, z, s, z, o, z, -s, z, c], -1).reshape(-1, 3, 3)


def motion_path(
    name: str,
    num_frames: int,
    magnitude: float | None = None,
    scene_depth: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Analytic camera path for one of :data:`MOTIONS`.

    Args:
        name: a label from :data:`MOTIONS`.
        num_frames: T >= 1; progress is linear in the frame index (constant speed).
        magnitude: size of the motion in the unit of :data:`DEFAULT_MAGNITUDE` (default there).
            Negative values reverse the direction (e.g. an orbit to the left).
        scene_depth: distance from the first camera to the scene centre, > 0. Sets the dolly
            length of the zooms and the orbit radius.

    Returns:
        ``c2w: (T, 4, 4)`` OpenCV camera-to-world, ``c2w[0]`` the identity.

    * zoom_in / zoom_out: dolly along +z / -z by ``magnitude * scene_depth``.
    * turn_left / turn_right: yaw in place about the camera y axis (right = positive about +y).
    * look_up / look_down: pitch in place about the camera x axis (up = positive about +x).
    * orbit: the centre moves on a circle of radius ``scene_depth`` about the vertical axis through
      ``(0, 0, scene_depth)``, to the camera's right for positive magnitude, always facing the centre.
    * stationary: identity for every frame.
    """
    if name not in MOTIONS:
        raise ValueError(f"unknown motion {name!r}; expected one of {', '.join(MOTIONS)}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if not scene_depth > 0:
        raise ValueError(f"scene_depth must be > 0, got {scene_depth}")
    mag = DEFAULT_MAGNITUDE[name] if magnitude is None else float(magnitude)
    s = torch.linspace(0.0, 1.0, num_frames, dtype=torch.float64) if num_frames > 1 else torch.zeros(1, dtype=torch.float64)
    c2w = torch.eye(4, dtype=torch.float64).repeat(num_frames, 1, 1)
    if name in ("zoom_in", "zoom_out"):
        sign = 1.0 if name == "zoom_in" else -1.0
        c2w[:, 2, 3] = sign * mag * scene_depth * s
    elif name in ("turn_left", "turn_right"):
        sign = 1.0 if name == "turn_right" else -1.0
        c2w[:, :3, :3] = _rot_y(sign * math.radians(mag) * s)
    elif name in ("look_up", "look_down"):
        sign = 1.0 if name == "look_up" else -1.0
        c2w[:, :3, :3] = _rot_x(sign * math.radians(mag) * s)
    elif name == "orbit":
        rot = _rot_y(-math.radians(mag) * s)  # facing the centre while moving right
        centre = torch.tensor([0.0, 0.0, scene_depth], dtype=torch.float64)
        start = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)
        c2w[:, :3, :3] = rot
        c2w[:, :3, 3] = centre + (rot @ (start - centre))
    return c2w.to(dtype)
