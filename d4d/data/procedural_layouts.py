"""The layout rule: a procedural scene per camera motion whose *first frame* shows the motion.

Colours, textures, sizes and exact positions vary; the arrangement does not. Horizontal image flips
swap ``turn_left`` and ``turn_right``, so a classifier trained on this data must not flip. World
and camera conventions are those of :mod:`d4d.data.procedural_scene` (y down, first camera at the
origin, ground at ``y = h``); the horizontal field of view is :data:`FOV_DEG` (60 deg).

==============  ===================================================================================
motion          first frame
==============  ===================================================================================
zoom_in         a corridor: two side walls converging to the centre; a small object far away
                (9-14 m) at the image centre at the end of the open corridor. The camera dollies
                towards it.
zoom_out        one large box or sphere 2.2-3.2 m away filling 55-80 % of the image width, centred
                at eye level with sky above it; the camera backs away and reveals ground and
                objects around it.
turn_left       a close frontal wall (1.8-3 m) covering the right half of the image, open ground
                with objects on the left (and further left, outside the view). The camera yaws
                towards the open side.
turn_right      the mirror image: wall on the left half, open space on the right.
orbit           one medium object (or a sphere on a box) on a thin square plinth on open ground
                3.5-5 m away, centred, the camera tilted down to look at it; the camera circles
                around it.
look_up         a tall tower 3.5-5.5 m away in the centre rising past the top edge of the image,
                horizon visible, camera level or tilted up a little; its moving objects float and
                rise.
look_down       camera 2.5-4 m high pitched down 35-45 deg: textured ground with objects seen
                from above fills the whole image (no horizon, no sky).
stationary      a frontal wall 3.5-6 m away spanning the full width, ground below it, and moving
                objects in front of the wall; the camera does not move.
==============  ===================================================================================

Dynamic scenes add 1-3 small moving boxes/spheres (2-3 for stationary; linear or circular paths on
the ground, rising in the air for look_up) inside the first view. ``static=True`` places the same
objects without motion and draws the same random numbers, so both variants of a seed share the
layout. The motion's magnitude is :data:`DEFAULT_MAGNITUDE` times a factor in [0.8, 1.2].
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from d4d.data.procedural_scene import FOV_DEG, CameraPath, Material, Scene, Shape, Trajectory, pitch_c2w
from d4d.geometry.motions import DEFAULT_MAGNITUDE, MOTIONS

_TAN = math.tan(math.radians(FOV_DEG / 2))  # half-width of the view per metre of depth

# Display-space RGB in [0, 1]; the names are what the captions say.
OBJECT_COLOURS = {
    "red": (0.85, 0.15, 0.12), "orange": (0.96, 0.52, 0.10), "yellow": (0.95, 0.85, 0.15),
    "green": (0.20, 0.68, 0.22), "teal": (0.10, 0.62, 0.60), "blue": (0.15, 0.35, 0.88),
    "purple": (0.55, 0.25, 0.78), "pink": (0.96, 0.48, 0.68), "white": (0.93, 0.93, 0.90),
    "black": (0.10, 0.10, 0.12),
}
WALL_COLOURS = {
    "grey": (0.55, 0.55, 0.57), "beige": (0.80, 0.72, 0.58), "white": (0.86, 0.86, 0.84),
    "brick-red": (0.62, 0.30, 0.24), "slate": (0.38, 0.44, 0.54),
}
GROUND_COLOURS = {
    "green": (0.32, 0.55, 0.25), "grey": (0.48, 0.48, 0.48), "sandy": (0.78, 0.69, 0.50),
    "brown": (0.46, 0.34, 0.22), "dark": (0.25, 0.26, 0.30),
}


class _Draw:
    """The scene's only source of randomness, with the few draws the layouts need."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def u(self, a: float, b: float) -> float:
        return float(self.rng.uniform(a, b))

    def sign(self) -> float:
        return float(self.rng.choice([-1.0, 1.0]))

    def count(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi)."""
        return int(self.rng.integers(lo, hi))

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def pick(self, table: dict) -> tuple[str, tuple[float, float, float]]:
        name = list(table)[self.rng.integers(len(table))]
        return name, table[name]


def _shade(colour, factor: float) -> tuple[float, float, float]:
    return tuple(float(min(1.0, max(0.0, c * factor))) for c in colour)


def _material(r: _Draw, table: dict, patterns: tuple[str, ...], period: tuple[float, float]) -> Material:
    name, colour = r.pick(table)
    pattern = patterns[r.count(0, len(patterns))]
    if r.chance(0.5):  # second colour: a darker/lighter shade or another colour of the table
        other = _shade(colour, float(r.rng.choice([0.45, 1.5])))
    else:
        other = r.pick(table)[1]
        other = other if other != colour else _shade(colour, 0.45)
    return Material(colour, other, pattern, r.u(*period), name, r.count(0, 2))


def _object_material(r: _Draw) -> Material:
    return _material(r, OBJECT_COLOURS, ("plain", "checker", "stripes", "dots"), (0.25, 0.6))


def _wall_material(r: _Draw) -> Material:
    return _material(r, WALL_COLOURS, ("plain", "bricks", "stripes", "checker"), (0.6, 1.2))


def _ground_material(r: _Draw) -> Material:
    return _material(r, GROUND_COLOURS, ("checker", "checker", "stripes", "dots", "plain"), (0.8, 1.6))


def _thing(r: _Draw, x: float, z: float, ground_y: float, size: float) -> Shape:
    """A box or sphere of about ``size`` metres resting on the ground at (x, z)."""
    if r.count(0, 2) == 1:
        rad = size / 2
        return Shape("sphere", (x, ground_y - rad, z), (rad, rad, rad), _object_material(r), "sphere")
    hx, hy, hz = (size / 2 * r.u(0.7, 1.3) for _ in range(3))
    return Shape("box", (x, ground_y - hy, z), (hx, hy, hz), _object_material(r), "box")


def _wall(x0: float, x1: float, z0: float, z1: float, ground_y: float, height: float,
          material: Material) -> Shape:
    """A box wall from the ground up ``height`` metres over [x0, x1] x [z0, z1]."""
    return Shape("box", ((x0 + x1) / 2, ground_y - height / 2, (z0 + z1) / 2),
                 ((x1 - x0) / 2, height / 2, (z1 - z0) / 2), material, "wall")


def _clear_spot(x: float, z: float, shapes: list[Shape], margin: float = 0.4) -> tuple[float, float]:
    """Slide a ground spot towards the camera (same image column) until it is ``margin`` metres clear of
    every shape's footprint, so that a moving object does not start inside a static one."""
    for _ in range(8):
        gaps = [math.hypot(max(abs(x - s.centre[0]) - s.half[0], 0.0),
                           max(abs(z - s.centre[2]) - s.half[2], 0.0)) for s in shapes]
        if min(gaps, default=math.inf) > margin:
            break
        x, z = 0.9 * x, 0.9 * z
    return x, z


def _movers(r: _Draw, spots: list[tuple[float, float]], ground_y: float, span: float,
            static: bool) -> list[Shape]:
    """Small objects at ground spots (x, z); each moves about ``span`` metres unless ``static``."""
    shapes = []
    for x, z in spots:
        s = _thing(r, x, z, ground_y, r.u(0.3, 0.6))
        # Draw the trajectory even when static, so that both variants of a seed share every other draw.
        heading, length = r.u(0, 2 * math.pi), span * r.u(0.7, 1.3)
        sweep = r.u(0.5, 1.5) * math.pi * r.sign()
        radius, angle0 = span * r.u(0.4, 0.7), r.u(0, 2 * math.pi)
        if r.chance(0.6):
            velocity = (length * math.cos(heading), 0.0, length * math.sin(heading))
            trajectory = Trajectory("linear", velocity=velocity)
        else:
            trajectory = Trajectory("circular", radius=radius, angle0=angle0, sweep=sweep)
        s.trajectory = None if static else trajectory
        shapes.append(s)
    return shapes


@dataclasses.dataclass
class _Layout:
    name: str  # a key of procedural_scene's caption settings
    h: float  # camera height above the ground (metres)
    shapes: list[Shape]
    spots: list[tuple[float, float]]  # ground positions (x, z) of the moving objects
    span: float  # how far the moving objects travel (metres)
    depth: float  # motion_path's scene_depth: dolly scale, orbit radius
    base: list[list[float]] = dataclasses.field(default_factory=lambda: pitch_c2w(0.0))


# One function per motion: (draw, camera height, number of movers) -> layout.
def _zoom_in(r: _Draw, h: float, n: int) -> _Layout:
    w, far, wall_h, mat = r.u(1.2, 2.0), r.u(9.0, 14.0), r.u(2.5, 4.5), _wall_material(r)
    shapes = [_wall(-w - 0.2, -w, -1.0, 40.0, h, wall_h, mat), _wall(w, w + 0.2, -1.0, 40.0, h, wall_h, mat),
              _thing(r, r.u(-0.2, 0.2), far, h, r.u(0.8, 1.3))]
    # Beyond where the dolly ends (0.4-0.5 of the way), so the camera never runs into them.
    spots = [(r.u(-w + 0.5, w - 0.5), r.u(0.55 * far, far - 1.5)) for _ in range(n)]
    return _Layout("corridor", h, shapes, spots, 0.8, far)


def _zoom_out(r: _Draw, h: float, n: int) -> _Layout:
    dist = r.u(2.2, 3.2)
    half_w = r.u(0.55, 0.8) * dist * _TAN
    # The camera near the object's mid-height, so the object is centred with sky above it (a tower
    # of look_up passes the top edge instead).
    h = half_w + r.u(-0.1, 0.15)
    if r.chance(0.5):
        big = Shape("sphere", (0.0, h - half_w, dist + half_w), (half_w,) * 3, _object_material(r), "sphere")
    else:
        hy = half_w * r.u(0.85, 1.0)
        big = Shape("box", (0.0, h - hy, dist + half_w), (half_w, hy, half_w), _object_material(r), "box")
    shapes = [big]
    for _ in range(r.count(1, 4)):  # revealed while the camera backs away
        x = r.sign() * r.u(2.5, 5.0)
        shapes.append(_thing(r, x, r.u(3.0, 8.0), h, r.u(0.5, 1.2)))
    spots = [(r.sign() * (half_w + r.u(0.5, 1.0)), dist + r.u(0.0, 1.5)) for _ in range(n)]
    return _Layout("big_object", h, shapes, spots, 0.5, dist)


def _turn(side: float) -> Callable[[_Draw, float, int], _Layout]:
    """``side`` +1: wall on the right (turn_left); -1: wall on the left (turn_right)."""

    def layout(r: _Draw, h: float, n: int) -> _Layout:
        dist = r.u(1.8, 3.0)
        edge = side * r.u(-0.1, 0.15) * dist * _TAN  # the wall's inner edge, near the image centre
        x0, x1 = (edge, 30.0) if side > 0 else (-30.0, edge)
        shapes = [_wall(x0, x1, dist, dist + 0.3, h, r.u(3.0, 5.0), _wall_material(r))]
        for _ in range(r.count(2, 5)):  # open side, from near the centre to outside the view
            a, d = math.radians(r.u(8.0, 60.0)), r.u(4.0, 12.0)
            shapes.append(_thing(r, -side * d * math.sin(a), d * math.cos(a), h, r.u(0.5, 1.4)))
        spots = []
        for _ in range(n):
            a, d = math.radians(r.u(5.0, 22.0)), r.u(3.0, 6.0)
            spots.append((-side * d * math.sin(a), d * math.cos(a)))
        return _Layout("half_wall", h, shapes, spots, 0.8, dist)

    return layout


def _orbit(r: _Draw, h: float, n: int) -> _Layout:
    dist, h = r.u(3.5, 5.0), r.u(1.2, 1.8)
    main = _thing(r, 0.0, dist, h, r.u(0.8, 1.3))
    shapes = [main]
    top = main.centre[1] - main.half[1]
    if main.kind == "box" and r.chance(0.5):  # a sphere resting on the box
        rad = min(main.half[0], main.half[2]) * r.u(0.6, 0.9)
        shapes.append(Shape("sphere", (0.0, top - rad, dist), (rad,) * 3, _object_material(r), "sphere"))
        top -= 2 * rad
    side = max(main.half[0], main.half[2]) + r.u(0.25, 0.45)  # a thin square plinth: orbit's signature
    shapes.append(Shape("box", (0.0, h - 0.03, dist), (side, 0.04, side), _wall_material(r), "plinth"))
    cy = (h + top) / 2  # middle of the object's height; the camera looks at it
    for _ in range(r.count(0, 3)):  # far context, gives the orbit parallax
        shapes.append(_thing(r, r.sign() * r.u(4.0, 8.0), r.u(10.0, 15.0), h, r.u(0.6, 1.2)))
    ring = side + r.u(0.4, 0.8)
    angles = [r.u(-math.pi, 0.0) for _ in range(n)]  # on the camera's side of the object
    spots = [(ring * math.cos(a), dist + ring * math.sin(a)) for a in angles]
    base = pitch_c2w(-math.degrees(math.atan2(cy, dist)))
    return _Layout("centre_object", h, shapes, spots, 0.7, math.hypot(cy, dist), base)


def _look_up(r: _Draw, h: float, n: int) -> _Layout:
    dist, hw, top = r.u(3.5, 5.5), r.u(0.4, 0.65), r.u(10.0, 16.0)
    mat = _wall_material(r) if r.chance(0.5) else _object_material(r)
    mat.stripe_axis = 1  # horizontal bands show the tower's height
    x = r.u(-0.15, 0.15) * dist * _TAN
    tower = _wall(x - hw, x + hw, dist - hw, dist + hw, h, h + top, mat)
    tower.noun = "tower"
    shapes = [tower]
    for _ in range(r.count(1, 3)):  # low context beside the tower
        shapes.append(_thing(r, r.sign() * r.u(2.0, 4.0), r.u(4.0, 9.0), h, r.u(0.5, 1.0)))
    base = pitch_c2w(r.u(0.0, 8.0))
    spots = []
    for _ in range(n):  # in front of the tower and inside the first view, to one side
        z = dist - hw - r.u(0.5, 1.3)
        spots.append((x + r.sign() * r.u(0.35, 0.8) * z * _TAN, z))
    return _Layout("tower", h, shapes, spots, 0.7, dist, base)


def _look_down(r: _Draw, h: float, n: int) -> _Layout:
    h, pitch = r.u(2.5, 4.0), r.u(35.0, 45.0)
    centre_z = h / math.tan(math.radians(pitch))  # where the optical axis meets the ground
    shapes = [_thing(r, r.u(-1.2, 1.2) * centre_z * _TAN, centre_z * r.u(0.7, 1.4), h, r.u(0.4, 0.9))
              for _ in range(r.count(2, 5))]
    spots = [(r.u(-0.7, 0.7) * centre_z * _TAN, centre_z * r.u(0.75, 1.2)) for _ in range(n)]
    return _Layout("overhead", h, shapes, spots, 0.7, math.hypot(h, centre_z), pitch_c2w(-pitch))


def _stationary(r: _Draw, h: float, n: int) -> _Layout:
    dist = r.u(3.5, 6.0)
    wide = dist * _TAN * 2.0 + 2.0
    shapes = [_wall(-wide, wide, dist, dist + 0.3, h, dist * _TAN + h + r.u(1.0, 3.0), _wall_material(r))]
    for _ in range(r.count(0, 3)):  # static things against the wall
        shapes.append(_thing(r, r.u(-0.7, 0.7) * dist * _TAN, dist - 0.5, h, r.u(0.4, 0.8)))
    # At least two movers: they are the only motion of these clips.
    spots = [(r.u(-0.5, 0.5) * (dist - 1.5) * _TAN, r.u(2.0, dist - 1.0)) for _ in range(max(2, n))]
    return _Layout("frontal_wall", h, shapes, spots, 0.9, dist)


_LAYOUTS: dict[str, Callable[[_Draw, float, int], _Layout]] = {
    "zoom_in": _zoom_in, "zoom_out": _zoom_out, "turn_left": _turn(1.0), "turn_right": _turn(-1.0),
    "orbit": _orbit, "look_up": _look_up, "look_down": _look_down, "stationary": _stationary,
}


def sample_scene(motion: str, rng: np.random.Generator, static: bool = False) -> tuple[Scene, CameraPath]:
    """Draw a scene whose first frame shows the layout of ``motion`` (see the module docstring).

    Args:
        motion: one of :data:`d4d.geometry.motions.MOTIONS`.
        rng: the only source of randomness; the same generator state gives the same scene.
        static: no moving objects (the same objects are placed, standing still).

    Returns:
        ``(scene, path)``; ``path.c2w(T)`` and ``path.K(H, W)`` give the clip's cameras.
    """
    if motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}; expected one of {', '.join(MOTIONS)}")
    r = _Draw(rng)
    n_movers, h = r.count(1, 4), r.u(1.0, 1.5)
    lay = _LAYOUTS[motion](r, h, n_movers)
    spots = [_clear_spot(x, z, lay.shapes) for x, z in lay.spots]
    movers = _movers(r, spots, lay.h, lay.span, static)
    if motion == "look_up":  # floating "balloons" that rise with the view instead of leaving it at the bottom
        for s in movers:
            lift, rise, drift = r.u(0.6, 1.4), r.u(1.0, 1.8), r.u(-0.3, 0.3)
            s.centre = (s.centre[0], s.centre[1] - lift, s.centre[2])
            s.trajectory = None if static else Trajectory("linear", velocity=(drift, -rise, 0.0))
    magnitude = DEFAULT_MAGNITUDE[motion] * r.u(0.8, 1.2)
    scene = Scene(
        ground_y=lay.h, ground=_ground_material(r), shapes=lay.shapes + movers,
        sky_top=_shade((0.33, 0.53, 0.88), r.u(0.85, 1.1)),
        sky_horizon=_shade((0.78, 0.86, 0.95), r.u(0.9, 1.05)),
        light_dir=(r.u(-0.8, 0.8), -1.0, r.u(-0.9, -0.2)), ambient=r.u(0.35, 0.5), layout=lay.name,
    )
    return scene, CameraPath(motion, lay.base, magnitude, lay.depth)
