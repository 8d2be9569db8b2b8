"""``python -m d4d.generate`` end to end on tiny debug checkpoints of every stage, trained here for one
step from ``recipes/debug/*.yaml`` on the session's synthetic shards, and its one-line user errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, run_module

# stage -> (debug recipe, extra overrides); every run: 1 optimiser step, no validation
STAGES = {
    "classifier": ("classifier.yaml", ["--data.init_args.image_size", "32", "--test_after_fit", "false"]),
    "dynamic": ("dynamic.yaml", []),
    "static": ("static.yaml", []),
    "fourd": ("4dgen_224_linear.yaml", []),
}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the shared CPU is oversubscribed: more threads are much slower


@pytest.fixture(scope="session")
def checkpoints(synthetic_data, tmp_path_factory) -> dict[str, Path]:
    """``{stage: checkpoint}``, the four fits run side by side as a user would (``python -m d4d.fit``)."""
    import os

    root = tmp_path_factory.mktemp("generate_ckpts")
    procs = {}
    for stage, (recipe, extra) in STAGES.items():
        local = root / recipe
        local.write_text(
            (REPO / "recipes" / "debug" / recipe).read_text().replace("data/synthetic", str(synthetic_data))
        )
        args = [
            sys.executable,
            "-m",
            "d4d.fit",
            str(local),
            "--trainer.max_steps",
            "1",
            "--trainer.limit_val_batches",
            "0",
            "--run_dir",
            str(root / stage),
            "--data.init_args.num_workers",
            "0",
            *extra,
        ]
        env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **ONE_THREAD}
        procs[stage] = subprocess.Popen(
            args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    out = {}
    for stage, proc in procs.items():
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{stage} fit failed:\n{log[-3000:]}"
        found = sorted(
            (root / stage / "checkpoints").glob("*.ckpt"), key=lambda p: (p.name != "last.ckpt", p.name)
        )
        assert found, f"{stage}: no checkpoint in {root / stage}:\n{log[-2000:]}"
        out[stage] = found[0]  # last.ckpt where the recipe links one, else the step-1 checkpoint
    return out


@pytest.fixture(scope="session")
def held_out_image(synthetic_data, tmp_path_factory) -> Path:
    """Frame 0 of the first clip of the synthetic test split, as a PNG."""
    from PIL import Image

    from d4d.data.shards import build_clip_pipeline

    clip = next(iter(build_clip_pipeline(str(synthetic_data / "test"))))
    path = tmp_path_factory.mktemp("image") / "held_out.png"
    Image.fromarray(np.asarray(clip.frames[0])).save(path)
    return path


SCENE_OPTIMISATION = {"pose_steps": 5, "steps": 10}  # what a debug 4dgen recipe sets


@pytest.fixture(scope="session")
def fourd_with_optimisation(checkpoints, tmp_path_factory) -> Path:
    """The 4dgen checkpoint with ``hyper_parameters["scene_optimisation"]`` set, as
    ``FourDGenModule(scene_optimisation=...)`` saves it."""
    import torch

    ckpt = torch.load(checkpoints["fourd"], map_location="cpu", weights_only=False)
    ckpt.setdefault("hyper_parameters", {})["scene_optimisation"] = dict(SCENE_OPTIMISATION)
    path = tmp_path_factory.mktemp("fourd_opt") / "4dgen.ckpt"
    torch.save(ckpt, path)
    return path


def _args(ckpts, image, out, *extra, fourd=None) -> list[str]:
    return [
        str(image),
        "--dynamic",
        str(ckpts["dynamic"]),
        "--static",
        str(ckpts["static"]),
        "--fourd",
        str(fourd or ckpts["fourd"]),
        "--out",
        str(out),
        "--steps",
        "2",
        "--frames",
        "5",
        "--threads",
        "1",
        *extra,
    ]


def _generate(ckpts, image, out, *extra, check=True, fourd=None):
    """``python -m d4d.generate`` on the debug checkpoints (4D optimisation steps from ``--fourd``'s
    scene_optimisation when it has one, else give --pose-steps / --optimise-steps in ``extra``)."""
    return run_module(
        "d4d.generate", *_args(ckpts, image, out, *extra, fourd=fourd), check=check, timeout=300
    )


def _check_result(folder: Path, frames: int, factor: int = 2) -> None:
    import torch

    from d4d.data.video import decode_mp4
    from d4d.fourd.scene import load_scene
    from d4d.view_layout import read_frames, read_ply

    assert len(decode_mp4((folder / "video.mp4").read_bytes())) == frames
    assert len(json.loads((folder / "cameras.json").read_text())["c2w"]) == frames
    rows = [ln for ln in (folder / "cameras.txt").read_text().splitlines()[1:] if ln.strip()]
    assert len(rows) == frames
    exported = read_frames(folder)  # section-7 layout, checked by the viewer's reader
    assert [f.index for f in exported] == list(range(frames))
    for f in exported:
        assert np.isfinite(f.depth).all() and (f.depth > 0).mean() > 0.5
        assert np.isfinite(f.confidence).all() and f.rgb.shape == (32, 32, 3)
        assert np.allclose(f.c2w[3], [0, 0, 0, 1])
    assert np.allclose(exported[0].c2w, np.eye(4), atol=1e-5)  # frame 0 is not pose-corrected
    ply = read_ply(folder / "points" / "0002.ply")
    assert len(ply["x"]) > 100 and np.isfinite(np.stack([ply["x"], ply["y"], ply["z"]])).all()
    scene = load_scene(folder / "scene.pt")
    assert scene.num_frames == frames
    assert torch.allclose(
        scene.cameras_c2w.float(), torch.from_numpy(np.stack([f.c2w for f in exported])).float(), atol=1e-5
    )
    corrected = json.loads((folder / "cameras_corrected.json").read_text())["c2w"]
    assert np.allclose(np.array(corrected), np.stack([f.c2w for f in exported]), atol=1e-5)
    n_sr = (frames - 1) * factor + 1
    sr = read_frames(folder / "sr")
    assert len(sr) == n_sr and len(decode_mp4((folder / "sr" / "video.mp4").read_bytes())) == n_sr
    assert np.allclose(sr[factor].c2w, exported[1].c2w, atol=1e-5)  # every factor-th camera is an input one
    assert all(np.isfinite(f.depth).all() for f in sr)
    assert (folder / "summary.png").stat().st_size > 10_000


def test_generate_end_to_end_both_modules(checkpoints, fourd_with_optimisation, held_out_image, tmp_path):
    """No step flags: the 4D optimisation steps come from the 4D checkpoint's scene_optimisation."""
    out = tmp_path / "out"
    start = time.perf_counter()
    proc = _generate(
        checkpoints,
        held_out_image,
        out,
        "--motion",
        "auto",
        "--selector",
        str(checkpoints["classifier"]),
        "--module",
        "both",
        "--prompt",
        "a quiet street",
        fourd=fourd_with_optimisation,
    )
    wall = time.perf_counter() - start
    print(f"d4d.generate --module both on debug checkpoints: {wall:.1f} s wall")
    from d4d.geometry.motions import MOTIONS

    lines = proc.stdout.splitlines()
    lines = lines[next(i for i, ln in enumerate(lines) if ln.startswith("motion: ")) :]
    chosen = lines[0].split()[1]
    assert lines[0].startswith("motion: ") and chosen in MOTIONS
    probs = {ln.split()[0]: float(ln.split()[1]) for ln in lines[1:9]}
    assert set(probs) == set(MOTIONS) and sum(probs.values()) == pytest.approx(1.0, abs=1e-3)
    assert max(probs, key=probs.get) == chosen
    for stage in ("dynamic", "static"):
        _check_result(out / stage, frames=5)
    run = json.loads((out / "run.json").read_text())
    assert run["motion"] == chosen and [r["module"] for r in run["results"]] == ["dynamic", "static"]
    for rec in run["results"]:
        assert set(rec["timings_s"]) >= {f"{rec['module']}: video", f"{rec['module']}: 4D"}
        assert rec["temporal_sr"]["frames"] == 9
        assert 0.0 <= rec["temporal_sr"]["moved_fraction"] <= 1.0
    used = run["scene_optimisation"]
    assert {k: used["config"][k] for k in SCENE_OPTIMISATION} == SCENE_OPTIMISATION
    assert used["source"]["steps"] == used["source"]["pose_steps"] == "checkpoint"
    assert used["source"]["lr_pose"] == "default"
    assert "4D per-scene optimisation: pose_steps=5 (checkpoint), steps=10 (checkpoint)" in proc.stdout
    assert "done in" in proc.stdout and "trajectory selection done" in proc.stderr  # progress with timings
    # (no wall-clock bound: the run's timeout only guards against a hang; speed is for benchmarks)


def test_generate_one_module_named_motion_no_optimise_then_view(checkpoints, held_out_image, tmp_path):
    """``--view --port P``: the viewer serves the result on 127.0.0.1:P once it is written; SIGTERM
    stops it with exit status 0 and the outputs intact."""
    from d4d.viewer.browser import free_port
    from tests.test_view_cli import folder_digest, serve_then_stop

    out = tmp_path / "out"
    port = free_port()
    start = time.perf_counter()
    args = _args(checkpoints, held_out_image, out, "--motion", "orbit left", "--module", "dynamic",
                 "--no-optimise", "--fps-factor", "3", "--text-cfg", "3", "--camera-cfg", "2",
                 "--view", "--port", str(port))
    code, log, page = serve_then_stop(["d4d.generate", *args], port, signal.SIGTERM, timeout_s=300)
    print(f"d4d.generate --module dynamic --no-optimise --view: {time.perf_counter() - start:.1f} s wall")
    assert code == 0 and "4D viewer: stopped" in log and "Traceback" not in log, log[-3000:]
    assert "viser" in page.lower()
    assert "4D per-scene optimisation: off (--no-optimise)" in log
    before = folder_digest(out)
    _check_result(out, frames=5, factor=3)
    assert folder_digest(out) == before
    info = json.loads((out / "info.json").read_text())
    assert info["guidance"] == {"text": 3.0, "camera": 2.0} and info["stage"] == "dynamic"
    assert json.loads((out / "cameras.json").read_text())["label"] == "orbit left"


def _error(*args: str) -> str:
    """Run ``d4d.generate``'s main in this process (fast) and return its one error line."""
    import contextlib
    import io

    from d4d.generate import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2, err.getvalue()[-2000:]
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    assert lines[-1].startswith("d4d.generate: error: ") and "Traceback" not in err.getvalue()
    return lines[-1]


def test_user_error_from_the_command_line(tmp_path):
    """As a user sees it: exit status 2, one line, no traceback."""
    proc = run_module(
        "d4d.generate",
        str(tmp_path / "none.png"),
        "--motion",
        "zoom_in",
        "--dynamic",
        "x.ckpt",
        "--fourd",
        "y.ckpt",
        "--out",
        str(tmp_path / "o"),
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip().splitlines()[-1] == "d4d.generate: error: --dynamic: checkpoint not found: x.ckpt"
    )


def test_user_errors_are_one_line(checkpoints, held_out_image, tmp_path):
    base = [
        "--dynamic",
        str(checkpoints["dynamic"]),
        "--fourd",
        str(checkpoints["fourd"]),
        "--out",
        str(tmp_path / "o"),
    ]
    bad_image = tmp_path / "broken.png"
    bad_image.write_text("not an image")
    assert str(bad_image) in _error(str(bad_image), "--motion", "zoom_in", *base)
    assert "image not found" in _error(str(tmp_path / "none.png"), "--motion", "zoom_in", *base)
    img = str(held_out_image)
    assert "spin_around" in _error(img, "--motion", "spin_around", *base)
    missing = str(tmp_path / "nope.ckpt")
    line = _error(
        img, "--motion", "zoom_in", "--dynamic", missing, "--fourd", str(checkpoints["fourd"]), "--out", "x"
    )
    assert "--dynamic" in line and missing in line
    assert "--fourd" in _error(
        img, "--motion", "zoom_in", "--dynamic", str(checkpoints["dynamic"]), "--fourd", missing, "--out", "x"
    )
    assert "--text-cfg 50" in _error(img, "--motion", "zoom_in", "--text-cfg", "50", *base)
    assert "--cfg 9" in _error(
        img,
        "--motion",
        "zoom_in",
        "--module",
        "static",
        "--static",
        str(checkpoints["static"]),
        "--cfg",
        "9",
        *base,
    )
    assert "--selector" in _error(img, "--motion", "auto", *base)
    line = _error(img, "--motion", "zoom_in", "--camera-cfg", "-1", *base)
    assert "--camera-cfg -1: guidance scale out of range" in line
    line = _error(img, "--motion", "auto", "--selector", missing, *base)
    assert "--selector" in line and missing in line
    assert "--optimise-steps -1" in _error(img, "--motion", "zoom_in", "--optimise-steps", "-1", *base)
    assert "--port 0" in _error(img, "--motion", "zoom_in", "--port", "0", *base)
    assert "--static" in _error(img, "--motion", "zoom_in", "--module", "both", *base)
    # a checkpoint of the wrong stage is named too (fails after loading, before generating)
    line = _error(
        img,
        "--motion",
        "zoom_in",
        "--dynamic",
        str(checkpoints["static"]),
        "--fourd",
        str(checkpoints["fourd"]),
        "--out",
        str(tmp_path / "o2"),
        "--threads",
        "1",
    )
    assert "--dynamic" in line and "static" in line


def test_vlm_trajectory_selection(tmp_path, held_out_image, capsys):
    """``--motion auto --vlm DIR``, a tiny random Qwen2.5-VL saved locally: prints the eight probabilities."""
    import argparse

    from d4d.generate import select_motion
    from d4d.geometry.motions import MOTIONS
    from d4d.select import read_image
    from d4d.selectors.tiny import save_tiny_qwen2_5_vl
    from d4d.selectors.vlm import VLMSelector

    model = save_tiny_qwen2_5_vl(tmp_path / "tiny-qwen")
    args = argparse.Namespace(motion="auto", selector=None, vlm=str(model), prompt="a street", device="cpu")
    timings: dict = {}
    image = read_image(held_out_image)
    motion, probs = select_motion(args, image, timings)
    expected = VLMSelector.from_pretrained(str(model)).scores(image.numpy(), prompt="a street").as_dict()
    assert motion == max(expected, key=expected.get) and probs == pytest.approx(expected)
    out = capsys.readouterr().out.splitlines()
    out = out[next(i for i, ln in enumerate(out) if ln.startswith("motion: ")) :]  # after any library chatter
    assert out[0].startswith(f"motion: {motion}") and {ln.split()[0] for ln in out[1:9]} == set(MOTIONS)
    assert "trajectory selection" in timings
    # a named motion skips selection altogether
    assert select_motion(argparse.Namespace(motion="zoom_in"), image, timings) == ("zoom_in", None)


def test_optimisation_settings_flag_over_checkpoint_over_default(
    checkpoints, fourd_with_optimisation, held_out_image, tmp_path, capsys
):
    """The lead's contract: explicit flag, else the 4D checkpoint's scene_optimisation, else OptimConfig."""
    import torch

    from d4d.fourd.optimise import OptimConfig
    from d4d.generate import _optimisation, _parser

    from d4d.modules.fourdgen import load_network

    def resolve(fourd, *flags):
        args = _parser().parse_args(["x.png", "--out", "o", "--fourd", str(fourd), *flags])
        return _optimisation(args, load_network(fourd)[1]["scene_optimisation"])

    config, record = resolve(fourd_with_optimisation, "--pose-steps", "2")
    assert (config.pose_steps, config.steps) == (2, SCENE_OPTIMISATION["steps"])
    assert record["source"]["pose_steps"] == "flag" and record["source"]["steps"] == "checkpoint"
    assert "pose_steps=2 (flag), steps=10 (checkpoint)" in capsys.readouterr().out
    ckpt = torch.load(fourd_with_optimisation, map_location="cpu", weights_only=False)
    del ckpt["hyper_parameters"]["scene_optimisation"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    config, record = resolve(tmp_path / "old.ckpt")  # an older checkpoint without the key: defaults
    assert (config.pose_steps, config.steps) == (OptimConfig().pose_steps, OptimConfig().steps)
    assert set(record["source"].values()) == {"default"}
    assert resolve(checkpoints["fourd"], "--no-optimise") == (False, {"enabled": False})
    # a checkpoint whose scene_optimisation names a field OptimConfig does not have: one line naming it
    ckpt["hyper_parameters"]["scene_optimisation"] = {**SCENE_OPTIMISATION, "stepz": 3}
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    line = _error(str(held_out_image), "--motion", "zoom_in", "--dynamic", str(checkpoints["dynamic"]),
                  "--fourd", str(bad), "--out", str(tmp_path / "o"), "--threads", "1")
    assert "stepz" in line and str(bad) in line and "scene_optimisation" in line
