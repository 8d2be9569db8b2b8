"""The eight motion paths, the preset-name table and classify_motion (synthetic and real clips)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from d4d.geometry.cameras import make_pose, read_realestate_cameras
from d4d.geometry.motions import (
    ACCEPTED_MOTION_NAMES,
    DEFAULT_MAGNITUDE,
    MOTION_ALIASES,
    MOTIONS,
    classify_motion,
    motion_path,
    named_motion_path,
    resolve_motion,
)

RE10K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "realestate10k"

# The preset names exactly as the two systems spell them.
CAMI2V_PRESETS = (
    "zoom in", "zoom out", "pan up", "pan down", "pan left", "pan right", "look up", "look down",
    "look left", "look right", "orbit up", "orbit left", "orbit right", "rotate clockwise",
    "rotate anti-clockwise", "rotate anticlockwise", "stationary",
)
SEVA_PRESETS = (
    "orbit", "spiral", "lemniscate", "zoom-in", "zoom-out", "dolly zoom-in", "dolly zoom-out",
    "move-forward", "move-backward", "move-up", "move-down", "move-left", "move-right", "roll",
)
EXPECTED = {
    "zoom in": ("zoom_in", 1.0), "zoom out": ("zoom_out", 1.0), "look up": ("look_up", 1.0),
    "look down": ("look_down", 1.0), "look left": ("turn_left", 1.0), "look right": ("turn_right", 1.0),
    "orbit left": ("orbit", -1.0), "orbit right": ("orbit", 1.0), "stationary": ("stationary", 1.0),
    "orbit": ("orbit", 1.0), "zoom-in": ("zoom_in", 1.0), "zoom-out": ("zoom_out", 1.0),
    "move-forward": ("zoom_in", 1.0), "move-backward": ("zoom_out", 1.0),
}
UNSUPPORTED = set(CAMI2V_PRESETS + SEVA_PRESETS) - set(EXPECTED)


def rot(axis: int, deg: float) -> torch.Tensor:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    out = torch.eye(3, dtype=torch.float64)
    out[i, i], out[i, j], out[j, i], out[j, j] = c, -s, s, c
    return out


def small_rotation(g: torch.Generator, deg: float) -> torch.Tensor:
    v = torch.randn(3, generator=g, dtype=torch.float64) * math.radians(deg)
    x, y, z = v.tolist()
    return torch.linalg.matrix_exp(torch.tensor([[0, -z, y], [z, 0, -x], [-y, x, 0]], dtype=torch.float64))


# ------------------------------------------------------------------------------ motion_path

@pytest.mark.parametrize("name", MOTIONS)
def test_every_path_starts_at_identity_and_is_rigid(name):
    path = motion_path(name, 9, scene_depth=2.0, dtype=torch.float64)
    assert path.shape == (9, 4, 4)
    assert torch.allclose(path[0], torch.eye(4, dtype=torch.float64), atol=1e-12)
    r = path[:, :3, :3]
    assert torch.allclose(r.transpose(-1, -2) @ r, torch.eye(3, dtype=torch.float64).expand(9, 3, 3), atol=1e-12)


@pytest.mark.parametrize(
    "name,axis,deg",
    [("turn_right", 1, 30.0), ("turn_left", 1, -30.0), ("look_up", 0, 20.0), ("look_down", 0, -20.0)],
)
def test_rotation_paths_end_rotated_in_place(name, axis, deg):
    end = motion_path(name, 16, dtype=torch.float64)[-1]
    assert torch.allclose(end[:3, :3], rot(axis, deg), atol=1e-12)
    assert torch.equal(end[:3, 3], torch.zeros(3, dtype=torch.float64))
    forward = end[:3, 2]
    if name == "turn_right":
        assert forward[0] > 0.49  # the view turns towards +x (right)
    if name == "look_up":
        assert forward[1] < -0.34  # towards -y, which is up in OpenCV axes


@pytest.mark.parametrize("name,sign", [("zoom_in", 1.0), ("zoom_out", -1.0)])
def test_zoom_paths_dolly_along_the_optical_axis(name, sign):
    end = motion_path(name, 5, scene_depth=2.5, dtype=torch.float64)[-1]
    assert torch.allclose(end[:3, :3], torch.eye(3, dtype=torch.float64))
    assert torch.allclose(end[:3, 3], torch.tensor([0.0, 0.0, sign * 0.4 * 2.5], dtype=torch.float64))


@pytest.mark.parametrize("magnitude", [30.0, -30.0])
def test_orbit_keeps_the_centre_on_every_optical_axis(magnitude):
    depth = 3.0
    path = motion_path("orbit", 12, magnitude, scene_depth=depth, dtype=torch.float64)
    centre = torch.tensor([0.0, 0.0, depth, 1.0], dtype=torch.float64)
    in_cam = torch.linalg.inv(path) @ centre
    assert torch.allclose(in_cam[:, :3], torch.tensor([0.0, 0.0, depth], dtype=torch.float64).expand(12, 3), atol=1e-12)
    end = path[-1]
    sign = math.copysign(1.0, magnitude)
    expected = torch.tensor([sign * depth * 0.5, 0.0, depth * (1 - math.cos(math.radians(30)))], dtype=torch.float64)
    assert torch.allclose(end[:3, 3], expected, atol=1e-12)  # positive magnitude: to the right
    assert torch.allclose(end[:3, :3], rot(1, -magnitude), atol=1e-12)


def test_stationary_is_identity():
    assert torch.equal(motion_path("stationary", 4), torch.eye(4).repeat(4, 1, 1))


# -------------------------------------------------------------------------- name mapping

def test_table_covers_both_systems_and_the_eight_labels():
    by_source = {}
    for alias in MOTION_ALIASES:
        by_source.setdefault(alias.source, set()).add(alias.name)
    assert by_source["cami2v"] == set(CAMI2V_PRESETS)
    assert by_source["seva"] == set(SEVA_PRESETS)
    assert by_source["dream4d"] == set(MOTIONS)
    for alias in MOTION_ALIASES:
        assert alias.motion is None or alias.motion in MOTIONS
        assert alias.sign in (1.0, -1.0)
        assert alias.motion is not None or alias.note  # every unsupported entry says why


@pytest.mark.parametrize("name", CAMI2V_PRESETS + SEVA_PRESETS + MOTIONS)
def test_every_preset_resolves_or_raises_clearly(name):
    if name in UNSUPPORTED:
        with pytest.raises(ValueError) as info:
            resolve_motion(name)
        message = str(info.value)
        assert repr(name) in message and "no equivalent" in message and "\n" not in message
        assert "zoom in" in message and "turn left" in message  # lists accepted names
    else:
        expected = EXPECTED.get(name, (name, 1.0))
        assert resolve_motion(name) == expected


@pytest.mark.parametrize("spelling", ["ZOOM_IN", "Zoom-In", "  zoom   in ", "zoom__in", "Move_Forward"])
def test_names_match_case_and_separator_insensitively(spelling):
    assert resolve_motion(spelling) == ("zoom_in", 1.0)


def test_unknown_name_lists_accepted():
    with pytest.raises(ValueError, match=r"unknown motion 'barrel roll'; accepted: .*orbit left"):
        resolve_motion("barrel roll")
    assert "pan left" not in ACCEPTED_MOTION_NAMES and "look left" in ACCEPTED_MOTION_NAMES


def test_named_paths_apply_the_sign():
    left = named_motion_path("orbit left", 8, dtype=torch.float64)
    assert torch.allclose(left, motion_path("orbit", 8, -DEFAULT_MAGNITUDE["orbit"], dtype=torch.float64))
    assert left[-1, 0, 3] < 0  # the camera went to its left
    assert torch.equal(named_motion_path("look right", 5), motion_path("turn_right", 5))


# ------------------------------------------------------------------------- classify_motion

def _noisy(path: torch.Tensor, g: torch.Generator, rot_deg: float, trans_sigma: float) -> torch.Tensor:
    out = path.clone()
    for i in range(1, out.shape[0]):
        out[i, :3, :3] = out[i, :3, :3] @ small_rotation(g, rot_deg)
        out[i, :3, 3] += torch.randn(3, generator=g, dtype=torch.float64) * trans_sigma
    return out


@pytest.mark.parametrize("name", MOTIONS)
@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_classify_round_trip_with_noise_scale_and_world_frame(name, scale):
    """Paths from motion_path, jittered (0.5 deg, 1% of the scene depth per frame), seen from a
    random world frame, with every translation multiplied by ``scale``, come back labelled."""
    g = torch.Generator().manual_seed(MOTIONS.index(name) * 10 + int(scale > 1))
    for num_frames, dtype in ((16, torch.float64), (25, torch.float32)):
        path = _noisy(motion_path(name, num_frames, scene_depth=2.0, dtype=torch.float64), g, 0.5, 0.02)
        world = make_pose(small_rotation(g, 60.0), torch.randn(3, generator=g, dtype=torch.float64) * 5)
        c2w = world @ path
        c2w[:, :3, 3] *= scale
        result = classify_motion(c2w.to(dtype))
        assert result.label == name, (num_frames, result.best, result.scores, result.features)
        assert not result.ambiguous and 0.3 < result.confidence <= 1.0
        assert set(result.scores) == set(MOTIONS) and all(0.0 <= v <= 1.0 for v in result.scores.values())


def test_classify_exact_paths_are_confident():
    for name in MOTIONS:
        result = classify_motion(motion_path(name, 16))
        assert result.label == name and result.confidence > 0.8, (name, result.scores)


def test_classify_is_scale_invariant():
    g = torch.Generator().manual_seed(5)
    # A forward walk that also turns right by 12 degrees, with jitter.
    num = 16
    s = torch.linspace(0, 1, num, dtype=torch.float64)
    path = torch.stack([make_pose(rot(1, 12.0 * float(t)), torch.tensor([0.1 * float(t), 0.0, float(t)], dtype=torch.float64)) for t in s])
    path = _noisy(path, g, 0.3, 0.01)
    ref = classify_motion(path)
    for factor in (1e-4, 0.37, 1e4):
        scaled = path.clone()
        scaled[:, :3, 3] *= factor
        out = classify_motion(scaled)
        assert out.label == ref.label and out.best == ref.best
        assert all(abs(out.scores[k] - ref.scores[k]) < 1e-9 for k in MOTIONS)


def test_classify_ambiguous_outcomes():
    # Sideways translation (CamI2V "pan left"): none of the eight fits.
    sideways = torch.eye(4, dtype=torch.float64).repeat(16, 1, 1)
    sideways[:, 0, 3] = -torch.linspace(0, 1, 16, dtype=torch.float64)
    result = classify_motion(sideways)
    assert result.label is None and result.ambiguous and max(result.scores.values()) < 0.1
    # A forward walk turning 17 degrees: zoom_in and turn_right fit alike.
    s = torch.linspace(0, 1, 16, dtype=torch.float64)
    walk = torch.stack([make_pose(rot(1, 17.0 * float(t)), torch.tensor([0.0, 0.0, float(t)], dtype=torch.float64)) for t in s])
    result = classify_motion(walk)
    assert result.label is None and result.ambiguous
    ranked = sorted(result.scores, key=result.scores.get, reverse=True)
    assert set(ranked[:2]) == {"zoom_in", "turn_right"} and result.confidence < 0.2


def test_classify_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        classify_motion(torch.eye(4))
    bad = torch.eye(4).repeat(3, 1, 1)
    bad[1, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        classify_motion(bad)


@pytest.mark.needs_shared
def test_real_realestate10k_clips_get_labels():
    if not RE10K.is_dir():
        pytest.skip(f"shared RealEstate10K sample not found at {RE10K}")
    files = sorted((RE10K / "pose_files").glob("*.txt"))
    assert len(files) == 7
    labels = {}
    for path in files:
        result = classify_motion(read_realestate_cameras(path).c2w)
        assert result.label is None or result.label in MOTIONS
        assert math.isfinite(result.confidence) and 0.0 <= result.confidence <= 1.0
        assert result.ambiguous == (result.label is None)
        labels[path.stem] = result.label
    print("RealEstate10K labels:", labels)
    # Clips whose motion is unmistakable on inspection of their poses: a 1.4-unit walk backwards
    # with < 6 degrees of rotation, and a 31-degree right turn.
    assert labels["0f47577ab3441480"] == "zoom_out"
    assert labels["2c80f9eb0d3b2bb4"] == "turn_right"
    assert sum(label is not None for label in labels.values()) >= 5
