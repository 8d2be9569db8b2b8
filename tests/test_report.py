"""``python -m d4d.report``: local wandb run files, evaluation JSON, baselines CSV, Table 1 / Table 2."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from d4d.reporting.sources import load_wandb_offline, split_summary, wandb_api_filters
from d4d.utils.errors import UserError


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """A real offline wandb run (wandb writes its .wandb transaction log) with known values."""
    import wandb

    root = tmp_path_factory.mktemp("wb")
    run = wandb.init(project="d4d-test", name="tiny", dir=str(root), mode="offline", tags=["a", "b"], group="g1",
                     config={"lr": 0.01}, settings=wandb.Settings(silent=True, console="off"))
    for step in range(5):
        run.log({"train/loss": 1.0 / (step + 1), "val/acc": 0.5 + 0.1 * step}, step=step)
    run.log({"val/render": wandb.Image(np.zeros((8, 8, 3), dtype=np.uint8))}, step=4)  # media: not a metric
    run.summary["eval/dynamic/mpsnr"] = 20.5
    run.summary["eval/dynamic+4d/mpsnr"] = 21.25
    run.finish()
    _wait_for_exit_record(root)
    return root


def _wait_for_exit_record(root, timeout: float = 30.0) -> None:
    """wandb-core may still be flushing the log when ``finish`` returns: wait for its exit record."""
    import time

    from wandb.proto import wandb_internal_pb2 as pb

    from d4d.reporting.wandb_offline import find_run_files, iter_records

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for raw in iter_records(find_run_files(root)[0]):
            rec = pb.Record()
            rec.ParseFromString(raw)
            if rec.WhichOneof("record_type") == "exit":
                return
        time.sleep(0.2)
    raise AssertionError("wandb did not finish writing the offline run")


def test_offline_run_is_read_without_network(offline_run):
    (run,) = load_wandb_offline(offline_run)
    assert run.name == "tiny" and run.tags == ["a", "b"] and run.group == "g1"
    assert run.config["lr"] == 0.01
    assert [row["train/loss"] for row in run.history if "train/loss" in row] == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4, 1 / 5])
    assert run.metrics[""]["val/acc"] == pytest.approx(0.9)  # the last logged value
    assert not [k for k in run.metrics[""] if k.startswith("val/render")]  # the image's count/size are not metrics
    assert run.metrics["dynamic"]["mpsnr"] == 20.5 and run.metrics["dynamic+4d"]["mpsnr"] == 21.25


def test_summary_split_and_api_filters():
    out = split_summary({"eval/static/mssim": 0.5, "val/acc": 1, "_step": 3, "img": {"_type": "image"}, "flag": True})
    assert out == {"static": {"mssim": 0.5}, "": {"val/acc": 1.0}}
    assert wandb_api_filters(["x1"], [], []) == {"name": {"$in": ["x1"]}}
    assert wandb_api_filters([], ["t"], ["g"]) == {"$or": [{"tags": {"$in": ["t"]}}, {"group": {"$in": ["g"]}}]}
    with pytest.raises(UserError, match="--run-id, --tag or --group"):
        wandb_api_filters([], [], [])


def _write_eval(path, name, protocols, config=None, complete=True):
    path.mkdir(parents=True)
    (path / "aggregate.json").write_text(json.dumps({"format": "d4d.evaluate/1", "name": name, "protocols": protocols,
                                                     "directions": {"mpsnr": 1, "mlpips": -1},
                                                     "config": config or {}, "complete": complete}))
    return path


def test_tables_bold_the_best_and_table2_has_delta_rows(tmp_path, offline_run):
    from d4d.report import main

    a = _write_eval(tmp_path / "a", "run-a", {"dynamic": {"mpsnr": 20.0, "mlpips": 0.30, "clips": 4},
                                              "dynamic+4d": {"mpsnr": 21.5, "mlpips": 0.35, "clips": 4}},
                    {"shards": "data/synthetic/test", "frames": 5, "covisibility": "depth", "camera_trials": 0,
                     "fourd_settings": {"optimisation": {"pose_steps": 5, "steps": 20}, "source": {"steps": "flag"},
                                        "max_points": 3000, "depth_model": False}}, complete=False)
    b = _write_eval(tmp_path / "b", "run-b", {"static": {"mpsnr": 19.0, "mlpips": 0.20, "clips": 4}})
    import torch

    from d4d.evaluation.outputs import write_sample_video

    real = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for proto, clips in (("dynamic", ("c1", "c0")), ("dynamic_4d", ("c1", "c2"))):  # c1: the one both have
        for clip in clips:
            write_sample_video(a / "samples" / proto / f"{clip}.mp4", real, real.flip(-1))
    csv = tmp_path / "published.csv"
    csv.write_text("name,protocol,mpsnr,mlpips\nCamI2V,,18.5,0.4\n")
    out = tmp_path / "report"
    main(["--out", str(out), "--eval", str(a), "--eval", f"{b}=renamed", "--baselines", str(csv),
          "--wandb-dir", str(offline_run)])
    md = (out / "report.md").read_text()
    lines = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| ")}
    assert "mPSNR ↑" in md and "mLPIPS ↓" in md
    assert "**21.50**" in lines["run-a / dynamic+4d"]  # highest mPSNR
    assert "**0.2000**" in lines["renamed / static"]  # lowest mLPIPS
    assert "**" not in lines["CamI2V *(published)*"]
    assert "18.50" in lines["CamI2V *(published)*"]
    # Table 2: alone, with 4D, delta = with - alone (+1.5 dB better, +0.05 LPIPS worse); the wandb run has a pair too
    table2 = md.split("## Table 2")[1].split("##")[0]
    assert "| run-a | Δ (dynamic+4d − dynamic) | +1.50 ✓ | +0.0500 ✗ |" in table2 or \
           "| run-a | Δ (dynamic+4d − dynamic) | +1.5000 ✓ | +0.0500 ✗ |" in table2
    assert "| tiny | Δ (dynamic+4d − dynamic) | +0.7500 ✓ | - |" in table2
    # how each evaluation was made (rows are comparable only when made the same way)
    settings = md.split("## Evaluation settings")[1].split("##")[0]
    assert ("- **run-a**: shards `data/synthetic/test`; **partial: the evaluation was interrupted or is still "
            "running**; first 5 frames; covisibility `depth`; +4d: 5 pose + 20 "
            "joint steps (steps from flag), 3000 points, depth model no") in settings
    assert "renamed" not in settings  # no config recorded for that one
    # sample frames of the evaluation that has videos: real, dynamic, dynamic+4d rows of clip c1
    assert "![samples of run-a](images/samples_0_run-a.png)" in md and "samples of renamed" not in md
    from PIL import Image

    assert Image.open(out / "images" / "samples_0_run-a.png").size[1] > 150
    # the wandb run's training values get their own table and curves
    assert "## Training runs" in md and "val/acc" in md
    assert (out / "images" / "curves.png").stat().st_size > 1000
    assert (out / "images" / "bars.png").stat().st_size > 1000
    html = (out / "report.html").read_text()
    assert "<b>21.50</b>" in html and "images/curves.png" in html


@pytest.mark.parametrize("args, message", [
    (["--eval", "nowhere"], "nowhere: no evaluation file"),
    (["--wandb-dir", "nowhere"], "nowhere: no such wandb run"),
    (["--tag", "x"], "--wandb-project ENTITY/PROJECT, which is missing"),
    ([], "no runs to compare"),
])
def test_user_errors(tmp_path, capsys, args, message):
    from d4d.report import main

    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "r"), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("d4d.report: error:") and message in err[0], err


def test_bad_baseline_csv_and_publish_without_login(tmp_path, capsys, monkeypatch):
    from d4d.report import main

    bad = tmp_path / "bad.csv"
    bad.write_text("name,mpsnr\nX,12.5\nY,abc\n")
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "r"), "--baselines", str(bad)])
    assert "line 3: mpsnr='abc' is not a number" in capsys.readouterr().err
    good = tmp_path / "good.csv"
    good.write_text("name,mpsnr\nX,12.5\n")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "r"), "--baselines", str(good), "--publish", "me/proj"])
    err = capsys.readouterr()
    assert "--publish needs a wandb login" in err.err and (tmp_path / "r" / "report.md").is_file()


def test_publish_without_wandb_workspaces_names_the_extra(tmp_path, capsys, monkeypatch):
    import d4d.fit
    from d4d.report import main

    good = tmp_path / "good.csv"
    good.write_text("name,mpsnr\nX,12.5\n")
    monkeypatch.setattr(d4d.fit, "wandb_logged_in", lambda: True)
    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)  # as without the report extra
    monkeypatch.setitem(sys.modules, "wandb_workspaces.reports", None)
    monkeypatch.setitem(sys.modules, "wandb_workspaces.reports.v2", None)
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "r"), "--baselines", str(good), "--publish", "me/proj"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("d4d.report: error: --publish needs the wandb-workspaces package")
    assert "pip install 'd4d[report]'" in err[0] and (tmp_path / "r" / "report.md").is_file()
