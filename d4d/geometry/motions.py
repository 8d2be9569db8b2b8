"""The eight canonical camera motions of Dream4D as analytic SE(3) paths.

Conventions (``../shared/docs/reference.md`` sections 1-2): OpenCV camera axes (x right, y down,
z forward); a path is ``c2w: (T, 4, 4)`` camera-to-world with frame 0 the identity, so the world
frame *is* the first camera's frame. Translations are in the units of ``scene_depth`` (metres for
synthetic data, arbitrary SfM units for RealEstate10K).

Also here: :data:`MOTION_ALIASES`, the one table from CamI2V / SEVA preset names to the eight
labels (:func:`resolve_motion`, :func:`named_motion_path`), and :func:`classify_motion`, which
labels any pose sequence (the inverse of :func:`motion_path`).
"""
from __future__ import annotations

import dataclasses
import math
import re

import torch

from d4d.geometry.cameras import relative_poses, rotation_vector

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

# The label of a path played backwards (an orbit reversed is an orbit the other way round).
REVERSED_MOTION: dict[str, str] = {
    "zoom_in": "zoom_out", "zoom_out": "zoom_in", "turn_left": "turn_right", "turn_right": "turn_left",
    "orbit": "orbit", "look_up": "look_down", "look_down": "look_up", "stationary": "stationary",
}

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


# ---------------------------------------------------------------------------------------------
# Preset names of other systems -> the eight motions
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MotionAlias:
    """One preset name of another system and what it means here.

    Attributes:
        name: the name as its source spells it.
        source: ``"dream4d"`` (our labels), ``"cami2v"`` (``demo/camera_poses.json``) or ``"seva"``
            (``get_preset_pose_fov`` options).
        motion: a label of :data:`MOTIONS`, or ``None`` when none of the eight is equivalent.
        sign: multiplies the magnitude passed to :func:`motion_path` (``-1``: reversed direction).
        note: why, for approximate and unsupported entries.
    """

    name: str
    source: str
    motion: str | None
    sign: float = 1.0
    note: str = ""


_FOCAL = "SEVA changes the focal length; the path here is the paper's zoom, a dolly along the optical axis"
_TRUCK = "a translation across the view; none of the eight moves the camera sideways or vertically"
_ROLL = "a roll about the optical axis; none of the eight rolls"

# The one mapping table. Lookup is case-insensitive with spaces, underscores and hyphens alike.
MOTION_ALIASES: tuple[MotionAlias, ...] = (
    *(MotionAlias(label, "dream4d", label) for label in MOTIONS),
    MotionAlias("zoom in", "cami2v", "zoom_in"),
    MotionAlias("zoom out", "cami2v", "zoom_out"),
    MotionAlias("look left", "cami2v", "turn_left"),
    MotionAlias("look right", "cami2v", "turn_right"),
    MotionAlias("look up", "cami2v", "look_up"),
    MotionAlias("look down", "cami2v", "look_down"),
    MotionAlias("orbit left", "cami2v", "orbit", -1.0, "the camera circles to its left"),
    MotionAlias("orbit right", "cami2v", "orbit", 1.0, "the camera circles to its right"),
    MotionAlias("orbit up", "cami2v", None, note="an orbit about a horizontal axis; ours circles about the vertical"),
    MotionAlias("pan left", "cami2v", None, note=_TRUCK),
    MotionAlias("pan right", "cami2v", None, note=_TRUCK),
    MotionAlias("pan up", "cami2v", None, note=_TRUCK),
    MotionAlias("pan down", "cami2v", None, note=_TRUCK),
    MotionAlias("rotate clockwise", "cami2v", None, note=_ROLL),
    MotionAlias("rotate anti-clockwise", "cami2v", None, note=_ROLL),
    MotionAlias("rotate anticlockwise", "cami2v", None, note=_ROLL),
    MotionAlias("stationary", "cami2v", "stationary"),
    MotionAlias("orbit", "seva", "orbit", 1.0, "SEVA circles 360 degrees to the right; magnitude sets the arc here"),
    MotionAlias("spiral", "seva", None, note="an orbit combined with vertical and radial motion"),
    MotionAlias("lemniscate", "seva", None, note="a figure-eight path across the view"),
    MotionAlias("zoom-in", "seva", "zoom_in", 1.0, _FOCAL),
    MotionAlias("zoom-out", "seva", "zoom_out", 1.0, _FOCAL),
    MotionAlias("dolly zoom-in", "seva", None, note="needs a focal-length change during the clip; the eight keep K fixed"),
    MotionAlias("dolly zoom-out", "seva", None, note="needs a focal-length change during the clip; the eight keep K fixed"),
    MotionAlias("move-forward", "seva", "zoom_in"),
    MotionAlias("move-backward", "seva", "zoom_out"),
    MotionAlias("move-up", "seva", None, note=_TRUCK),
    MotionAlias("move-down", "seva", None, note=_TRUCK),
    MotionAlias("move-left", "seva", None, note=_TRUCK),
    MotionAlias("move-right", "seva", None, note=_TRUCK),
    MotionAlias("roll", "seva", None, note=_ROLL),
)


def normalize_motion_name(name: str) -> str:
    """Lower-case, with runs of spaces, underscores and hyphens collapsed to one space."""
    return re.sub(r"[\s_\-]+", " ", name.strip().lower()).strip()


def _build_alias_index() -> dict[str, MotionAlias]:
    index: dict[str, MotionAlias] = {}
    for alias in MOTION_ALIASES:
        key = normalize_motion_name(alias.name)
        seen = index.get(key)
        if seen is not None and (seen.motion, seen.sign) != (alias.motion, alias.sign):
            raise AssertionError(f"motion aliases {seen.name!r} and {alias.name!r} disagree")
        index.setdefault(key, alias)
    return index


_ALIAS_INDEX = _build_alias_index()
ACCEPTED_MOTION_NAMES: tuple[str, ...] = tuple(sorted(k for k, a in _ALIAS_INDEX.items() if a.motion is not None))


def resolve_motion(name: str) -> tuple[str, float]:
    """Map a Dream4D, CamI2V or SEVA preset name to ``(label, sign)``.

    Returns:
        ``label`` in :data:`MOTIONS` and ``sign`` (+1 or -1) to multiply the magnitude with.

    Raises:
        ValueError: (one line) for names with no equivalent among the eight, saying why, and for
            unknown names; both list the accepted names.
    """
    alias = _ALIAS_INDEX.get(normalize_motion_name(name))
    accepted = ", ".join(ACCEPTED_MOTION_NAMES)
    if alias is None:
        raise ValueError(f"unknown motion {name!r}; accepted: {accepted}")
    if alias.motion is None:
        raise ValueError(
            f"motion {name!r} ({alias.source}) has no equivalent among the eight Dream4D motions "
            f"({alias.note}); accepted: {accepted}"
        )
    return alias.motion, alias.sign


def named_motion_path(
    name: str,
    num_frames: int,
    magnitude: float | None = None,
    scene_depth: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """:func:`motion_path` for any name :func:`resolve_motion` accepts (e.g. ``"orbit left"``).

    ``magnitude`` is unsigned intent (default :data:`DEFAULT_MAGNITUDE`); the alias' sign is
    applied to it. Returns ``c2w: (T, 4, 4)`` OpenCV camera-to-world, frame 0 the identity.
    """
    label, sign = resolve_motion(name)
    mag = DEFAULT_MAGNITUDE[label] if magnitude is None else float(magnitude)
    return motion_path(label, num_frames, sign * mag, scene_depth, dtype)


# ---------------------------------------------------------------------------------------------
# Labelling a pose sequence: the inverse of motion_path
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MotionClassifierConfig:
    """Thresholds of :func:`classify_motion`. Angles in degrees over the whole clip.

    Each label is a template; a clip's misfit to it is a sum of squared, scaled residuals and its
    score ``exp(-misfit / 2)``. Translation scale is unknowable (SfM), so translation enters only
    through scale-free numbers: its *presence* (how smooth, i.e. un-noise-like, the camera path is,
    0..1), its *direction*, and how well it fits an orbit. The defaults were chosen for
    RealEstate10K clips (walks through houses, 16 frames over a few seconds):

    * ``min_turn_deg = 10``: hand-held walks drift by a few degrees; 10 degrees over a clip is a
      deliberate pan/tilt (a sixth of a typical 60-degree field of view).
    * ``zoom_rotation_deg = 17`` against ``turn_translation = 1``: a walk that also turns is a
      zoom while its rotation stays below ~14 degrees and a turn beyond ~20 degrees (by then the
      image shift from rotation dominates the parallax of a walk), ambiguous in between.
    * ``zoom_direction_deg = 30``: forward walks in real houses drift sideways by 20-30 degrees.
    * ``orbit_like_translation = 0.5``: a turn that moves the camera across the view *against*
      the rotation (right while turning left) is an orbit, not a turn; mostly-sideways motion of
      that kind costs a turn more than the whole ``turn_translation`` allowance.
    """

    min_turn_deg: float = 10.0
    turn_softness_deg: float = 3.0
    off_axis_deg: float = 5.0
    off_axis_fraction: float = 0.3
    still_rotation_deg: float = 3.0
    still_translation: float = 0.4
    zoom_rotation_deg: float = 17.0
    zoom_direction_deg: float = 30.0
    presence: float = 0.3
    turn_translation: float = 1.0
    orbit_like_translation: float = 0.5
    orbit_residual: float = 0.15
    min_score: float = 0.1
    ambiguity_ratio: float = 0.75


@dataclasses.dataclass(frozen=True)
class MotionClassification:
    """Result of :func:`classify_motion`.

    Attributes:
        label: a label of :data:`MOTIONS`, or ``None`` when ambiguous.
        best: the best-scoring label (also when ambiguous).
        confidence: ``score[best] - score[runner-up]`` in [0, 1]: high when the best template
            fits well and the next does not.
        ambiguous: True when the best score is below ``min_score`` (nothing fits) or the runner-up
            reaches ``ambiguity_ratio`` times the best (two fit alike).
        scores: per-label template fit in [0, 1] (1 = perfect), for every label of :data:`MOTIONS`.
        features: the scale-free measurements the scores come from: ``yaw_deg``, ``pitch_deg``,
            ``roll_deg`` (largest excursion, camera axes), ``translation_presence`` (0..1),
            ``right_cos``, ``down_cos``, ``forward_cos`` (unit direction of travel in the first
            camera's axes) and ``orbit_residual`` (0 = exact orbit, 1 = no orbit).
    """

    label: str | None
    best: str
    confidence: float
    ambiguous: bool
    scores: dict[str, float]
    features: dict[str, float]


def _smooth(values: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Least-squares fit of ``(T, k)`` values by ``a s + b s^2`` (zero at s = 0, like a relative path)."""
    basis = torch.stack([s, s * s], -1) if s.numel() >= 3 else s[:, None]
    return basis @ (torch.linalg.pinv(basis) @ values)


def _largest_excursion(values: torch.Tensor) -> torch.Tensor:
    """Per column, the signed entry of ``(T, k)`` values with the largest magnitude."""
    index = values.abs().argmax(0, keepdim=True)
    return values.gather(0, index).squeeze(0)


def _path_features(c2w: torch.Tensor) -> dict[str, float]:
    eps = torch.finfo(c2w.dtype).eps if c2w.is_floating_point() else torch.finfo(torch.float32).eps
    poses = c2w.detach().to(device="cpu", dtype=torch.float64)
    num = poses.shape[0]
    rel = relative_poses(poses, 0)
    rot, pos = rel[:, :3, :3], rel[:, :3, 3]
    # Relative translations below the input's round-off (relative to the world coordinates, so
    # still scale-free) are treated as none: a pure turn in float32 must not gain a translation.
    floor = 64 * eps * float(poses[:, :3, 3].norm(dim=-1).max())
    if float(pos.norm(dim=-1).max()) <= floor:
        pos = torch.zeros_like(pos)
    s = torch.linspace(0.0, 1.0, num, dtype=torch.float64)

    # Rotation: frame-to-frame increments in the camera's own axes, accumulated (so a 360-degree
    # orbit reads 360, not 0), smoothed by a low-order fit over time (robust to per-frame jitter)
    # and summarised by its largest excursion: real clips often turn and partly turn back.
    if num > 1:
        steps = rotation_vector(rot[:-1].transpose(-1, -2) @ rot[1:])
        cumulative = torch.cat([torch.zeros(1, 3, dtype=torch.float64), steps.cumsum(0)])
        omega = _largest_excursion(_smooth(cumulative, s))
    else:
        omega = torch.zeros(3, dtype=torch.float64)
    pitch, yaw, roll = (math.degrees(float(x)) for x in omega)

    # Presence of translation: 1 - (noise variance from second differences) / (spread of the
    # path). A smooth path gives ~1 whatever its scale; pure jitter gives ~0.
    total = float((pos * pos).sum())
    if total == 0.0:
        presence = 0.0
    elif num < 3:
        presence = 1.0
    else:
        second = pos[2:] - 2 * pos[1:-1] + pos[:-2]
        noise = float((second * second).sum()) / 6.0 / (num - 2)
        spread = float(((pos - pos.mean(0)) ** 2).sum()) / (num - 1)
        presence = min(1.0, max(0.0, 1.0 - noise / spread)) if spread > 0 else 0.0

    velocity = _smooth(pos, s)[-1] if num > 1 else torch.zeros(3, dtype=torch.float64)
    speed = float(velocity.norm())
    direction = (velocity / speed).tolist() if speed > 0 else [0.0, 0.0, 0.0]

    # Orbit: the centre stays on every optical axis at the same distance D, i.e.
    # p_i = D (e_z - f_i) with f_i the forward axis; fit D >= 0 and measure the relative residual.
    offsets = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64) - rot[:, :, 2]
    g_energy = float((offsets * offsets).sum())
    residual = 1.0
    if g_energy > 1e-12 and total > 0:
        radius = float((pos * offsets).sum()) / g_energy
        if radius > 0:
            residual = float(((pos - radius * offsets) ** 2).sum()) / total
    return {
        "yaw_deg": yaw,
        "pitch_deg": pitch,
        "roll_deg": roll,
        "translation_presence": presence,
        "right_cos": direction[0],
        "down_cos": direction[1],
        "forward_cos": direction[2],
        "orbit_residual": min(1.0, residual),
    }


def _misfits(feat: dict[str, float], cfg: MotionClassifierConfig) -> dict[str, float]:
    yaw, pitch, roll = feat["yaw_deg"], feat["pitch_deg"], feat["roll_deg"]
    presence, fwd = feat["translation_presence"], feat["forward_cos"]
    rotation = math.sqrt(yaw * yaw + pitch * pitch + roll * roll)

    def sq(x: float, sigma: float) -> float:
        return (x / sigma) ** 2

    def turning(main: float, off: float) -> float:
        # A deliberate rotation about one axis: at least min_turn_deg, little about the others.
        shortfall = max(0.0, cfg.min_turn_deg - main)
        return sq(shortfall, cfg.turn_softness_deg) + sq(off, cfg.off_axis_deg + cfg.off_axis_fraction * abs(main))

    off_yaw, off_pitch = math.hypot(pitch, roll), math.hypot(yaw, roll)

    def rotating_only(orbit_like_cos: float) -> float:
        # Walking while turning is tolerated (scale unknown); moving across the view against the
        # rotation is what an orbit does, so it counts against a turn in place.
        orbit_like = presence * max(0.0, orbit_like_cos)
        return sq(presence, cfg.turn_translation) + sq(orbit_like, cfg.orbit_like_translation)

    right, down = feat["right_cos"], feat["down_cos"]
    angle_in = math.degrees(math.acos(max(-1.0, min(1.0, fwd))))
    moving = sq(1.0 - presence, cfg.presence)
    return {
        "zoom_in": sq(rotation, cfg.zoom_rotation_deg) + sq(angle_in, cfg.zoom_direction_deg) + moving,
        "zoom_out": sq(rotation, cfg.zoom_rotation_deg) + sq(180.0 - angle_in, cfg.zoom_direction_deg) + moving,
        "turn_left": turning(-yaw, off_yaw) + rotating_only(right),
        "turn_right": turning(yaw, off_yaw) + rotating_only(-right),
        "orbit": turning(abs(yaw), off_yaw) + moving + sq(feat["orbit_residual"], cfg.orbit_residual),
        "look_up": turning(pitch, off_pitch) + rotating_only(down),
        "look_down": turning(-pitch, off_pitch) + rotating_only(-down),
        "stationary": sq(rotation, cfg.still_rotation_deg) + sq(presence, cfg.still_translation),
    }


def classify_motion(c2w: torch.Tensor, config: MotionClassifierConfig | None = None) -> MotionClassification:
    """Label a camera path with one of the eight motions: the inverse of :func:`motion_path`.

    Args:
        c2w: ``(T, 4, 4)`` OpenCV camera-to-world in any world frame (poses are first made
            relative to frame 0) and any translation scale: multiplying every translation by
            ``s > 0`` gives the same result, because translation is only used through its
            presence, direction and orbit fit (see :class:`MotionClassifierConfig`).
        config: thresholds; the defaults suit RealEstate10K.

    Returns:
        :class:`MotionClassification`; ``label`` is ``None`` when ambiguous (``best`` still names
        the best template). Sign conventions follow :func:`motion_path`: yaw about +y is a right
        turn, pitch about +x looks up; an orbit in either direction is ``orbit``.
    """
    if c2w.ndim != 3 or c2w.shape[-2:] != (4, 4) or c2w.shape[0] < 1:
        raise ValueError(f"expected c2w of shape (T, 4, 4) with T >= 1, got {tuple(c2w.shape)}")
    if not torch.isfinite(c2w).all():
        raise ValueError("c2w contains non-finite values")
    cfg = config or MotionClassifierConfig()
    feat = _path_features(c2w)
    misfit = _misfits(feat, cfg)
    scores = {label: math.exp(-0.5 * misfit[label]) for label in MOTIONS}
    ranked = sorted(MOTIONS, key=lambda label: scores[label], reverse=True)
    first, second = scores[ranked[0]], scores[ranked[1]]
    ambiguous = first < cfg.min_score or second >= cfg.ambiguity_ratio * first
    return MotionClassification(
        label=None if ambiguous else ranked[0],
        best=ranked[0],
        confidence=max(0.0, min(1.0, first - second)),
        ambiguous=ambiguous,
        scores=scores,
        features=feat,
    )
