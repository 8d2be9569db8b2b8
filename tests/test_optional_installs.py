"""What a plain ``pip install -e .`` leaves out and how the commands behave then: pycolmap (the eval
extra) is refused in one line naming the package and the install command; COLMAP's device and the
commands' ``--device`` default to ``auto``. (decord: tests/test_video.py; wandb-workspaces:
tests/test_report.py.)"""
from __future__ import annotations

import sys
import types

import pytest
import torch

from d4d.utils.errors import UserError


def _one_line_error(capsys, prog: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error:"), err
    return err[0]


def test_evaluate_without_pycolmap_names_the_package_and_the_extra(tmp_path, monkeypatch, capsys):
    from d4d.evaluate import main

    monkeypatch.setitem(sys.modules, "pycolmap", None)  # as on aarch64 without the eval extra
    with pytest.raises(SystemExit) as exc:
        main(["--shards", str(tmp_path), "--out", str(tmp_path / "o"), "--wandb", "disabled",
              "--baseline", "repeat-first", "--camera-trials", "1"])
    assert exc.value.code == 2
    line = _one_line_error(capsys, "d4d.evaluate")
    assert "--camera-trials needs the pycolmap package" in line and "pip install 'd4d[eval]'" in line


def test_colmap_device_auto_follows_pycolmaps_cuda_support(monkeypatch):
    from d4d.metrics.sfm import colmap_device

    monkeypatch.setitem(sys.modules, "pycolmap", types.SimpleNamespace(has_cuda=True))
    assert colmap_device("auto") == "cuda" and colmap_device("cpu") == "cpu" and colmap_device("cuda") == "cuda"
    monkeypatch.setitem(sys.modules, "pycolmap", types.SimpleNamespace(has_cuda=False))
    assert colmap_device("auto") == "cpu"
    with pytest.raises(UserError, match="no CUDA support .*pycolmap-cuda12"):
        colmap_device("cuda")
    monkeypatch.setitem(sys.modules, "pycolmap", types.SimpleNamespace())  # a build without has_cuda
    assert colmap_device("auto") == "cpu"
    with pytest.raises(UserError, match="expected one of auto, cpu, cuda"):
        colmap_device("gpu")


def test_installed_pycolmap_reports_its_cuda_support():
    pycolmap = pytest.importorskip("pycolmap", reason="pycolmap (the eval extra) is not installed")
    from d4d.metrics.sfm import colmap_device

    assert isinstance(pycolmap.has_cuda, bool)  # the attribute colmap_device reads
    assert colmap_device("auto") == ("cuda" if pycolmap.has_cuda else "cpu")


def test_colmap_device_flag_is_checked_by_argparse(tmp_path, capsys):
    from d4d.evaluate import main

    with pytest.raises(SystemExit) as exc:
        main(["--shards", str(tmp_path), "--out", str(tmp_path / "o"), "--colmap-device", "gpu"])
    assert exc.value.code == 2
    assert "--colmap-device: invalid choice: 'gpu'" in _one_line_error(capsys, "d4d.evaluate")


def test_device_auto_is_cuda_when_available(monkeypatch):
    from d4d.utils.devices import command_device, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert command_device("auto") == "cpu" and command_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="cuda: CUDA is not available here"):
        command_device("cuda")
    with pytest.raises(ValueError):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("SLURM_LOCALID", raising=False)
    assert command_device("auto") == "cuda:0" and command_device("cuda:1") == "cuda:1"
    assert command_device("cuda") == "cuda" and command_device("cpu") == "cpu"
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert command_device("auto") == "cuda:1"
    with pytest.raises(ValueError, match="there are 2 CUDA devices"):
        command_device("cuda:2")


@pytest.mark.parametrize("module, prog", [("d4d.generate", "d4d.generate"), ("d4d.sample_video", "d4d.sample_video"),
                                          ("d4d.evaluate", "d4d.evaluate")])
def test_commands_default_to_device_auto(module, prog, monkeypatch, capsys):
    import importlib

    parser = importlib.import_module(module)._parser()
    device = next(a for a in parser._actions if "--device" in a.option_strings)
    assert device.default == "auto"
    assert device.type("cpu") == "cpu"
    assert device.type("auto") == ("cuda:0" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():  # an explicit cuda on a machine without one: one line, exit 2
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["--device", "cuda"])
        assert exc.value.code == 2
        assert f"--device cuda: CUDA is not available here" in _one_line_error(capsys, prog)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--device", "gpu0"])
    assert exc.value.code == 2
    assert "--device gpu0:" in _one_line_error(capsys, prog)
