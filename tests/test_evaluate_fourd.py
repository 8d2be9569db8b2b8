"""The "+4d" rows of ``python -m d4d.evaluate``: per-scene optimisation settings (flag, else the 4dgen
checkpoint's ``scene_optimisation``, else defaults), the scene rendered from the requested cameras,
and a ``real-frames+4d`` evaluation end to end on the tiny synthetic fixture."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from d4d.utils.errors import UserError
from tests.conftest import run_module

TINY = {"type": "vit", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 64, "image_size": 32, "patch_size": 8}


@pytest.fixture(scope="module")
def fourd_ckpt(tmp_path_factory):
    """A real (untrained) 4dgen checkpoint as d4d.fit writes it, with scene_optimisation in its hparams."""
    from d4d.modules.fourdgen import FourDGenModule

    module = FourDGenModule(encoder_config=TINY, dec_dim=32, dec_depth=1, dec_heads=2)
    ckpt = {"state_dict": module.state_dict(),
            "hyper_parameters": {**dict(module.hparams), "scene_optimisation": {"steps": 3, "pose_steps": 2}}}
    module.on_save_checkpoint(ckpt)
    path = tmp_path_factory.mktemp("fourd") / "4dgen.ckpt"
    torch.save(ckpt, path)
    return path


def test_optimisation_settings_flag_then_checkpoint_then_defaults():
    from d4d.evaluation.fourd import optim_config
    from d4d.fourd.optimise import OptimConfig

    cfg, source = optim_config({}, None, None)
    assert (cfg.steps, cfg.pose_steps) == (OptimConfig().steps, OptimConfig().pose_steps) and source == {}
    cfg, source = optim_config({"steps": 7, "pose_steps": 4, "lr_pose": 0.01}, None, None)
    assert (cfg.steps, cfg.pose_steps, cfg.lr_pose) == (7, 4, 0.01) and source["steps"] == "checkpoint"
    cfg, source = optim_config({"steps": 7, "pose_steps": 4}, 0, None)
    assert (cfg.steps, cfg.pose_steps) == (0, 4) and source == {"steps": "flag", "pose_steps": "checkpoint"}
    with pytest.raises(UserError, match="unknown key 'stepz'"):
        optim_config({"stepz": 3})
    with pytest.raises(UserError, match="--fourd-pose-steps -1"):
        optim_config({}, None, -1)


def test_scene_is_rendered_from_the_requested_cameras(synthetic_data):
    """A scene built from the ground-truth depth of frame 0 of a static clip, rendered by the evaluation
    at the requested path, reproduces the real frames where they see frame 0; the same scene rendered
    along the reversed path does not (so the score depends on cameras and times being the clip's).
    Masks from the shard's depth: exact, unlike flow at 32x32."""
    from d4d.evaluation.clips import clip_from_sample, covisibility
    from d4d.evaluation.fourd import FourDStage
    from d4d.evaluation.scoring import image_metrics
    from d4d.data.shards import build_clip_pipeline
    from d4d.fourd.scene import PointScene4D
    from d4d.geometry.points import depth_to_points
    from d4d.video.interface import CameraPath

    sample = next(s for s in build_clip_pipeline(str(synthetic_data / "test"))
                  if not s.meta.get("dynamic", True) and s.motion not in ("stationary", None))
    clip = clip_from_sample(sample)
    cam = clip.camera
    depth = sample.depth[:1].float()
    depth = torch.where(depth > 0, depth, 10 * depth.max())  # the sky (depth 0 = no surface): far away
    world, _ = depth_to_points(depth, cam.K[None], cam.c2w[:1])
    n = clip.frames.shape[0]
    points = world.expand(n, -1, -1, -1).contiguous()
    conf = torch.zeros(n, cam.height, cam.width)
    conf[0] = 1.0  # only frame 0's pixels: a still scene seen from frame 0
    scene = PointScene4D.from_point_maps(points, clip.frames, conf, cam.c2w, cam.K, max_points=10**6)
    masks = covisibility(clip.frames, "depth", clip=clip)
    right = image_metrics(clip.frames, FourDStage.render(scene, cam), masks)
    reversed_path = CameraPath(cam.c2w.flip(0), cam.K, cam.height, cam.width)
    wrong = image_metrics(clip.frames, FourDStage.render(scene, reversed_path), masks)
    assert right["scored_frames"] == n - 1
    assert right["mpsnr"] > 20.0, right
    assert right["mpsnr"] > wrong["mpsnr"] + 4.0, (right, wrong)


def test_real_frames_plus_4d_end_to_end(synthetic_data, fourd_ckpt, tmp_path):
    out = tmp_path / "eval"
    frames = 4
    proc = run_module("d4d.evaluate", "--shards", str(synthetic_data / "test"), "--out", str(out),
                      "--baseline", "real-frames", "--baseline", "repeat-first", "--fourd", str(fourd_ckpt),
                      "--fourd-max-points", "500", "--max-clips", "1", "--frames", str(frames),
                      "--lpips", "off", "--wandb", "offline", "--samples", "1")
    assert "4D generator: per-scene optimisation 2 pose + 3 joint steps" in proc.stderr
    rows = list(csv.DictReader(open(out / "per_clip.csv")))
    by_protocol: dict = {}
    for r in rows:
        by_protocol.setdefault(r["protocol"], []).append(r)
    # +4d only for the modules and the oracle, not for the still baseline
    assert sorted(by_protocol) == ["real-frames", "real-frames+4d", "repeat-first"]
    assert [r["clip_id"] for r in by_protocol["real-frames+4d"]] == [r["clip_id"] for r in by_protocol["real-frames"]]
    for real, lifted in zip(by_protocol["real-frames"], by_protocol["real-frames+4d"]):
        assert float(real["mpsnr"]) == 100.0  # the oracle itself is perfect ...
        assert 0 < float(lifted["mpsnr"]) < 60  # ... its untrained 4D re-render is not
        assert lifted["covisible"] == real["covisible"]  # the same masks
        assert int(lifted["scored_frames"]) == frames - 1
        assert float(lifted["seconds"]) > 0
        for key in ("mssim", "mssim_strict", "flicker", "fourd_rot_err", "fourd_trans_err", "fourd_cam_mc"):
            assert math.isfinite(float(lifted[key])), key
    doc = json.loads((out / "aggregate.json").read_text())
    assert doc["complete"] is True and doc["protocols"]["real-frames+4d"]["clips"] == 1
    settings = doc["config"]["fourd_settings"]
    assert settings["optimisation"]["steps"] == 3 and settings["source"]["pose_steps"] == "checkpoint"
    assert (out / "samples" / "real-frames_4d").is_dir()


@pytest.mark.parametrize("args, message", [
    (["--baseline", "real-frames", "--fourd-steps", "3"], "--fourd-steps / --fourd-pose-steps need --fourd"),
    (["--baseline", "real-frames", "--fourd", "FOURD", "--fourd-steps", "-2"], "--fourd-steps -2: must be >= 0"),
    (["--baseline", "real-frames", "--fourd", "nope.ckpt"], "--fourd: checkpoint nope.ckpt not found"),
])
def test_fourd_user_errors_are_one_line(synthetic_data, fourd_ckpt, tmp_path, capsys, args, message):
    from d4d.evaluate import main

    args = [str(fourd_ckpt) if a == "FOURD" else a for a in args]
    with pytest.raises(SystemExit) as exc:
        main(["--shards", str(synthetic_data / "test"), "--out", str(tmp_path / "o"), "--wandb", "disabled",
              "--lpips", "off", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("d4d.evaluate: error:") and message in err[0], err


def test_depth_covisibility_of_a_sliding_camera_by_hand():
    """A plane at depth 2 seen by a camera sliding right by 0.25: pixel column u of frame 1 lands at
    u + f * 0.25 / 2 in frame 0, so the last ceil(f * 0.125) columns are not seen by frame 0; with a
    box in front of part of frame 0's view, what frame 0 sees there is the box, not the plane."""
    from d4d.evaluation.clips import depth_covisibility

    H = W = 16
    f = 16.0
    K = torch.tensor([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1.0]])
    c2w = torch.eye(4).repeat(2, 1, 1)
    c2w[1, 0, 3] = 0.25
    depth = torch.full((2, H, W), 2.0)
    m = depth_covisibility(depth, c2w, K)
    shift = f * 0.25 / 2  # 2 pixels
    cols = torch.arange(W) + 0.5 + shift < W
    assert m[0].all() and torch.equal(m[1], cols[None].expand(H, W))
    depth[0, :, :4] = 1.0  # a box covering frame 0's first 4 columns
    m = depth_covisibility(depth, c2w, K)
    hidden = (torch.arange(W) + 0.5 + shift) < 4  # frame-1 columns landing on the box in frame 0
    assert torch.equal(m[1], (cols & ~hidden)[None].expand(H, W))
    depth[:] = 0.0  # "no surface" everywhere (sky): seen by both frames wherever it stays in view
    assert depth_covisibility(depth, c2w, K)[1].all()
