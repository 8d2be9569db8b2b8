"""Procedural dynamic 3D scenes: the description, the cameras of a clip, and captions.

World frame: OpenCV-like and gravity aligned, **y pointing down**, metres; the first camera of every
sampled clip sits at the origin, so the ground plane is ``y = +h`` with ``h`` the camera height.
Objects are axis-aligned boxes and spheres with two-colour procedural textures; a moving object's
centre is ``centre + offset(t)`` with ``t`` in [0, 1] over the clip. The layout rule that fills
these scenes is :mod:`d4d.data.procedural_layouts`; :mod:`d4d.data.procedural_render` ray-casts them.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from d4d.geometry.motions import motion_path

FOV_DEG = 60.0  # horizontal field of view of every synthetic camera; the layouts assume it

# Caption words of the patterns.
PATTERN_WORDS = {
    "plain": "", "checker": "checkered", "stripes": "striped", "dots": "dotted", "bricks": "brick",
}


@dataclasses.dataclass
class Material:
    """Two-colour procedural texture evaluated at the hit point (no images, no aliasing tables).

    ``pattern``: plain | checker | stripes | dots | bricks; ``period``: pattern period in metres;
    ``stripe_axis``: 0 stripes vary along the horizontal surface coordinate, 1 along the vertical.
    """

    colour: tuple[float, float, float]
    colour2: tuple[float, float, float]
    pattern: str = "plain"
    period: float = 1.0
    name: str = ""
    stripe_axis: int = 0

    def words(self) -> str:
        """e.g. ``'striped blue'`` (used by :func:`caption`)."""
        return " ".join(w for w in (PATTERN_WORDS[self.pattern], self.name) if w)


@dataclasses.dataclass
class Trajectory:
    """Offset of a moving object's centre at time ``t`` in [0, 1]; ``offset(0) = 0``.

    ``linear``: ``velocity * t`` (velocity in metres per clip). ``circular``: on a horizontal circle
    of ``radius`` about a point, the angle going from ``angle0`` to ``angle0 + sweep`` (radians).
    """

    kind: str
    velocity: tuple[float, float, float] = (0.0, 0.0, 0.0)
    radius: float = 0.0
    angle0: float = 0.0
    sweep: float = 0.0

    def offset(self, t: torch.Tensor) -> torch.Tensor:
        """``t: (T,)`` -> ``(T, 3)`` metres."""
        t = t.to(torch.float32)
        if self.kind == "linear":
            return t[:, None] * torch.tensor(self.velocity, dtype=torch.float32)
        if self.kind == "circular":
            a = self.angle0 + self.sweep * t
            zero = torch.zeros_like(t)
            return self.radius * torch.stack(
                [torch.cos(a) - math.cos(self.angle0), zero, torch.sin(a) - math.sin(self.angle0)], -1)
        raise ValueError(f"unknown trajectory kind {self.kind!r}")


@dataclasses.dataclass
class Shape:
    """An axis-aligned box (``half`` = half extents) or a sphere (``half[0]`` = radius).

    ``centre`` is the position at ``t = 0``; ``trajectory`` None means static. ``noun`` is the word
    the caption uses (box, sphere, tower, wall, plinth).
    """

    kind: str
    centre: tuple[float, float, float]
    half: tuple[float, float, float]
    material: Material
    noun: str = ""
    trajectory: Trajectory | None = None

    @property
    def moving(self) -> bool:
        return self.trajectory is not None

    def centres(self, times: torch.Tensor) -> torch.Tensor:
        """``times: (T,)`` -> centre per frame ``(T, 3)``."""
        c = torch.tensor(self.centre, dtype=torch.float32).expand(len(times), 3)
        return c + self.trajectory.offset(times) if self.trajectory is not None else c


@dataclasses.dataclass
class Scene:
    """A ground plane ``y = ground_y`` (y down), shapes, a sky gradient and a directional light.

    ``light_dir`` points *towards* the light (world, y down, so an overhead light has y < 0);
    shading is ``ambient + (1 - ambient) * max(0, n . l)``. ``layout`` names the arrangement
    (corridor, big_object, half_wall, centre_object, tower, overhead, frontal_wall) for captions.
    """

    ground_y: float
    ground: Material
    shapes: list[Shape]
    sky_top: tuple[float, float, float] = (0.35, 0.55, 0.90)
    sky_horizon: tuple[float, float, float] = (0.78, 0.86, 0.95)
    light_dir: tuple[float, float, float] = (0.4, -1.0, -0.5)
    ambient: float = 0.4
    layout: str = ""

    @property
    def dynamic(self) -> bool:
        return any(s.moving for s in self.shapes)


@dataclasses.dataclass
class CameraPath:
    """The camera of a sampled clip: ``c2w(T) = base_c2w @ motion_path(motion, T, magnitude, scene_depth)``.

    ``base_c2w``: (4, 4) nested list, the first camera in the world (rotation only; centre at the
    origin). Frame 0 is therefore *not* the identity for tilted starts (orbit, look_up, look_down).
    """

    motion: str
    base_c2w: list[list[float]]
    magnitude: float
    scene_depth: float
    fov_deg: float = FOV_DEG

    def c2w(self, num_frames: int) -> torch.Tensor:
        """``(T, 4, 4)`` float32 OpenCV camera-to-world."""
        rel = motion_path(self.motion, num_frames, self.magnitude, self.scene_depth, dtype=torch.float64)
        return (torch.tensor(self.base_c2w, dtype=torch.float64) @ rel).float()

    def K(self, height: int, width: int) -> torch.Tensor:
        return intrinsics(height, width, self.fov_deg)


def intrinsics(height: int, width: int, fov_deg: float = FOV_DEG) -> torch.Tensor:
    """``(3, 3)`` pixel intrinsics, horizontal field of view ``fov_deg``, square pixels, centred."""
    f = width / (2 * math.tan(math.radians(fov_deg / 2)))
    return torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]], dtype=torch.float32)


def pitch_c2w(degrees: float) -> list[list[float]]:
    """(4, 4) camera at the origin pitched up by ``degrees`` (negative: down), as in motions.py."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    return [[1.0, 0.0, 0.0, 0.0], [0.0, c, -s, 0.0], [0.0, s, c, 0.0], [0.0, 0.0, 0.0, 1.0]]


# ------------------------------------------------------------------------------------- captions
_SETTINGS = {
    "corridor": "at the end of a long corridor with {wall} walls",
    "big_object": "right in front of the camera on {ground} ground",
    "half_wall": "beside a {wall} wall on {ground} ground",
    "centre_object": "on a {wall} plinth on {ground} ground",
    "tower": "on {ground} ground under the sky",
    "overhead": "seen from above on {ground} ground",
    "frontal_wall": "in front of a {wall} wall",
}


def _describe(shape: Shape, adjective: str = "") -> str:
    words = " ".join(w for w in (adjective, shape.material.words(), shape.noun) if w)
    return ("an " if words[:1] in "aeiou" else "a ") + words


def _join(names: list[str], limit: int) -> str:
    """'a, b and c', with anything past ``limit`` counted."""
    extra = len(names) - limit
    names = names[:limit] + ([f"{extra} more object" + ("s" if extra > 1 else "")] if extra > 0 else [])
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]


def caption(scene: Scene) -> str:
    """A one-sentence description of the scene content, e.g.
    ``'a large striped blue box and a pink sphere, with a red box moving, right in front of the camera
    on checkered green ground'``.
    """
    things = [s for s in scene.shapes if s.noun not in ("wall", "plinth") and not s.moving]
    movers = [s for s in scene.shapes if s.moving]
    walls = [s for s in scene.shapes if s.noun in ("wall", "plinth")]
    first = {"big_object": "large", "tower": "tall"}.get(scene.layout, "")  # the layout's main object
    parts = []
    if things:
        parts.append(_join([_describe(s, first if i == 0 else "") for i, s in enumerate(things)], 3))
    if movers:
        parts.append(("with " if things else "") + _join([_describe(s) for s in movers], 3) + " moving")
    ground = scene.ground.words() or "bare"
    wall = walls[0].material.words() if walls else "grey"
    setting = _SETTINGS.get(scene.layout, "on {ground} ground").format(wall=wall, ground=ground)
    return ", ".join(parts or ["an empty scene"]) + ", " + setting
