"""Procedural scenes (d4d.data.procedural*) and the synthetic dataset CLI (data_prep.synthetic)."""
from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from d4d.data.procedural import (
    FAR, Material, Scene, Shape, Trajectory, caption, intrinsics, pitch_c2w, render, render_clip,
    sample_scene,
)
from d4d.geometry.motions import MOTIONS, motion_path

ROOT = Path(__file__).resolve().parents[1]
GREY = Material((0.5, 0.5, 0.5), (0.2, 0.2, 0.2), "checker", 1.0)


def _poses(*mats) -> torch.Tensor:
    return torch.tensor(mats, dtype=torch.float32)


# --------------------------------------------------------------------------------- ray casting
def test_ground_plane_depth_is_analytic():
    """Level and pitched cameras over a ground plane 1.5 m below: z-depth = h / (world y of the ray)."""
    H, W, h = 48, 64, 1.5  # non-square, so that a swapped H/W or cx/cy shows
    K = intrinsics(H, W)
    fx, cx, cy = K[0, 0].item(), K[0, 2].item(), K[1, 2].item()
    c2w = _poses(pitch_c2w(0.0), pitch_c2w(-20.0))
    rgb, depth, mask = render(Scene(h, GREY, []), c2w, K, H, W, torch.zeros(2))
    assert rgb.shape == (2, H, W, 3) and rgb.dtype == torch.uint8 and depth.dtype == torch.float32
    assert not mask.any()
    # A hand-picked pixel of the level camera: the ray through (u + 0.5, v + 0.5) meets y = h at
    # z = h fy / (v + 0.5 - cy).
    assert depth[0, 40, 10].item() == pytest.approx(h * fx / (40.5 - cy), rel=1e-5)
    assert depth[0, 40, 10].item() == pytest.approx(1.5 * 55.4256 / 16.5, rel=1e-4)
    assert (depth[0, : int(cy)] == 0).all()  # above the horizon: sky, depth 0
    # Every pixel of the camera pitched down 20 deg: world y of the ray = cos(a) y_cam + sin(a).
    v, u = np.mgrid[0:H, 0:W] + 0.5
    a = math.radians(20.0)
    dy = math.cos(a) * (v - cy) / fx + math.sin(a)
    expected = np.where(dy > 0, h / np.where(dy > 0, dy, 1.0), 0.0)
    expected[expected > FAR] = 0.0
    np.testing.assert_allclose(depth[1].numpy(), expected, rtol=1e-4, atol=1e-5)
    # (3, 3) and (T, 3, 3) intrinsics give the same image.
    rgb2, depth2, _ = render(Scene(h, GREY, []), c2w, K.expand(2, 3, 3), H, W, torch.zeros(2))
    assert torch.equal(rgb, rgb2) and torch.equal(depth, depth2)


def test_box_face_and_sphere_depth_are_analytic():
    H = W = 64
    K = intrinsics(H, W)
    f, c = K[0, 0].item(), K[0, 2].item()
    box = Shape("box", (0.0, 0.0, 3.5), (0.6, 0.4, 0.5), GREY, "box")  # front face at z = 3
    sphere = Shape("sphere", (0.0, 0.0, 3.0), (0.5, 0.5, 0.5), GREY, "sphere")
    _, d_box, _ = render(Scene(100.0, GREY, [box]), _poses(pitch_c2w(0)), K, H, W)
    _, d_sph, _ = render(Scene(100.0, GREY, [sphere]), _poses(pitch_c2w(0)), K, H, W)
    x = (np.arange(W) + 0.5 - c) / f  # ray slope per column (= per row: square pixels, centred)
    inside = (np.abs(x[None, :] * 3.0) < 0.6) & (np.abs(x[:, None] * 3.0) < 0.4)
    assert inside.sum() > 100
    np.testing.assert_allclose(d_box[0].numpy()[inside], 3.0, rtol=1e-6)
    assert (d_box[0].numpy()[~inside] == 0).all()
    # Sphere: smallest t with |t (x, y, 1) - (0, 0, 3)|^2 = r^2, at pixel (v, u) = (27, 35), off-centre.
    xs, ys = x[35], x[27]
    a, b, cc = xs * xs + ys * ys + 1, -2 * 3.0, 9.0 - 0.25
    t = (-b - math.sqrt(b * b - 4 * a * cc)) / (2 * a)
    assert d_sph[0, 27, 35].item() == pytest.approx(t, rel=1e-5)
    assert d_sph[0, 0, 0].item() == 0.0


def _reproject(depth_a, c2w_a, c2w_b, K):
    """Pixels of frame a with depth -> (valid mask in a, continuous pixel coordinates (u, v) in b, z in b)."""
    H, W = depth_a.shape
    v, u = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    valid = depth_a > 0
    pix = torch.stack([u[valid], v[valid], torch.ones_like(u[valid])], -1).double()
    cam = (pix @ torch.linalg.inv(K.double()).T) * depth_a[valid].double()[:, None]
    world = cam @ c2w_a[:3, :3].double().T + c2w_a[:3, 3].double()
    w2c_b = torch.linalg.inv(c2w_b.double())
    cam_b = world @ w2c_b[:3, :3].T + w2c_b[:3, 3]
    proj = cam_b @ K.double().T
    return valid, proj[:, :2] / proj[:, 2:], cam_b[:, 2]


@pytest.mark.parametrize("motion", MOTIONS)
def test_static_geometry_reprojects_between_frames(motion):
    """Depth of frame 0 back-projected with (K, c2w_0) and projected with the c2w of a later frame lands
    between pixels of that frame whose depths bracket it and whose colours match, wherever it is not
    occluded; a pose 3 degrees off does not."""
    H = W = 64
    scene, path = sample_scene(motion, np.random.default_rng(11), static=True)
    c2w, K = path.c2w(5), path.K(H, W)
    rgb, depth, _ = render(scene, c2w, K, H, W)
    b = 2  # half-way: most of frame 0 is still in view

    def agreement(c2w_b):
        valid, uv, z = _reproject(depth[0], c2w[0], c2w_b, K)
        # The four pixel centres around the projection (centres at i + 0.5): on a continuous surface the
        # projected depth lies between theirs, whatever the depth gradient (grazing ground, far walls).
        i0 = torch.floor(uv - 0.5).long()
        inside = (z > 0.1) & (i0 >= 0).all(-1) & (i0[:, 0] < W - 1) & (i0[:, 1] < H - 1)
        i0 = i0[inside]
        around = torch.stack([depth[b][i0[:, 1] + dv, i0[:, 0] + du] for dv in (0, 1) for du in (0, 1)], -1)
        around = around.double()
        lo, hi = around.min(-1).values, around.max(-1).values
        zi = z[inside]
        ok = (lo > 0) & (zi > lo * 0.99) & (zi < hi * 1.01)
        near = torch.round(uv[inside] - 0.5).long()
        colour = (rgb[0][valid][inside][ok].float() - rgb[b][near[ok, 1], near[ok, 0]].float()).abs()
        return inside.float().mean().item(), ok.float().mean().item(), colour

    seen, frac, colour = agreement(c2w[b])
    assert seen > 0.15, f"only {seen:.0%} of frame 0 is in view"
    # Not all: an orbit uncovers and hides a part of the object and the ground behind it.
    assert frac > 0.8, f"{motion}: only {frac:.0%} of the reprojected pixels agree in depth"
    # Textures are filtered by the pixel footprint, so colours differ a little with distance.
    assert colour.mean().item() < 12.0, f"{motion}: colours differ by {colour.mean().item():.1f} on average"
    # The same pose turned by 3 degrees about x and about y (either alone leaves walls or ground agreeing).
    c, s = math.cos(math.radians(3.0)), math.sin(math.radians(3.0))
    yaw = torch.tensor([[c, 0, s, 0], [0, 1, 0, 0], [-s, 0, c, 0], [0, 0, 0, 1]])
    _, frac_wrong, _ = agreement(c2w[b] @ torch.tensor(pitch_c2w(3.0)) @ yaw)
    assert frac_wrong < frac - 0.25, f"{motion}: a wrong pose agrees as well ({frac_wrong:.0%} vs {frac:.0%})"


def test_moving_objects_move_and_static_scenes_do_not():
    H = W = 48
    for i, motion in enumerate(MOTIONS):
        clip = render_clip(motion, np.random.default_rng(100 + i), 6, H)
        assert clip.scene.dynamic
        assert clip.mask.any(axis=(1, 2)).all(), f"{motion}: a moving object is out of view in some frame"
        assert (clip.mask[0] != clip.mask[-1]).sum() >= 3, f"{motion}: the mask does not change over time"
        still = render_clip(motion, np.random.default_rng(100 + i), 6, H, static=True)
        assert not still.scene.dynamic and not still.mask.any()
        # The static option keeps the layout: same shapes, same places, no trajectories.
        assert [s.centre for s in still.scene.shapes] == [s.centre for s in clip.scene.shapes]
    # A stationary camera: every pixel that changes is a moving object in one of the two frames ...
    clip = render_clip("stationary", np.random.default_rng(7), 6, 64)
    changed = (clip.frames[0] != clip.frames[-1]).any(-1)
    assert changed.sum() > 20 and not (changed & ~clip.mask[0] & ~clip.mask[-1]).any()
    # ... and without moving objects nothing changes at all.
    still = render_clip("stationary", np.random.default_rng(7), 6, 64, static=True)
    assert (still.frames == still.frames[:1]).all()


def test_trajectories_offsets():
    t = torch.tensor([0.0, 0.5, 1.0])
    lin = Trajectory("linear", velocity=(1.0, 0.0, -2.0)).offset(t)
    torch.testing.assert_close(lin[2], torch.tensor([1.0, 0.0, -2.0]))
    circ = Trajectory("circular", radius=2.0, angle0=0.0, sweep=math.pi).offset(t)
    # Half a turn about the point (-2, 0, 0) relative to the start.
    expected = torch.tensor([[0.0, 0.0, 0.0], [-2.0, 0.0, 2.0], [-4.0, 0.0, 0.0]])
    torch.testing.assert_close(circ, expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- the layout rule
def _first_depth(motion: str, seed: int, size: int = 32) -> np.ndarray:
    scene, path = sample_scene(motion, np.random.default_rng(seed))
    return render(scene, path.c2w(1), path.K(size, size), size, size)[1][0].numpy()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_frame_layout_rule(seed):
    """The first-frame signature of each motion, in numbers (32 x 32 depth maps)."""
    d = {m: _first_depth(m, seed) for m in MOTIONS}
    sky = lambda x: (x == 0).mean()  # noqa: E731
    # zoom_in: far object at the centre, corridor walls close at both sides of the middle row.
    assert d["zoom_in"][14:18, 14:18].max() > 8 and d["zoom_in"][16, [0, -1]].max() < 4
    # zoom_out: a near object covers the centre and at least 30 % of the view.
    assert d["zoom_out"][16, 16] < 4.5 and ((d["zoom_out"] > 0) & (d["zoom_out"] < 4.5)).mean() > 0.3
    # turns: a near wall on one half of the upper image, sky or far things on the other.
    right, left = slice(20, 32), slice(0, 12)
    for motion, wall, open_ in (("turn_left", right, left), ("turn_right", left, right)):
        top = d[motion][:12]
        assert ((top[:, wall] > 0) & (top[:, wall] < 3.5)).mean() > 0.9, motion
        assert ((top[:, open_] > 0) & (top[:, open_] < 3.5)).mean() < 0.1, motion
    # orbit: the object at mid distance in the centre, sky above it.
    assert 2.5 < d["orbit"][16, 16] < 6.5 and sky(d["orbit"][0]) > 0.9
    # look_up: the tower passes the top edge in the middle third, sky beside it.
    assert (d["look_up"][0, 11:21] > 0).sum() >= 3 and sky(d["look_up"][0]) > 0.5
    # look_down: ground everywhere, no sky.
    assert sky(d["look_down"]) == 0
    # stationary: a frontal wall fills the top row at one depth.
    top = d["stationary"][0]
    assert (top > 0).all() and top.max() / top.min() < 1.3


def test_caption_describes_the_scene():
    scene, _ = sample_scene("stationary", np.random.default_rng(3))
    text = caption(scene)
    wall = next(s for s in scene.shapes if s.noun == "wall")
    assert f"in front of a {wall.material.words()} wall" in text
    for mover in [s for s in scene.shapes if s.moving][:2]:
        assert f"{mover.material.name} {mover.noun}" in text
    still, _ = sample_scene("stationary", np.random.default_rng(3), static=True)
    assert "moving" in text and "moving" not in caption(still)


# ------------------------------------------------------------------------------------ the CLI
ARGS = ["--clips", "16", "--val-clips", "8", "--test-clips", "8", "--frames", "4", "--size", "32",
        "--shard-size", "8", "--static-fraction", "0.25", "--heldout", "4"]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_cli_shards_are_deterministic_balanced_and_readable(tmp_path):
    import webdataset as wds

    from d4d.data.schema import ClipSample
    from d4d.data.video import decode_mp4
    from data_prep.synthetic import main

    manifest = main(ARGS + ["--out", str(tmp_path / "a")])
    # Same arguments in another process, with two rendering workers: byte-identical output.
    cmd = [sys.executable, "-m", "data_prep.synthetic", *ARGS, "--workers", "2", "--out", str(tmp_path / "b")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "clips/s" in proc.stderr
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert sorted(a) == sorted(b)
    differ = [k for k in a if a[k] != b[k] and k != "manifest.json"]
    assert not differ, f"not byte-identical across runs: {differ}"

    assert manifest["splits"]["train"]["shards"] == ["shard-000000.tar", "shard-000001.tar"]
    for split, n in (("train", 2), ("val", 1), ("test", 1)):
        assert manifest["splits"][split]["motions"] == {m: n for m in MOTIONS}
    assert 0 < manifest["splits"]["train"]["dynamic_clips"] < 16  # --static-fraction 0.25
    labels = json.loads((tmp_path / "a/heldout/labels.json").read_text())
    assert labels == {f"sample_{i}.jpg": MOTIONS[i] for i in range(4)}

    urls = [str(p) for p in sorted((tmp_path / "a/train").glob("*.tar"))]
    samples = []
    for raw in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        raw = dict(raw)
        raw["frames.mp4"] = decode_mp4(raw["frames.mp4"])
        for k in ("c2w.npy", "intrinsics.npy", "depth.npy", "mask.npy"):
            raw[k] = np.load(io.BytesIO(raw[k]))
        raw["meta.json"] = json.loads(raw["meta.json"])
        samples.append(ClipSample.from_raw(raw))
    assert [s.key for s in samples] == [f"train_{i:06d}" for i in range(16)]
    for i, s in enumerate(samples):
        assert s.frames.shape == (4, 32, 32, 3) and s.depth.shape == (4, 32, 32)
        assert s.motion == MOTIONS[i % 8] and s.meta["split"] == "train" and s.meta["fps"] == 8.0
        assert s.meta["metric_depth"] is True and s.meta["motion_confidence"] == 1.0 and s.caption
        # meta.json is enough to re-create the clip: same cameras, same depth, close colours.
        rng = np.random.default_rng(s.meta["scene_seed"])
        clip = render_clip(s.motion, rng, 4, 32, static=not s.meta["dynamic"])
        np.testing.assert_allclose(s.c2w.numpy(), clip.c2w, atol=1e-6)
        np.testing.assert_allclose(s.depth.numpy(), clip.depth, rtol=2e-3)
        assert np.array_equal(s.mask.numpy(), clip.mask) and s.mask.any() == s.meta["dynamic"]
        mse = ((s.frames.numpy().astype(float) - clip.frames) ** 2).mean()
        assert 10 * math.log10(255**2 / mse) > 22  # H.264 yuv420p of 32 px frames: 25-39 dB seen
        # Relative to frame 0 the cameras follow the labelled analytic path.
        rel = s.relative_c2w(0)
        path = motion_path(s.motion, 4, clip.path.magnitude, clip.path.scene_depth)
        torch.testing.assert_close(rel, path, atol=1e-4, rtol=0)


@pytest.mark.parametrize("bad", [["--frames", "0"], ["--size", "31"], ["--size", "8"], ["--clips", "0"],
                                 ["--static-fraction", "1.5"], ["--workers", "0"], ["--frames", "many"], []])
def test_cli_rejects_bad_arguments_in_one_line(bad, tmp_path, capsys):
    from data_prep.synthetic import main

    out = [] if not bad else ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exc:
        main(bad + out)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err, err
    assert not (tmp_path / "out").exists()


def test_cli_error_has_no_traceback(tmp_path):
    cmd = [sys.executable, "-m", "data_prep.synthetic", "--out", str(tmp_path), "--size", "31"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    expected = "--size must be even and >= 16 (H.264 needs even sizes), got 31"
    assert proc.stderr.strip().splitlines() == [f"python -m data_prep.synthetic: error: {expected}"]
