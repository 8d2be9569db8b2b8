"""The point renderer, the persistent 4D scene (Scene4D), its files and the per-scene optimisation."""
from __future__ import annotations

import numpy as np
import torch

from d4d.fourd.interface import Scene4D
from d4d.fourd.optimise import OptimConfig, _photo_loss, optimise_scene
from d4d.fourd.render import splat
from d4d.fourd.scene import PointScene4D, load_scene
from d4d.view_layout import read_frames, read_ply
from d4d.geometry.points import depth_to_points

K = torch.tensor([[16.0, 0, 8.0], [0, 16.0, 8.0], [0, 0, 1]])


def test_splat_puts_a_point_on_its_pixel_and_the_nearest_point_wins():
    pts = torch.tensor([[0.0625, 0.0625, 2.0], [0.125, 0.125, 4.0]])  # both on the centre of pixel (8, 8)
    col = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])
    rgb, depth, alpha = splat(pts, col, torch.full((2,), 0.1), torch.eye(4), K, 16, 16)
    assert rgb[:, 8, 8].argmax() == 0 and rgb[0, 8, 8] > 0.95  # red, in front, hides blue
    assert abs(float(depth[8, 8]) - 2.0) < 0.05
    assert alpha[8, 8] > 0.3 and alpha[0, 0] == 0


def test_splat_is_differentiable_in_positions_and_colours():
    pts = torch.tensor([[0.1, 0.0, 2.0]], requires_grad=True)
    col = torch.tensor([[0.5, 0.5, 0.5]], requires_grad=True)
    rgb, _, alpha = splat(pts, col, torch.full((1,), 0.05), torch.eye(4), K, 16, 16)
    ((rgb * alpha).sum() + alpha[8, 8]).backward()
    assert pts.grad.abs().sum() > 0 and col.grad.abs().sum() > 0


def _scene(frames=2):
    depth = torch.full((frames, 16, 16), 3.0)
    c2w = torch.eye(4).repeat(frames, 1, 1)
    c2w[:, 0, 3] = torch.linspace(0, 0.2, frames)
    pts, _ = depth_to_points(depth, K.expand(frames, 3, 3), c2w)
    torch.manual_seed(0)
    colours = torch.rand(frames, 3, 16, 16)
    return PointScene4D.from_point_maps(pts, colours, torch.ones(frames, 16, 16), c2w, K), colours


def test_scene_implements_the_contract_and_renders_its_frames():
    scene, colours = _scene()
    assert isinstance(scene, Scene4D)
    xyz, col, conf = scene.points_at(0.5)
    assert xyz.shape == (512, 3) and col.shape == (512, 3) and conf.shape == (512,)
    rgb, depth, alpha = scene.render(scene.cameras_c2w[0], K, 16, 16, 0.0)
    assert rgb.shape == (3, 16, 16) and alpha[4:12, 4:12].min() > 0.5
    assert abs(float(depth[4:12, 4:12].median()) - 3.0) < 0.05


def test_save_load_and_export_layout(tmp_path):
    scene, _ = _scene()
    with torch.no_grad():
        scene.pose_delta[1, 3] = 0.05
        scene.deform.out.bias.fill_(0.01)
    scene.save(tmp_path / "scene.pt")
    again = load_scene(tmp_path / "scene.pt")
    with torch.no_grad():
        assert torch.allclose(again.points_at(0.3)[0], scene.points_at(0.3)[0])
        assert torch.allclose(again.cameras_c2w, scene.cameras_c2w)
    scene.export_frames(tmp_path / "out")
    for i in range(2):
        name = f"{i:04d}"
        assert np.load(tmp_path / "out" / "depth" / f"{name}.npy").shape == (16, 16)
        assert np.load(tmp_path / "out" / "confidence" / f"{name}.npy").shape == (16, 16)
        assert (tmp_path / "out" / "color" / f"{name}.png").is_file()
        cam = np.load(tmp_path / "out" / "camera" / f"{name}.npz")
        assert cam["pose"].shape == (4, 4) and cam["intrinsics"].shape == (3, 3)
        ply = read_ply(tmp_path / "out" / "points" / f"{name}.ply")
        assert ply["x"].shape == (512,) and ply["red"].dtype == np.uint8
    assert [f.index for f in read_frames(tmp_path / "out")] == [0, 1]  # the viewer reads what we export
    assert np.allclose(np.load(tmp_path / "out" / "camera" / "0001.npz")["pose"], scene.cameras_c2w[1].detach().numpy(), atol=1e-6)


def test_optimisation_lowers_the_photometric_error():
    scene, colours = _scene()
    with torch.no_grad():
        scene.color_logit.zero_()  # grey start: the frames' colours must be recovered
        before = float(_photo_loss(scene, colours, [0, 1]))
    history = optimise_scene(scene, colours, OptimConfig(pose_steps=3, steps=30, frames_per_step=2, lr_color=0.1, holdout_weight=0.0))
    with torch.no_grad():
        after = float(_photo_loss(scene, colours, [0, 1]))
    assert len(history["pose"]) == 3 and len(history["joint"]) == 30
    assert after < 0.7 * before


def test_splat_composites_front_to_back_by_opacity():
    """A half-transparent red point in front of an opaque blue one: ``w = a_red, (1 - a_red) a_blue``."""
    pts = torch.tensor([[0.0625, 0.0625, 2.0], [0.125, 0.125, 4.0]])
    col = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])
    rgb, _, alpha = splat(pts, col, torch.full((2,), 0.1), torch.eye(4), K, 16, 16, opacity=torch.tensor([0.5, 1.0]))
    assert abs(float(rgb[0, 8, 8]) - 0.5 / (0.5 + 0.5 * 0.99)) < 0.02 and abs(float(alpha[8, 8]) - (1 - 0.5 * 0.01)) < 0.01


def test_points_of_a_moving_object_fade_away_from_their_frame():
    """Three frames of a grey wall (z = 3) with a red square (z = 2.9) that moves left -> right. At the
    first frame's time the square's copy from the last frame is faded (temporal visibility): no ghost."""
    f = 3
    depth = torch.full((f, 16, 16), 3.0)
    colours = torch.full((f, 3, 16, 16), 0.5)
    for i, x0 in enumerate((1, 6, 11)):
        depth[i, 6:10, x0:x0 + 4] = 2.9
        colours[i, :, 6:10, x0:x0 + 4] = torch.tensor([1.0, 0, 0])[:, None, None]
    c2w = torch.eye(4).repeat(f, 1, 1)
    pts, _ = depth_to_points(depth, K.expand(f, 3, 3), c2w)
    scene = PointScene4D.from_point_maps(pts, colours, torch.ones(f, 16, 16), c2w, K)
    with torch.no_grad():
        rgb, _, _ = scene.render_frame(0)
    assert float(rgb[0, 7:9, 2:4].mean()) > 0.9  # the square where frame 0 saw it
    ghost = float(rgb[0, 7:9, 12:14].mean() - rgb[1, 7:9, 12:14].mean())  # red minus green: 0 grey, 1 red
    with torch.no_grad():
        scene.log_tscale.fill_(30.0)  # temporal visibility off: the union of the point maps
        rgb_union, _, _ = scene.render_frame(0)
    assert float(rgb_union[0, 7:9, 12:14].mean() - rgb_union[1, 7:9, 12:14].mean()) > 0.9  # a full red ghost
    assert ghost < 0.3
    with torch.no_grad():  # without its own points, frame 0 is rendered from frames 1 and 2
        held, _, alpha = scene.render_frame(0, exclude_own=True)
    assert float(alpha.mean()) > 0.3


def test_old_scene_files_still_load(tmp_path):
    scene, _ = _scene()
    state = {k: v for k, v in scene.state_dict().items()
             if k not in ("src_time", "src_frame", "log_tscale", "opacity_logit")}
    torch.save({"d4d_scene4d": 1, "config": {k: v for k, v in scene.config.items() if k != "temporal_width"},
                "num_frames": 2, "state_dict": state}, tmp_path / "old.pt")
    old = load_scene(tmp_path / "old.pt")
    with torch.no_grad():
        assert torch.allclose(old.opacity_at(0.7), torch.ones(512))
        assert torch.allclose(old.points_at(0.7)[0], scene.points_at(0.7)[0])


def test_points_move_with_their_frames_pose_correction(tmp_path):
    """Frame 1's points ride on frame 1's corrected camera (they were back-projected with it), frame 0's
    stay; a format-2 file (no ``points_follow_pose``) keeps every point fixed, as it was optimised."""
    scene, _ = _scene()
    with torch.no_grad():
        before = scene.points_at(0.5)[0].clone()
        scene.pose_delta[1] = torch.tensor([0.0, 0.05, 0.0, 0.1, 0.0, 0.0])
        after = scene.points_at(0.5)[0]
    own = scene.src_frame == 1
    corr = scene.cameras_c2w[1] @ torch.linalg.inv(scene.base_c2w[1])
    expected = before[own] @ corr[:3, :3].T + corr[:3, 3]
    assert torch.allclose(after[own], expected, atol=1e-5) and float((after[own] - before[own]).norm(dim=-1).min()) > 0.05
    assert torch.allclose(after[~own], before[~own])
    # the camera of frame 1 sees its own points exactly where it saw them before the correction
    cam_before = (before[own] - scene.base_c2w[1, :3, 3]) @ scene.base_c2w[1, :3, :3]
    cam_after = (after[own] - scene.cameras_c2w[1, :3, 3].detach()) @ scene.cameras_c2w[1, :3, :3].detach()
    assert torch.allclose(cam_before, cam_after, atol=1e-4)
    scene.save(tmp_path / "s.pt")
    assert load_scene(tmp_path / "s.pt").points_follow_pose
    blob = torch.load(tmp_path / "s.pt", weights_only=False)
    blob["d4d_scene4d"], blob["config"] = 2, {k: v for k, v in blob["config"].items() if k != "points_follow_pose"}
    torch.save(blob, tmp_path / "v2.pt")
    with torch.no_grad():
        assert torch.allclose(load_scene(tmp_path / "v2.pt").points_at(0.5)[0], before, atol=1e-6)


def test_pose_correction_finds_a_perturbed_camera():
    """A static synthetic scene whose requested path is off by 2 degrees and 5% of the path: the pose
    phase brings the cameras at least halfway back; with the points left in place (the old
    behaviour) it does not."""
    from benchmarks.fourd_pose_correction import run

    kw = dict(motion="orbit", seed=0, frames=3, size=(32, 48), rot_deg=2.0, trans=0.05, depth_noise=0.0,
              pose_steps=40, lr_pose=5e-3)
    follow, fixed = run(**kw, follow=True), run(**kw, follow=False)
    assert follow["rot_after"] < 0.5 * follow["rot_before"] and follow["centre_after"] < 0.6 * follow["centre_before"]
    assert fixed["rot_after"] > 0.7 * fixed["rot_before"]


def test_motion_phase_fits_the_deformation_to_the_flow():
    """A synthetic clip with moving objects (5 frames, 48x48, true depth): the motion phase makes the
    deformation carry frame s's points to where the flow says they are in frame s +- 1 (robust error
    1.21 -> 0.81 px when written), and it leaves the points and cameras alone."""
    from benchmarks.fourd_optimisation import render, sample_scene
    from d4d.fourd.optimise import _flow_loss, consistent_flows, motion_from_flow
    from d4d.geometry.cameras import relative_poses

    n = 5
    scene_def, cam = sample_scene("orbit", np.random.default_rng(5))
    c2w_world, Kc = cam.c2w(n), cam.K(48, 48)
    rgb, depth, _ = render(scene_def, c2w_world, Kc, 48, 48, torch.linspace(0, 1, n))
    frames = rgb.permute(0, 3, 1, 2).float() / 255
    c2w = relative_poses(c2w_world.double(), 0).float()
    depth[depth == 0] = depth[depth > 0].max() * 2
    pts, _ = depth_to_points(depth, Kc.expand(n, 3, 3), c2w)
    scene = PointScene4D.from_point_maps(pts, frames, torch.ones(n, 48, 48), c2w, Kc, max_points=n * 48 * 48)
    flows, ok = consistent_flows(frames, 1.0)
    xyz = scene.xyz.detach().clone()

    def error():
        with torch.no_grad():
            return float(_flow_loss(scene, flows, ok, torch.Generator().manual_seed(1), count=20000)) * 48

    before = error()
    history = motion_from_flow(scene, frames, OptimConfig(flow_steps=200), torch.Generator().manual_seed(0))
    after = error()
    assert len(history) == 200 and after < 0.8 * before, (before, after)
    assert torch.equal(scene.xyz, xyz) and not scene.pose_delta.any()
