"""Bad command-line input stops every command before any work, with one line naming the flag and the
value or the path (issue 17, items 9-11):

* numeric flags are checked where they are parsed (:mod:`d4d.utils.cli_args`): finite, in range;
* output paths are checked right after parsing (:mod:`d4d.utils.paths`): an existing file where a
  folder is wanted and vice versa, a path under a file, an unwritable place (``/proc`` for root, for
  whom permission bits do not apply; a ``chmod 500`` folder otherwise);
* ``d4d.fit``'s trainer/data numbers (:mod:`d4d.utils.validate_fit`);
* ``data_prep.synthetic`` resumes by group.

Every command runs in this process (``main(argv)``, SystemExit caught): the inputs other than the one
under test do not exist, so a check that ran too late would report them instead.
"""
from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path

import pytest

from d4d.utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]

# command -> (module, prog in its error lines)
PROGS = {
    "sample_video": ("d4d.sample_video", "d4d.sample_video"),
    "generate": ("d4d.generate", "d4d.generate"),
    "export_checkpoint": ("d4d.export_checkpoint", "d4d.export_checkpoint"),
    "reconstruct": ("d4d.fourd.reconstruct", "d4d.fourd.reconstruct"),
    "evaluate": ("d4d.evaluate", "d4d.evaluate"),
    "report": ("d4d.report", "d4d.report"),
    "view": ("d4d.view", "d4d.view"),
    "viewer.sample": ("d4d.viewer.sample", "d4d.viewer.sample"),
    "viewer.browser": ("d4d.viewer.browser", "d4d.viewer"),
    "select_vlm": ("d4d.select_vlm", "d4d.select_vlm"),
    "realestate10k": ("data_prep.realestate10k", "python -m data_prep.realestate10k"),
    "synthetic": ("data_prep.synthetic", "python -m data_prep.synthetic"),
    "coco": ("data_prep.coco", "python -m data_prep.coco"),
    "images": ("data_prep.images", "python -m data_prep.images"),
    "precompute_latents": ("data_prep.precompute_latents", "data_prep.precompute_latents"),
    "merge": ("data_prep.merge", "python -m data_prep.merge"),
}


def _run(command: str, argv: list[str], capsys) -> tuple[int, list[str]]:
    """``main(argv)`` of ``command`` in this process -> (exit code, non-empty stderr lines)."""
    module = importlib.import_module(PROGS[command][0])
    with pytest.raises(SystemExit) as exc:
        module.main(argv)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return exc.value.code, lines


def _assert_one_line(command: str, code: int, lines: list[str], *needles: str) -> str:
    prog = PROGS[command][1]
    assert code == 2, (code, lines)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{prog}: error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------ numeric flags
def _base(command: str, tmp: Path) -> list[str]:
    """Arguments that parse (inputs need not exist: parsing fails first)."""
    out = str(tmp / "out")
    return {
        "sample_video": ["img.png", "--checkpoint", "none.ckpt", "--out", out],
        "generate": ["img.png", "--fourd", "none.ckpt", "--dynamic", "none.ckpt", "--motion", "zoom_in", "--out", out],
        "reconstruct": ["none.tar", "--out", out],
        "evaluate": ["--shards", "none", "--baseline", "repeat-first", "--out", out],
        "view": ["none"],
        "viewer.sample": [out],
        "viewer.browser": ["none", str(tmp / "shot.png")],
        "select_vlm": ["img.png", "--model", "none"],
        "realestate10k": ["--cameras", "none", "--videos", "none", "--out", out],
        "synthetic": ["--out", out],
        "coco": ["--images", "none", "--captions", "none.json", "--out", out],
        "images": ["--images", "none", "--out", out],
        "precompute_latents": ["--shards", "none", "--tiny", "{}", "--out", out],
    }[command]


BAD_FLAGS = [
    # the cases of the issue
    ("sample_video", ["--fov", "0"], "--fov 0: must be > 0 and < 180"),
    ("sample_video", ["--height", "-8"], "--height -8: must be >= 1"),
    ("sample_video", ["--width", "-8"], "--width -8: must be >= 1"),
    ("sample_video", ["--fps", "nan"], "--fps nan: must be a finite number"),
    ("sample_video", ["--fps", "0"], "--fps 0: must be > 0"),
    ("sample_video", ["--steps", "0"], "--steps 0: must be >= 1"),
    ("sample_video", ["--trajectory-scale", "nan"], "--trajectory-scale nan: must be a finite number"),
    ("generate", ["--fov", "0"], "--fov 0: must be > 0 and < 180"),
    ("generate", ["--max-points", "0"], "--max-points 0: must be >= 1"),
    ("generate", ["--height", "-8"], "--height -8: must be >= 1"),
    ("generate", ["--fps", "nan"], "--fps nan: must be a finite number"),
    ("generate", ["--steps", "0"], "--steps 0: must be >= 1"),
    ("generate", ["--trajectory-scale", "nan"], "--trajectory-scale nan: must be a finite number"),
    ("reconstruct", ["--frames", "0"], "--frames 0: must be >= 2"),
    ("reconstruct", ["--max-points", "0"], "--max-points 0: must be >= 1"),
    # the other numeric flags of each command
    ("sample_video", ["--fov", "180"], "--fov 180: must be > 0 and < 180"),
    ("sample_video", ["--fov", "inf"], "--fov inf: must be a finite number"),
    ("sample_video", ["--frames", "0"], "--frames 0: must be >= 2"),
    ("sample_video", ["--stride", "0"], "--stride 0: must be >= 1"),
    ("sample_video", ["--magnitude", "-1"], "--magnitude -1: must be >= 0"),
    ("sample_video", ["--text-cfg", "nan"], "--text-cfg nan: must be a finite number"),
    ("sample_video", ["--seed", "-1"], "--seed -1: must be >= 0"),
    ("sample_video", ["--frames", "many"], "--frames many: not an integer"),
    ("sample_video", ["--guidance", "cfg=nan"], "--guidance 'cfg=nan': the value must be a finite number"),
    ("generate", ["--fps-factor", "0"], "--fps-factor 0: must be >= 1"),
    ("generate", ["--sr-scale", "0"], "--sr-scale 0: must be > 0"),
    ("generate", ["--optimise-steps", "-1"], "--optimise-steps -1: must be >= 0"),
    ("generate", ["--threads", "0"], "--threads 0: must be >= 1"),
    ("generate", ["--port", "0"], "--port 0: must be in [1, 65535]"),
    ("generate", ["--cfg", "nan"], "--cfg nan: must be a finite number"),
    ("reconstruct", ["--stride", "0"], "--stride 0: must be >= 1"),
    ("reconstruct", ["--index", "-1"], "--index -1: must be >= 0"),
    ("reconstruct", ["--size", "0x8"], "--size 0x8: both sides must be >= 2"),
    ("reconstruct", ["--size", "big"], "--size big: expected HxW"),
    ("reconstruct", ["--depth-size", "0"], "--depth-size 0: must be >= 1"),
    ("reconstruct", ["--steps", "-1"], "--steps -1: must be >= 0"),
    ("evaluate", ["--frames", "0"], "--frames 0: must be >= 2"),
    ("evaluate", ["--max-clips", "0"], "--max-clips 0: must be >= 1"),
    ("evaluate", ["--camera-trials", "-1"], "--camera-trials -1: must be >= 0"),
    ("evaluate", ["--fourd-max-points", "0"], "--fourd-max-points 0: must be >= 1"),
    ("evaluate", ["--samples", "-1"], "--samples -1: must be >= 0"),
    ("view", ["--max-points", "0"], "--max-points 0: must be >= 1"),
    ("view", ["--fps", "nan"], "--fps nan: must be a finite number"),
    ("view", ["--fps", "100"], "--fps 100: must be >= 0.5 and <= 60"),
    ("view", ["--point-size", "0"], "--point-size 0: must be > 0"),
    ("viewer.sample", ["--frames", "0"], "--frames 0: must be >= 1"),
    ("viewer.sample", ["--size", "2"], "--size 2: must be >= 8"),
    ("viewer.browser", ["--frame", "-1"], "--frame -1: must be >= 0"),
    ("select_vlm", ["--max-pixels", "10"], "--max-pixels 10 is below the processor's minimum"),
    ("synthetic", ["--static-fraction", "nan"], "--static-fraction nan: must be a finite number"),
    ("synthetic", ["--clips", "-1"], "--clips -1: must be >= 1"),
    ("realestate10k", ["--workers", "0"], "--workers 0: must be >= 1"),
    ("realestate10k", ["--window", "-1"], "--window -1: must be >= 0"),
    ("realestate10k", ["--stride", "0"], "--stride 0: must be >= 1"),
    ("realestate10k", ["--array-index", "-1"], "--array-index -1: must be >= 0"),
    ("coco", ["--size", "-1"], "--size -1: must be >= 0"),
    ("images", ["--shard-size", "0"], "--shard-size 0: must be >= 1"),
    ("precompute_latents", ["--frames", "0"], "--frames 0: must be >= 1"),
    ("precompute_latents", ["--reverse-prob", "nan"], "--reverse-prob nan: must be a finite number"),
    ("precompute_latents", ["--size", "0", "32"], "--size 0: must be >= 1"),
    ("precompute_latents", ["--batch", "0"], "--batch 0: must be >= 1"),
]


@pytest.mark.parametrize("command, flags, message", BAD_FLAGS,
                         ids=[f"{c}{''.join(f)}" for c, f, _ in BAD_FLAGS])
def test_bad_number_is_one_line_naming_flag_and_value(command, flags, message, tmp_path, capsys):
    code, lines = _run(command, _base(command, tmp_path) + flags, capsys)
    _assert_one_line(command, code, lines, message)
    assert not (tmp_path / "out").exists()


def test_argparse_own_errors_are_one_line_too(tmp_path, capsys):
    code, lines = _run("sample_video", ["img.png", "--out", str(tmp_path / "o")], capsys)
    _assert_one_line("sample_video", code, lines, "the following arguments are required: --checkpoint")
    code, lines = _run("generate", _base("generate", tmp_path) + ["--module", "all"], capsys)
    _assert_one_line("generate", code, lines, "--module: invalid choice: 'all'")


# ------------------------------------------------------------------------------ output paths
# command -> (arguments with OUT standing for the output, "dir" or "file", the flag named in the error)
OUTPUTS = {
    "sample_video": (["img.png", "--checkpoint", "none.ckpt", "--out", "OUT"], "dir", "--out"),
    "generate": (["img.png", "--fourd", "none.ckpt", "--dynamic", "none.ckpt", "--motion", "zoom_in", "--out", "OUT"],
                 "dir", "--out"),
    "export_checkpoint": (["none.ckpt", "OUT"], "file", "OUT"),
    "reconstruct": (["none.tar", "--out", "OUT"], "dir", "--out"),
    "evaluate": (["--shards", "none", "--baseline", "repeat-first", "--out", "OUT"], "dir", "--out"),
    "report": (["--eval", "none", "--out", "OUT"], "dir", "--out"),
    "realestate10k": (["--cameras", "none", "--videos", "none", "--out", "OUT"], "dir", "--out"),
    "synthetic": (["--out", "OUT"], "dir", "--out"),
    "coco": (["--images", "none", "--captions", "none.json", "--out", "OUT"], "dir", "--out"),
    "images": (["--images", "none", "--out", "OUT"], "dir", "--out"),
    "precompute_latents": (["--shards", "none", "--tiny", "{}", "--out", "OUT"], "dir", "--out"),
    "merge": (["OUT"], "dir", "OUT"),
    "viewer.sample": (["OUT"], "dir", "OUT"),
    "viewer.browser": (["none", "OUT"], "file", "OUT"),
}
CASES = ("wrong_kind", "under_a_file", "proc", "read_only")


def _out_path(case: str, kind: str, tmp: Path) -> tuple[Path, str]:
    """(the output path, what the message says) for a case."""
    leaf = "x.pt" if kind == "file" else "out"
    if case == "wrong_kind":
        if kind == "dir":
            (tmp / "a_file").write_text("")
            return tmp / "a_file", "exists and is a file, not a folder"
        (tmp / "a_dir").mkdir()
        return tmp / "a_dir", "is a folder; give the path of a file"
    if case == "under_a_file":
        (tmp / "a_file").write_text("")
        return tmp / "a_file" / "sub" / leaf, f"{tmp / 'a_file'} is a file, so nothing can be created under it"
    if case == "proc":  # unwritable for root too: os.access says yes, creating a file fails
        if not os.path.isdir("/proc/self"):
            pytest.skip("no /proc here")
        return Path("/proc") / f"d4d-test-{leaf}", "/proc is not writable"
    if os.geteuid() == 0:
        pytest.skip("permission bits do not stop root (the /proc case covers an unwritable place for root)")
    ro = tmp / "read_only"
    ro.mkdir()
    ro.chmod(0o500)
    return ro / leaf, f"{ro} is not writable"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", list(OUTPUTS))
def test_unwritable_output_is_one_line_before_any_work(command, case, tmp_path, capsys):
    argv, kind, flag = OUTPUTS[command]
    out, says = _out_path(case, kind, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        code, lines = _run(command, [str(out) if a == "OUT" else a for a in argv], capsys)
    finally:
        if (tmp_path / "read_only").exists():
            (tmp_path / "read_only").chmod(0o700)
    _assert_one_line(command, code, lines, f"{flag} {out}: ", says)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created, no probe left
    if case != "wrong_kind":
        assert not out.exists()


def test_output_checks_accept_new_and_existing_places_and_create_nothing(tmp_path):
    from d4d.utils.paths import check_output_dir, check_output_file

    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert check_output_dir(tmp_path) == tmp_path
    (tmp_path / "old.pt").write_text("")
    assert check_output_file(tmp_path / "old.pt") == tmp_path / "old.pt"  # replaced by the command
    assert check_output_file(tmp_path / "c" / "new.pt") == tmp_path / "c" / "new.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.pt"]
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(UserError, match="dangling symbolic link"):
        check_output_dir(tmp_path / "link" / "x", "--out")
    with pytest.raises(UserError, match=r"^--out .*/: is a folder"):
        check_output_file(f"{tmp_path}/", "--out")


# ------------------------------------------------------------------------------ d4d.fit numbers
@pytest.mark.parametrize("config, message", [
    ({"trainer": {"max_steps": -5}}, "trainer.max_steps -5: must be >= 1, or -1 for no limit"),
    ({"trainer": {"max_steps": 0}}, "trainer.max_steps 0: must be >= 1, or -1 for no limit"),
    ({"trainer": {"max_epochs": -2}}, "trainer.max_epochs -2: must be >= 1, or -1 for no limit"),
    ({"trainer": {"accumulate_grad_batches": 0}}, "trainer.accumulate_grad_batches 0: must be an integer >= 1"),
    ({"trainer": {"limit_val_batches": 1.5}}, "trainer.limit_val_batches 1.5: must be a count >= 0 or a fraction"),
    ({"trainer": {"gradient_clip_val": float("nan")}}, "trainer.gradient_clip_val nan: must be a finite number"),
    ({"data": {"class_path": "X", "init_args": {"num_workers": -1}}},
     "data.init_args.num_workers -1: must be an integer >= 0"),
    ({"data": {"class_path": "X", "init_args": {"batch_size": 0}}},
     "data.init_args.batch_size 0: must be an integer >= 1"),
    ({"data": {"class_path": "X", "init_args": {"val_batch_size": -4}}},
     "data.init_args.val_batch_size -4: must be an integer >= 1"),
    ({"data": {"class_path": "X", "init_args": {"image_size": [0, 32]}}},
     "data.init_args.image_size [0, 32]: sides must be integers >= 1"),
])
def test_fit_numbers_out_of_range(config, message):
    from d4d.utils.validate_fit import check_trainer_and_data_numbers

    with pytest.raises(UserError) as exc:
        check_trainer_and_data_numbers(config)
    assert str(exc.value) == message or str(exc.value).startswith(message)


def test_fit_numbers_in_range_pass():
    from jsonargparse import Namespace

    from d4d.utils.validate_fit import check_trainer_and_data_numbers

    check_trainer_and_data_numbers({"trainer": {"max_steps": -1, "max_epochs": None, "limit_val_batches": 0,
                                                "limit_train_batches": 0.25, "val_check_interval": 100},
                                    "data": {"class_path": "X", "init_args": {"num_workers": 0, "batch_size": 1,
                                                                              "val_batch_size": None}}})
    check_trainer_and_data_numbers(Namespace(trainer=Namespace(max_steps=10, max_epochs=-1),
                                             data=Namespace(class_path="X", init_args=Namespace(num_workers=2))))


@pytest.mark.parametrize("flags, message", [
    (["--trainer.max_steps", "-5"], "trainer.max_steps -5: must be >= 1, or -1 for no limit"),
    (["--data.init_args.num_workers", "-1"], "data.init_args.num_workers -1: must be an integer >= 0"),
])
def test_fit_bad_numbers_one_line(flags, message, tmp_path, capsys, monkeypatch):
    from d4d.fit import main

    monkeypatch.setenv("WANDB_MODE", "disabled")
    recipe = tmp_path / "classifier.yaml"  # shards that do not exist: the numbers must fail first
    recipe.write_text((REPO / "recipes/debug/classifier.yaml").read_text().replace("data/synthetic",
                                                                                   str(tmp_path / "none")))
    with pytest.raises(SystemExit) as exc:
        main([str(recipe), "--run_dir", str(tmp_path / "run"), *flags])
    # a console handler that a library set up during an earlier in-process run writes to that test's
    # closed stderr; Python reports that as a "--- Logging error ---" block, which is the harness's
    err = re.sub(r"--- Logging error ---\n.*?\nArguments: [^\n]*\n", "", capsys.readouterr().err, flags=re.S)
    lines = [ln for ln in err.splitlines() if ln.strip()]  # Lightning may log "Seed set to 0" first
    errors = [ln for ln in lines if "error:" in ln]
    assert exc.value.code == 2 and "Traceback" not in err and errors == lines[-1:], lines
    assert lines[-1].startswith("d4d.fit: error: ") and message in lines[-1], lines
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ synthetic resume
SYN = ["--clips", "6", "--val-clips", "2", "--test-clips", "4", "--frames", "2", "--size", "16", "--shard-size", "2",
       "--heldout", "3", "--static-fraction", "0.5"]


def _tree(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _counting(monkeypatch, fail_after: int | None = None) -> list[str]:
    """Count the clips ``data_prep.synthetic`` renders (and optionally fail after ``fail_after``)."""
    import data_prep.synthetic as syn

    real, rendered = syn.make_sample, []

    def make_sample(task):
        if fail_after is not None and len(rendered) >= fail_after:
            raise RuntimeError("interrupted")  # as a crash or Ctrl-C partway
        rendered.append(f"{task.split}_{task.index}")
        return real(task)

    monkeypatch.setattr(syn, "make_sample", make_sample)
    return rendered


def test_synthetic_rerun_over_a_finished_output_renders_nothing(tmp_path, monkeypatch):
    from data_prep.synthetic import main

    monkeypatch.setenv("TQDM_DISABLE", "1")
    first = main(SYN + ["--out", str(tmp_path / "o")])
    done = _tree(tmp_path / "o")
    rendered = _counting(monkeypatch)
    second = main(SYN + ["--out", str(tmp_path / "o")])
    assert rendered == [] and second == first
    again = _tree(tmp_path / "o")
    unchanged = {"manifest.json", "heldout/labels.json"}  # rewritten, same bytes
    assert {k: v for k, v in again.items() if k not in unchanged} == {k: v for k, v in done.items() if k not in unchanged}
    assert all(again[k][0] == done[k][0] for k in unchanged)


def test_synthetic_interrupted_run_finishes_only_the_missing_groups(tmp_path, monkeypatch):
    from data_prep.synthetic import main

    monkeypatch.setenv("TQDM_DISABLE", "1")
    main(SYN + ["--out", str(tmp_path / "whole")])
    _counting(monkeypatch, fail_after=5)  # groups train 0, 1 done; train group 2 half-written
    with pytest.raises(RuntimeError, match="interrupted"):
        main(SYN + ["--out", str(tmp_path / "o")])
    monkeypatch.undo()
    monkeypatch.setenv("TQDM_DISABLE", "1")
    partial = _tree(tmp_path / "o")
    assert sorted(k for k in partial if k.startswith("train/")) == ["train/shard-000000.tar", "train/shard-000001.tar"]
    assert not (tmp_path / "o" / "manifest.json").exists()
    rendered = _counting(monkeypatch)
    main(SYN + ["--out", str(tmp_path / "o")])
    assert rendered == ["train_4", "train_5", "val_0", "val_1", "test_0", "test_1", "test_2", "test_3"]
    final = _tree(tmp_path / "o")
    for k in ("train/shard-000000.tar", "train/shard-000001.tar"):
        assert final[k] == partial[k]  # kept, not rewritten
    whole = _tree(tmp_path / "whole")
    assert sorted(final) == sorted(whole)
    assert all(final[k][0] == whole[k][0] for k in whole), "resumed output differs from an uninterrupted run"


def test_synthetic_other_arguments_redo_everything_and_drop_stale_files(tmp_path, monkeypatch):
    from data_prep.synthetic import main

    monkeypatch.setenv("TQDM_DISABLE", "1")
    main(SYN + ["--out", str(tmp_path / "o")])
    rendered = _counting(monkeypatch)
    manifest = main(["--clips", "2", "--val-clips", "0", "--test-clips", "1", "--frames", "2", "--size", "16",
                     "--shard-size", "2", "--heldout", "1", "--out", str(tmp_path / "o")])
    assert len(rendered) == 3
    files = sorted(str(p.relative_to(tmp_path / "o")) for p in (tmp_path / "o").rglob("*") if p.is_file())
    assert files == ["heldout/labels.json", "heldout/sample_0.jpg", "manifest.json", "parts/test-000000.json",
                     "parts/train-000000.json", "test/shard-000000.tar", "train/shard-000000.tar"]
    assert manifest["splits"]["train"]["shards"] == ["shard-000000.tar"]
    from d4d.geometry.motions import MOTIONS

    assert json.loads((tmp_path / "o/heldout/labels.json").read_text()) == {"sample_0.jpg": MOTIONS[0]}
