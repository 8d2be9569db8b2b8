"""Camera-path resolution (motion names, aliases, RealEstate10K and JSON files) and output writing."""
from __future__ import annotations

import json

import pytest
import torch

from d4d.data.video import decode_mp4
from d4d.geometry.cameras import read_realestate_cameras
from d4d.geometry.motions import motion_path
from d4d.utils.errors import UserError
from d4d.video.interface import CameraPath, VideoResult
from d4d.video.io import write_camera_json, write_video_outputs
from d4d.video.paths import default_intrinsics, resolve_camera_path


def test_motion_names_and_aliases_resolve_to_the_analytic_paths():
    path = resolve_camera_path("turn_left", 9, 48, 64)
    assert torch.allclose(path.c2w, motion_path("turn_left", 9))
    assert path.K[0, 2] == 32 and path.K[1, 2] == 24 and path.label == "turn_left"
    left = resolve_camera_path("orbit left", 9, 48, 64)
    assert torch.allclose(left.c2w, motion_path("orbit", 9, magnitude=-30.0))
    assert torch.allclose(resolve_camera_path("move-forward", 5, 48, 64).c2w, motion_path("zoom_in", 5))
    # 60 degrees horizontal: f = W / (2 tan 30)
    assert default_intrinsics(48, 64)[0, 0] == pytest.approx(64 / (2 * 0.5773502691896257))


@pytest.mark.parametrize("spec, match", [("spin", "unknown motion 'spin'"), ("roll", "no equivalent"),
                                         ("missing.txt", "camera file not found")])
def test_bad_specs_are_user_errors(spec, match):
    with pytest.raises(UserError, match=match):
        resolve_camera_path(spec, 5, 32, 32)


def test_realestate_file_with_stride(re10k_dir):
    camera_file = sorted(re10k_dir.rglob("*.txt"))[0]
    cams = read_realestate_cameras(camera_file)
    path = resolve_camera_path(str(camera_file), 5, 64, 96, stride=2)
    expected = torch.linalg.inv(cams.c2w[0]) @ cams.c2w[8]
    assert torch.allclose(path.c2w[4].double(), expected, atol=1e-5)
    assert torch.allclose(path.c2w[0], torch.eye(4), atol=1e-6)
    assert path.K[0, 0] == pytest.approx(float(cams.intrinsics[0, 0]) * 96, rel=1e-5)
    with pytest.raises(UserError, match="rows give only"):
        resolve_camera_path(str(camera_file), 10_000, 64, 96, stride=2)


def test_outputs_round_trip(tmp_path):
    camera = resolve_camera_path("orbit", 5, 32, 48)
    frames = torch.rand(5, 3, 32, 48)
    paths = write_video_outputs(VideoResult(frames, camera, {"stage": "dynamic"}), tmp_path / "out")
    assert decode_mp4(paths["video"].read_bytes()).shape == (5, 32, 48, 3)
    assert len(list(paths["frames"].glob("*.png"))) == 5
    back = read_realestate_cameras(paths["cameras_txt"])
    assert torch.allclose(back.c2w.float(), camera.c2w, atol=1e-6)
    assert torch.allclose(back.K(32, 48)[0].float(), camera.K, atol=1e-4)
    again = resolve_camera_path(str(paths["cameras_json"]), 5, 64, 96)  # JSON back, at twice the size
    assert torch.allclose(again.c2w, camera.c2w, atol=1e-6) and torch.allclose(again.K[:2], 2 * camera.K[:2])
    assert json.loads(paths["info"].read_text())["stage"] == "dynamic" and paths["preview"].stat().st_size > 0
    write_camera_json(tmp_path / "short.json", CameraPath(camera.c2w[:2], camera.K, 32, 48))
    with pytest.raises(UserError, match="2 cameras, 5 requested"):
        resolve_camera_path(str(tmp_path / "short.json"), 5, 32, 48)
