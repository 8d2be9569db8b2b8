"""Pose algebra, RealEstate10K camera files and intrinsics under resize / crop."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from d4d.geometry.cameras import (
    RealEstateCameras,
    crop_intrinsics,
    intrinsics_matrix,
    invert_se3,
    make_pose,
    normalized_to_pixel_intrinsics,
    opencv_to_opengl,
    opengl_to_opencv,
    pixel_centers,
    pixel_to_normalized_intrinsics,
    read_realestate_cameras,
    relative_poses,
    resize_and_center_crop,
    resize_intrinsics,
    rotation_vector,
)
from d4d.geometry.points import project_points

RE10K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "realestate10k"


def random_rotation(g: torch.Generator, n: int, dtype=torch.float64) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    q[torch.linalg.det(q) < 0, :, 0] *= -1
    return q.to(dtype)


def random_poses(g: torch.Generator, n: int, dtype=torch.float64, scale: float = 3.0) -> torch.Tensor:
    return make_pose(random_rotation(g, n, dtype), (torch.randn(n, 3, generator=g, dtype=torch.float64) * scale).to(dtype))


def rot_y(deg: float) -> torch.Tensor:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=torch.float64)


# ------------------------------------------------------------------------------------ poses

@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_invert_se3_round_trip(dtype, tol):
    g = torch.Generator().manual_seed(0)
    c2w = random_poses(g, 6, dtype).reshape(2, 3, 4, 4)
    w2c = invert_se3(c2w)
    eye = torch.eye(4, dtype=dtype).expand(2, 3, 4, 4)
    assert w2c.dtype == dtype and w2c.shape == (2, 3, 4, 4)
    assert torch.allclose(w2c @ c2w, eye, atol=tol)
    assert torch.allclose(invert_se3(w2c), c2w, atol=tol * 10)
    # A world point maps to the camera and back.
    p = torch.tensor([0.3, -1.2, 2.0, 1.0], dtype=dtype)[:, None]
    assert torch.allclose(c2w @ (w2c @ p), p.expand(2, 3, 4, 1), atol=tol * 10)


def test_invert_se3_hand_case():
    c2w = make_pose(rot_y(90.0), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    w2c = invert_se3(c2w)
    # The camera centre goes to the camera origin; a point one unit ahead (+z_cam) is world
    # (1 + 1, 2, 3) since +z_cam points along world +x after a 90-degree yaw.
    assert torch.allclose(w2c @ torch.tensor([1.0, 2.0, 3.0, 1.0], dtype=torch.float64), torch.tensor([0.0, 0, 0, 1], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(w2c @ torch.tensor([2.0, 2.0, 3.0, 1.0], dtype=torch.float64), torch.tensor([0.0, 0, 1, 1], dtype=torch.float64), atol=1e-12)


def test_rotation_vector_known_and_near_pi():
    vec = rotation_vector(rot_y(30.0))
    assert torch.allclose(vec, torch.tensor([0.0, math.radians(30.0), 0.0], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(rotation_vector(torch.eye(3, dtype=torch.float64)), torch.zeros(3, dtype=torch.float64))
    near_pi = rotation_vector(rot_y(179.9999))
    assert abs(abs(float(near_pi[1])) - math.radians(179.9999)) < 1e-6 and abs(float(near_pi[0])) < 1e-6


def test_opengl_to_opencv_hand_case_and_involution():
    # An OpenGL camera at (0, 0, 5) with identity rotation looks down world -z; the world origin
    # is 5 units in front of it. In OpenCV axes that point has camera z = +5 and projects to the
    # principal point.
    gl = make_pose(torch.eye(3, dtype=torch.float64), torch.tensor([0.0, 0.0, 5.0], dtype=torch.float64))
    cv = opengl_to_opencv(gl)
    assert torch.equal(cv[:3, 2], torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64))
    assert torch.equal(cv[:3, 1], torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64))
    assert torch.equal(cv[:3, 3], gl[:3, 3])
    K = intrinsics_matrix(100.0, 100.0, 32.0, 24.0).double()
    uv, z, valid = project_points(torch.zeros(1, 3, dtype=torch.float64), K, cv)
    assert torch.allclose(uv, torch.tensor([[32.0, 24.0]], dtype=torch.float64)) and float(z[0]) == pytest.approx(5.0)
    assert bool(valid[0])
    # A point above the origin (world +y is up in this OpenGL scene) appears above the centre: v < cy.
    uv_up, _, _ = project_points(torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64), K, cv)
    assert float(uv_up[0, 1]) < 24.0
    assert torch.equal(opencv_to_opengl(cv), gl)


def test_relative_poses_reference_scale_and_world_invariance():
    g = torch.Generator().manual_seed(1)
    c2w = random_poses(g, 5)
    rel = relative_poses(c2w, reference=2)
    assert torch.allclose(rel[2], torch.eye(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(rel[4], torch.linalg.inv(c2w[2]) @ c2w[4], atol=1e-12)
    world = random_poses(g, 1)[0]
    assert torch.allclose(relative_poses(world @ c2w, 2), rel, atol=1e-10)
    scaled = relative_poses(c2w, 2, translation_scale=3.0)
    assert torch.allclose(scaled[:, :3, :3], rel[:, :3, :3]) and torch.allclose(scaled[:, :3, 3], 3.0 * rel[:, :3, 3])
    # Per-batch reference (CamI2V's random conditioning frame).
    batch = torch.stack([c2w, c2w.flip(0)])
    out = relative_poses(batch, torch.tensor([0, 3]))
    assert torch.allclose(out[0, 0], torch.eye(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(out[1, 3], torch.eye(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(relative_poses(c2w)[0], torch.eye(4, dtype=torch.float64), atol=1e-12)


# ------------------------------------------------------------------------------- intrinsics

def test_normalized_pixel_intrinsics_hand_case():
    intr = torch.tensor([0.5, 0.8, 0.5, 0.5], dtype=torch.float64)
    K = normalized_to_pixel_intrinsics(intr, height=256, width=384)
    expected = torch.tensor([[192.0, 0, 192.0], [0, 204.8, 128.0], [0, 0, 1]], dtype=torch.float64)
    assert torch.allclose(K, expected)
    assert torch.allclose(pixel_to_normalized_intrinsics(K, 256, 384), intr)


def test_resize_changes_fx_fy_differently_and_crop_shifts_principal_point():
    K = intrinsics_matrix(100.0, 100.0, 64.0, 32.0).double()
    small = resize_intrinsics(K, (64, 128), (32, 32))  # x by 1/4, y by 1/2
    assert torch.allclose(small, torch.tensor([[25.0, 0, 16.0], [0, 50.0, 16.0], [0, 0, 1]], dtype=torch.float64))
    cropped = crop_intrinsics(K, top=10, left=20)
    assert torch.allclose(cropped, torch.tensor([[100.0, 0, 44.0], [0, 100.0, 22.0], [0, 0, 1]], dtype=torch.float64))


def test_pixel_centers_convention():
    grid = pixel_centers(2, 3)
    assert grid.shape == (2, 3, 2)
    assert grid[0, 0].tolist() == [0.5, 0.5] and grid[1, 2].tolist() == [2.5, 1.5]


def test_resize_and_center_crop_numbers():
    K = normalized_to_pixel_intrinsics(torch.tensor([0.5, 0.75, 0.5, 0.5], dtype=torch.float64), 256, 384)
    plan = resize_and_center_crop(K, (256, 384), (320, 512))
    # Cover: scale max(320/256, 512/384) = 4/3 -> 341.33 x 512, rounded to 341 x 512.
    assert plan.resize_hw == (341, 512) and plan.crop_box == (10, 0, 320, 512) and plan.out_hw == (320, 512)
    sy, sx = 341 / 256, 512 / 384
    assert plan.K[0, 0] == pytest.approx(192 * sx) and plan.K[1, 1] == pytest.approx(192 * sy)
    assert plan.K[0, 2] == pytest.approx(192 * sx) and plan.K[1, 2] == pytest.approx(128 * sy - 10)


def _linear_sample(image: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear sample of (C, H, W) at continuous coordinates (N, 2) (pixel centres at +0.5)."""
    x, y = uv[:, 0] - 0.5, uv[:, 1] - 0.5
    x0, y0 = x.floor().long(), y.floor().long()
    wx, wy = x - x0, y - y0
    def at(yy, xx):
        return image[:, yy, xx]
    top = at(y0, x0) * (1 - wx) + at(y0, x0 + 1) * wx
    bottom = at(y0 + 1, x0) * (1 - wx) + at(y0 + 1, x0 + 1) * wx
    return (top * (1 - wy) + bottom * wy).T


@pytest.mark.parametrize(
    "in_hw,out_hw,antialias",
    [((256, 384), (320, 512), False), ((480, 640), (224, 224), False), ((480, 640), (200, 300), True)],
)
def test_resize_and_center_crop_moves_projections_like_the_image(in_hw, out_hw, antialias):
    """Resize+crop an image whose pixels hold their own continuous coordinates; a 3D point's new
    projection (new K) must land where the resized image shows its old projection (old K)."""
    g = torch.Generator().manual_seed(2)
    K = normalized_to_pixel_intrinsics(torch.tensor([0.6, 0.8, 0.52, 0.47], dtype=torch.float64), *in_hw)
    plan = resize_and_center_crop(K, in_hw, out_hw)
    coords = pixel_centers(*in_hw, dtype=torch.float64).permute(2, 0, 1)  # (2, H, W): x, y
    resized = plan.apply(coords, antialias=antialias)
    assert resized.shape == (2, *out_hw)
    points = torch.cat([torch.rand(200, 2, generator=g, dtype=torch.float64) - 0.5, torch.ones(200, 1, dtype=torch.float64)], 1)
    points = points * (1 + 4 * torch.rand(200, 1, generator=g, dtype=torch.float64))
    uv_old, _, _ = project_points(points, K)
    uv_new, _, valid = project_points(points, plan.K, image_hw=out_hw)
    border = 4.0  # interpolate clamps (and antialias renormalises) near the border
    inside = valid & (uv_new[:, 0] > border) & (uv_new[:, 0] < out_hw[1] - border)
    inside &= (uv_new[:, 1] > border) & (uv_new[:, 1] < out_hw[0] - border)
    assert inside.sum() > 50
    seen = _linear_sample(resized, uv_new[inside])
    # Plain bilinear is exact on a linear image. The antialiasing filter, sampled at pixel
    # centres, is not exactly symmetric about each output centre: a few hundredths of a pixel,
    # against the >= 0.5 px a half-pixel convention error would show.
    assert torch.allclose(seen, uv_old[inside], atol=0.1 if antialias else 1e-6)
    if antialias:
        assert float((seen - uv_old[inside]).mean(0).abs().max()) < 0.02


def test_resize_and_center_crop_blob_centroid():
    """A Gaussian blob drawn at a 3D point's projection stays centred on the projection."""
    in_hw, out_hw = (240, 320), (128, 128)
    K = normalized_to_pixel_intrinsics(torch.tensor([0.7, 0.9, 0.5, 0.5], dtype=torch.float64), *in_hw)
    point = torch.tensor([[0.31, -0.12, 2.0]], dtype=torch.float64)
    uv_old, _, _ = project_points(point, K)
    grid = pixel_centers(*in_hw, dtype=torch.float64)
    blob = torch.exp(-((grid - uv_old[0]) ** 2).sum(-1) / (2 * 6.0**2))[None]
    plan = resize_and_center_crop(K, in_hw, out_hw)
    out = plan.apply(blob, antialias=True)[0]
    uv_new, _, _ = project_points(point, plan.K)
    centres = pixel_centers(*out_hw, dtype=torch.float64)
    centroid = (centres * out[..., None]).sum((0, 1)) / out.sum()
    assert torch.allclose(centroid, uv_new[0], atol=0.05)


# --------------------------------------------------------------------------- camera files

def _row(stamp, intr, w2c):
    return " ".join([str(stamp)] + [f"{x:.9f}" for x in [*intr, 0.0, 0.0, *w2c[:3].reshape(-1).tolist()]])


def test_write_read_round_trip(tmp_path):
    g = torch.Generator().manual_seed(3)
    n = 4
    w2c = random_poses(g, n)
    cams = RealEstateCameras(
        url="https://www.youtube.com/watch?v=abc",
        timestamps_us=torch.tensor([0, 33366, 66733, 100100], dtype=torch.int64),
        intrinsics=torch.rand(n, 4, generator=g, dtype=torch.float64),
        w2c=w2c,
        c2w=invert_se3(w2c),
    )
    from d4d.geometry.cameras import write_realestate_cameras

    path = tmp_path / "clip.txt"
    write_realestate_cameras(path, cams)
    back = read_realestate_cameras(path)
    assert back.url == cams.url and torch.equal(back.timestamps_us, cams.timestamps_us)
    assert back.timestamps_us.dtype == torch.int64 and back.intrinsics.shape == (n, 4)
    assert torch.allclose(back.intrinsics, cams.intrinsics, atol=5e-10, rtol=0)
    assert torch.allclose(back.w2c, cams.w2c, atol=5e-10, rtol=0)
    assert torch.allclose(back.c2w @ back.w2c, torch.eye(4, dtype=torch.float64).expand(n, 4, 4), atol=1e-12)
    # Writing what was read reproduces the text exactly.
    again = tmp_path / "again.txt"
    write_realestate_cameras(again, back)
    assert again.read_text() == path.read_text()
    assert back.K(256, 384).shape == (n, 3, 3)


@pytest.mark.parametrize(
    "lines,lineno,fragment",
    [
        (["https://x", "1 0.5 0.5 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1", "2 0.5"], 2, "expected 19 numbers"),
        (["https://x", "1 " + " ".join(["0.5"] * 18), "abc " + " ".join(["0.5"] * 18)], 3, "not an integer"),
        (["https://x", "1 " + " ".join(["0.5"] * 17) + " nope"], 2, "non-numeric"),
        (["https://x", "1 " + " ".join(["0.5"] * 17) + " nan"], 2, "non-finite"),
        (["1 " + " ".join(["0.5"] * 18)], 1, "URL"),
        ([""], 1, "URL"),
        (["https://x"], 2, "no camera rows"),
    ],
)
def test_read_reports_file_and_line(tmp_path, lines, lineno, fragment):
    path = tmp_path / "bad.txt"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as info:
        read_realestate_cameras(path)
    message = str(info.value)
    assert f"{path}:{lineno}:" in message and fragment in message and "\n" not in message


def test_read_hand_row(tmp_path):
    w2c = make_pose(rot_y(90.0), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    path = tmp_path / "one.txt"
    path.write_text("https://x\n" + _row(123, [0.5, 0.8, 0.5, 0.5], w2c) + "\n")
    cams = read_realestate_cameras(path)
    assert cams.timestamps_us.tolist() == [123] and len(cams) == 1
    assert torch.allclose(cams.w2c[0], w2c, atol=1e-9)
    # Camera centre = -R^T t.
    centre = -rot_y(90.0).T @ torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert torch.allclose(cams.c2w[0, :3, 3], centre, atol=1e-8)


@pytest.mark.needs_shared
def test_real_camera_files_parse_and_rewrite_identically(tmp_path):
    if not RE10K.is_dir():
        pytest.skip(f"shared RealEstate10K sample not found at {RE10K}")
    from d4d.geometry.cameras import write_realestate_cameras

    files = sorted((RE10K / "pose_files").glob("*.txt"))
    assert len(files) == 7
    for path in files:
        cams = read_realestate_cameras(path)
        assert len(cams) == 16 and cams.url.startswith("https://www.youtube.com/")
        assert bool((cams.timestamps_us.diff() > 0).all())
        assert bool(((cams.intrinsics > 0.3) & (cams.intrinsics < 1.0)).all())
        rot = cams.c2w[:, :3, :3]
        assert torch.allclose(rot.transpose(-1, -2) @ rot, torch.eye(3, dtype=torch.float64).expand(16, 3, 3), atol=1e-6)
        out = tmp_path / path.name
        write_realestate_cameras(out, cams)
        assert out.read_text().split() == path.read_text().split()
