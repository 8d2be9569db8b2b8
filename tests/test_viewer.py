"""The 4D output layout and the viser viewer, driven in headless Chromium when it is installed."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

from d4d.utils.errors import UserError
from d4d.view_layout import frame_points, read_frames, read_ply, write_frame
from d4d.viewer import browser
from d4d.viewer.app import CURRENT, OTHER, FourDViewer
from d4d.viewer.sample import write_sample


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fourd") / "out"
    return write_sample(out, motion="orbit", num_frames=4, size=48, seed=1)


@pytest.fixture()
def viewer(sample_dir):
    v = FourDViewer(read_frames(sample_dir), port=browser.free_port())
    yield v
    v.stop()


def _random_frame(rng, h=6, w=8):
    depth = rng.uniform(1.0, 3.0, (h, w)).astype(np.float32)
    conf = rng.uniform(1.0, 5.0, (h, w)).astype(np.float32)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    angle = rng.uniform(-0.5, 0.5)
    c2w = np.eye(4)
    c2w[:3, :3] = [[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]]
    c2w[:3, 3] = rng.normal(size=3)
    K = np.array([[7.0, 0, w / 2], [0, 7.0, h / 2], [0, 0, 1]])
    return depth, conf, rgb, c2w, K


def test_layout_round_trip_and_points(tmp_path):
    rng = np.random.default_rng(0)
    written = [_random_frame(rng) for _ in range(3)]
    written[1][0][0, 0] = 0.0  # an invalid pixel (sky): no point
    for i, arrays in enumerate(written):
        write_frame(tmp_path, i, *arrays)
    frames = read_frames(tmp_path)
    assert [f.index for f in frames] == [0, 1, 2]
    for f, (depth, conf, rgb, c2w, K) in zip(frames, written):
        np.testing.assert_array_equal(f.depth, depth)
        np.testing.assert_array_equal(f.rgb, rgb)
        np.testing.assert_allclose(f.c2w, c2w)
        pts, colors, c = frame_points(f)
        valid = depth > 0
        assert len(pts) == valid.sum()
        assert np.array_equal(colors, rgb[valid]) and np.array_equal(c, conf[valid])
        cam = (pts - c2w[:3, 3]) @ c2w[:3, :3]  # world -> camera (R^T (p - t))
        np.testing.assert_allclose(cam[:, 2], depth[valid], rtol=1e-5)  # z-depth back
        uv = cam[:, :2] / cam[:, 2:] * K[0, 0] + K[:2, 2]  # projects to pixel centres
        v, u = np.nonzero(valid)
        np.testing.assert_allclose(uv, np.stack([u + 0.5, v + 0.5], 1), atol=1e-4)
        ply = read_ply(tmp_path / f"points/{f.index:04d}.ply")
        np.testing.assert_allclose(np.stack([ply["x"], ply["y"], ply["z"]], 1), pts, rtol=1e-6)
        np.testing.assert_array_equal(ply["red"], rgb[valid][:, 0])
    # A strided read is the full read subsampled at every other row and column.
    full, _, _ = frame_points(frames[0])
    half, _, _ = frame_points(frames[0], stride=2)
    np.testing.assert_allclose(half, full.reshape(6, 8, 3)[::2, ::2].reshape(-1, 3), atol=1e-5)


def test_layout_errors_name_the_problem(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(2):
        write_frame(tmp_path / "ok", i, *_random_frame(rng), points=False)

    def expect(path, needle):
        with pytest.raises(UserError, match=needle):
            read_frames(path)

    expect(tmp_path / "absent", "not a directory")
    (tmp_path / "empty").mkdir()
    expect(tmp_path / "empty", "missing depth/, confidence/, color/, camera/")
    (tmp_path / "ok" / "confidence" / "0001.npy").unlink()
    expect(tmp_path / "ok", r"confidence/0001.npy is missing")
    np.save(tmp_path / "ok" / "confidence" / "0001.npy", np.ones((3, 3), np.float32))
    expect(tmp_path / "ok", r"confidence/0001.npy: shape \(3, 3\) differs from depth \(6, 8\)")
    np.save(tmp_path / "ok" / "confidence" / "0001.npy", np.ones((6, 8), np.float32))
    np.savez(tmp_path / "ok" / "camera" / "0000.npz", pose=np.eye(4))
    expect(tmp_path / "ok", r"camera/0000.npz: needs arrays 'pose' and 'intrinsics'")


def test_view_cli_bad_folder_is_one_line(tmp_path, capsys):
    from d4d.view import main

    (tmp_path / "depth").mkdir()
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("d4d.view: error:") and "missing confidence/" in err[0]


def test_view_cli_bad_host_is_one_line(sample_dir, capsys):
    from d4d.view import main

    with pytest.raises(SystemExit) as exc:  # viser itself would retry 1000 ports and then hang
        main([str(sample_dir), "--host", "256.0.0.1"])
    assert exc.value.code == 2
    assert "--host 256.0.0.1: cannot listen" in capsys.readouterr().err.strip().splitlines()[-1]


def test_viewer_controls_drive_the_scene(viewer):
    frames = viewer.frames
    assert viewer.url.startswith("http://127.0.0.1:")
    viewer.frame_slider.value = 2  # runs the update callback, as a browser slider move does
    expected, colors, _ = frame_points(frames[2])
    np.testing.assert_allclose(viewer.points.points, expected, atol=1e-6)
    np.testing.assert_array_equal(viewer.points.colors, colors)
    assert [tuple(f.color) for f in viewer.frusta] == [OTHER, OTHER, CURRENT, OTHER]
    n_all = len(viewer.points.points)
    lo, hi = viewer.conf_range
    viewer.conf_slider.value = round(lo + 0.5 * (hi - lo), 6)
    kept, _, conf = frame_points(frames[2], float(viewer.conf_slider.value))
    assert 0 < len(viewer.points.points) == len(kept) < n_all and conf.min() >= viewer.conf_slider.value
    viewer.all_cameras.value = False
    assert [f.visible for f in viewer.frusta] == [False, False, True, False]
    # Play advances the frame slider from the serving loop.
    loop = threading.Thread(target=viewer.run, daemon=True)
    loop.start()
    viewer.fps.value = 50.0
    viewer.play.value = True
    deadline = time.time() + 10
    while viewer.current == 2 and time.time() < deadline:
        time.sleep(0.02)
    viewer.stop()
    loop.join(timeout=10)
    assert viewer.current != 2 and not loop.is_alive()


@pytest.mark.skipif(browser.chromium_path() is None,
                    reason="chromium not installed (apt-get install -y chromium)")
def test_viewer_in_headless_chromium(viewer, tmp_path):
    with browser.ViewerBrowser(viewer, size=(800, 600), settle_s=2.0) as chromium:
        # 1. The page loads: the GUI built by the server is on the page.
        text = chromium.text()
        for label in ("4 frames", "Frame", "Min confidence", "Point size", "All cameras", "frame 0000"):
            assert label in text, (label, text[:300])
        # 2. The screenshot is not blank: a good part of it is drawn, much of it in the points' colours.
        shot = np.asarray(Image.open(chromium.screenshot(tmp_path / "viewer.png")).convert("RGB"))
        assert (np.abs(shot.astype(int) - 255).max(-1) > 40).mean() > 0.05
        _, colors, _ = frame_points(viewer.frames[viewer.current])
        point_bins = set(map(tuple, colors // 32))
        in_points = np.array([tuple(b) in point_bins for b in shot.reshape(-1, 3) // 32])
        in_points &= shot.reshape(-1, 3).min(-1) < 200  # not the white background
        share = in_points.mean()
        assert share > 0.02, f"only {share:.1%} of the screenshot has the points' colours"
        # 3. The browser draws the points: its own render changes when the point cloud is hidden.
        with_points = chromium.client.get_render(240, 320, timeout=60)
        viewer.points.visible = False
        without = chromium.client.get_render(240, 320, timeout=60)
    changed = (np.abs(with_points.astype(int) - without.astype(int)).max(-1) > 30).mean()
    assert changed > 0.02, f"only {changed:.1%} of the rendered pixels come from the points"
