"""Trust boundaries: a file handed to d4d never runs code when read, and names read from data never
become paths outside the output directory."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from d4d.utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this creates ``marker``: what a crafted checkpoint would do with ``os.system``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _payload_checkpoint(path: Path, marker: Path, **extra) -> Path:
    blob = {"state_dict": {"model.w": torch.zeros(2)}, "d4d_stage": "dynamic", "epoch": 0,
            "hyper_parameters": Payload(marker), **extra}
    torch.save(blob, path)
    return path


def _payload_deepspeed_dir(path: Path, marker: Path) -> Path:
    """A DeepSpeed checkpoint directory (as Lightning writes one) whose model-state file carries the payload."""
    (path / "checkpoint").mkdir(parents=True)
    (path / "latest").write_text("checkpoint")
    torch.save({"module": {"w": torch.zeros(2)}, "buffer_names": [], "param_shapes": [{"w": torch.Size([2])}],
                "payload": Payload(marker), "d4d_stage": "dynamic"},
               path / "checkpoint" / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"zero_stage": 2, "payload": Payload(marker)}},
               path / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return path


def test_payload_really_runs_with_a_plain_load(tmp_path):
    """The crafted file is live: an unguarded ``torch.load`` creates the marker."""
    marker = tmp_path / "pwned"
    path = _payload_checkpoint(tmp_path / "evil.ckpt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def _loaders():
    from d4d.data.clip_datamodule import _LatentFiles
    from d4d.export_checkpoint import export
    from d4d.fourd.scene import load_scene
    from d4d.utils.checkpoints import read_checkpoint
    from d4d.utils.resume import read_state_dict

    def latents(path):
        next(iter(_LatentFiles([str(path)], shuffle=False, seed=0, repeat=False)))

    return {
        "read_checkpoint": read_checkpoint,
        "init_from": read_state_dict,
        "export_checkpoint": lambda p: export(p, p.parent / "out.pt"),
        "load_scene": load_scene,
        "precomputed_latents": latents,
    }


@pytest.mark.parametrize("loader", ["read_checkpoint", "init_from", "export_checkpoint", "load_scene",
                                    "precomputed_latents"])
def test_pickle_payload_refused_by_every_file_loader(tmp_path, loader):
    marker = tmp_path / "pwned"
    path = _payload_checkpoint(tmp_path / "evil.ckpt", marker, d4d_scene4d=3)
    with pytest.raises(UserError, match=r"refused to load: it asks to run or build the Python object"):
        _loaders()[loader](path)
    assert not marker.exists()
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("loader", ["init_from", "export_checkpoint"])
def test_pickle_payload_in_a_deepspeed_directory_refused(tmp_path, loader):
    pytest.importorskip("deepspeed")
    marker = tmp_path / "pwned"
    path = _payload_deepspeed_dir(tmp_path / "evil.ckpt", marker)
    with pytest.raises(UserError, match="refused to load"):
        _loaders()[loader](path)
    assert not marker.exists()


def test_deepspeed_resume_reads_weights_only(tmp_path):
    """The file reads DeepSpeed's engine makes on resume (its checkpoint engine asks for
    weights_only=False) are weights-only inside the strategy's guard."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from d4d.utils.safe_load import weights_only_loads

    marker = tmp_path / "pwned"
    path = _payload_checkpoint(tmp_path / "evil.pt", marker)
    with weights_only_loads(), pytest.raises(pickle.UnpicklingError):
        TorchCheckpointEngine().load(str(path), map_location="cpu")
    assert not marker.exists()
    assert torch.load is not None and torch.load.__name__ == "load"  # the guard is removed afterwards


def test_deepspeed_checkpoint_classes_still_load(tmp_path):
    """The data classes DeepSpeed pickles (loss scaler, ZeRO stage enum, fragment address) pass."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from d4d.utils.safe_load import load_tensors

    torch.save({"scaler": LossScaler(1.0), "stage": ZeroStageEnum.gradients,
                "frag": fragment_address(numel=4, start=0), "t": torch.ones(2)}, tmp_path / "ds.pt")
    blob = load_tensors(tmp_path / "ds.pt")
    assert blob["stage"] == ZeroStageEnum.gradients and blob["frag"].numel == 4
    assert blob["scaler"].cur_scale == 1.0


@pytest.mark.parametrize("command", [
    ("d4d.select", ["{dir}/image.png", "--checkpoint", "{ckpt}"]),
    ("d4d.fit", ["{dir}/classifier.yaml", "--init_from", "{ckpt}", "--run_dir", "{dir}/run",
                 "--trainer.logger", "false"]),
], ids=["select", "fit_init_from"])
def test_commands_refuse_a_payload_checkpoint_in_one_line(tmp_path, capsys, command, synthetic_data):
    """A clean checkout has no data/synthetic: the recipe points at the session's shards, so the
    refusal (not a missing shard) is what stops the run."""
    import importlib

    module, args = command
    marker = tmp_path / "pwned"
    ckpt = _payload_checkpoint(tmp_path / "evil.ckpt", marker)
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "image.png")
    recipe = (REPO / "recipes/debug/classifier.yaml").read_text().replace("data/synthetic", str(synthetic_data))
    (tmp_path / "classifier.yaml").write_text(recipe)
    args = [a.format(ckpt=ckpt, dir=tmp_path) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "refused to load" in err[-1] and "Traceback" not in "\n".join(err)
    assert not marker.exists()


def _retag_shard(src: Path, dst: Path, ids: list[str]) -> None:
    """Copy the tar shard ``src`` to ``dst`` with the clip ids of its samples (meta.json) replaced
    by ``ids`` in turn: a shard as someone hostile could hand over."""
    import io
    import json
    import tarfile

    keys: dict[str, str] = {}
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for member in tin.getmembers():
            data = tin.extractfile(member).read()
            key, _, field = member.name.partition(".")
            if field == "meta.json":
                keys.setdefault(key, ids[len(keys) % len(ids)])
                meta = json.loads(data)
                meta["clip_id"] = keys[key]
                data = json.dumps(meta).encode()
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


def test_evaluate_writes_nothing_outside_out_for_hostile_clip_ids(synthetic_data, tmp_path, capsys):
    from d4d.evaluate import main

    shards = tmp_path / "a" / "b" / "shards"
    shards.mkdir(parents=True)
    hostile = ["../../../escaped", "/tmp/d4d_abs_escape_test", "sub/dir\nname", ".."]
    _retag_shard(sorted((synthetic_data / "test").glob("*.tar"))[0], shards / "shard-000000.tar", hostile)
    out = tmp_path / "a" / "b" / "out"
    before = {p for p in tmp_path.rglob("*")}
    main(["--shards", str(shards), "--out", str(out), "--baseline", "repeat-first", "--max-clips", "4",
          "--covisibility", "none", "--lpips", "off", "--wandb", "disabled", "--samples", "4"])
    after = {p for p in tmp_path.rglob("*")} - before
    assert after and all(p == out or out in p.parents for p in after), sorted(map(str, after - {out}))
    assert not Path("/tmp/d4d_abs_escape_test.mp4").exists()
    videos = sorted((out / "samples" / "repeat-first").iterdir())
    assert len(videos) == 4 and all(v.suffix == ".mp4" and v.stat().st_size > 0 for v in videos)
    import csv

    rows = list(csv.DictReader(open(out / "per_clip.csv")))
    assert [r["clip_id"] for r in rows] == hostile  # the table keeps the ids as the data gives them


@pytest.mark.parametrize("name, expected", [("clip_0001", "clip_0001"), ("video.v2", "video.v2")])
def test_safe_filename_keeps_plain_names(name, expected):
    from d4d.utils.names import safe_filename

    assert safe_filename(name) == expected


@pytest.mark.parametrize("name", ["../../x", "/etc/passwd", "a/b", "..", ".", "", "x\x00y", "a\nb", "C:\\x", ".hidden"])
def test_safe_filename_is_one_harmless_component(name, tmp_path):
    from d4d.utils.names import safe_filename

    safe = safe_filename(name)
    assert safe not in ("", ".", "..") and not safe.startswith(".")
    assert (tmp_path / safe).resolve().parent == tmp_path.resolve()
    assert all(c.isalnum() or c in "._-" for c in safe)
    assert safe_filename(name) != safe_filename(name + "_")  # distinct ids stay distinct


def test_coco_file_name_cannot_read_outside_the_image_folder(tmp_path):
    """An annotation's ``file_name`` is data: ``../secret.png`` or an absolute path is rejected, not
    read from outside ``--images`` and packed into a shard."""
    import json

    import numpy as np
    from PIL import Image

    from data_prep import coco

    images = tmp_path / "val2017"
    images.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(images / "000000000001.jpg")
    Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(tmp_path / "secret.png")
    (images / "link.png").symlink_to(tmp_path / "secret.png")
    names = ["000000000001.jpg", "../secret.png", str(tmp_path / "secret.png"), "link.png"]
    caps = {"images": [{"id": i + 1, "file_name": n} for i, n in enumerate(names)],
            "annotations": [{"id": i, "image_id": i + 1, "caption": "x"} for i in range(len(names))]}
    (tmp_path / "captions_val2017.json").write_text(json.dumps(caps))
    manifest = coco.main(["--images", str(images), "--captions", str(tmp_path / "captions_val2017.json"),
                          "--out", str(tmp_path / "out"), "--size", "16"])
    assert manifest["accepted"] == 1
    assert sorted(r["id"] for r in manifest["rejected"]) == sorted(names[1:])
    assert {r["reason"] for r in manifest["rejected"]} == {"file_name leaves the image folder"}


class _FailingStream(torch.utils.data.IterableDataset):
    def __iter__(self):
        raise UserError("precomputed latents x.pt: refused to load: it asks to run 'io.open'")


def test_user_error_from_a_dataloader_worker_stays_one_line():
    """torch rebuilds a worker's exception from the worker's formatted traceback; the UserError the
    entry point prints is still the original one line."""
    loader = torch.utils.data.DataLoader(_FailingStream(), num_workers=1, batch_size=None)
    with pytest.raises(UserError) as info:
        next(iter(loader))
    assert str(info.value) == "precomputed latents x.pt: refused to load: it asks to run 'io.open'"


def test_deepspeed_is_imported_only_for_files_that_need_it(tmp_path):
    """Reading a plain checkpoint does not import DeepSpeed (seconds, and a warning on stdout that
    commands like d4d.select would print); a DeepSpeed file still loads in a fresh process."""
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    torch.save({"t": torch.ones(1)}, tmp_path / "plain.pt")
    torch.save({"scaler": LossScaler(2.0)}, tmp_path / "ds.pt")
    code = ("import sys; from d4d.utils.safe_load import load_tensors; "
            f"load_tensors({str(tmp_path / 'plain.pt')!r}); print('deepspeed' in sys.modules); "
            f"print(load_tensors({str(tmp_path / 'ds.pt')!r})['scaler'].cur_scale)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == "False" and out.splitlines()[-1] == "2.0"
