"""The dynamic stage: the full recipe on tiny local Wan weights, checkpoints, guidance, generate()."""
from __future__ import annotations

import pytest
import torch

from d4d.fit import build_cli
from d4d.models.dynamic import build_tiny_wan, save_wan
from d4d.modules.dynamic import DynamicVideoModule
from d4d.utils.activation_checkpointing import count_checkpointed
from d4d.utils.errors import UserError
from d4d.video.interface import VideoGenerator, VideoRequest
from d4d.video.paths import resolve_camera_path
from tests.conftest import REPO


@pytest.fixture(scope="module")
def tiny_wan_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("wan") / "tiny-wan-i2v"
    save_wan(build_tiny_wan(seed=1), path)
    return path


def test_full_recipe_builds_on_tiny_local_weights(tiny_wan_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cli = build_cli(str(REPO / "recipes" / "dynamic.yaml"), [
        "--model.init_args.backbone", str(tiny_wan_dir), "--model.init_args.camera_hidden", "16",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--deepspeed", "none",
        "--run_dir", str(tmp_path / "run")])
    model, trainer = cli.model, cli.trainer
    assert count_checkpointed(model.model.transformer) == 0  # applied at configure_model, by d4d.fit
    model.configure_model()
    assert isinstance(model, DynamicVideoModule) and isinstance(model, VideoGenerator)
    assert model.model.camera_blocks == [0, 1] and model.model.epipolar_blocks == [0, 1] and model.model.occlusion
    assert (model.hparams.text_cfg, model.hparams.camera_cfg, model.hparams.num_steps) == (5.5, 1.0, 25)
    assert count_checkpointed(model.model.transformer) == 2
    assert trainer.accumulate_grad_batches == 8 and trainer.gradient_clip_val == 0.5
    assert cli.datamodule.hparams.num_frames == 49 and list(cli.datamodule.hparams.image_size) == [480, 832]
    assert all(not p.requires_grad for p in model.model.vae.parameters())


def test_tiny_and_backbone_together_is_a_user_error(tiny_wan_dir):
    with pytest.raises(UserError, match="model.tiny"):
        DynamicVideoModule(backbone=str(tiny_wan_dir), tiny={})
    with pytest.raises(UserError, match="model.camera_blocks"):
        DynamicVideoModule(tiny={}, camera_blocks=[7])


def _request(**kw) -> VideoRequest:
    torch.manual_seed(0)
    camera = resolve_camera_path("turn_right", 5, 32, 32)
    return VideoRequest(image=torch.rand(3, 40, 40), camera=camera, prompt="a box", num_steps=2, **kw)


def test_checkpoint_keeps_only_trained_weights_and_reloads(tiny_wan_dir, tmp_path):
    module = DynamicVideoModule(backbone=str(tiny_wan_dir), camera_hidden=16).eval()
    for p in module.model.camera.projections.parameters():
        torch.nn.init.normal_(p, std=0.1)
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    assert ckpt["d4d_stage"] == "dynamic"
    assert not any(k.startswith(("model.vae.", "model.text_encoder.", "model.transformer.")) for k in ckpt["state_dict"])
    assert any(k.startswith("model.camera.") for k in ckpt["state_dict"])
    torch.save(ckpt, tmp_path / "dyn.ckpt")
    loaded = DynamicVideoModule.from_checkpoint(tmp_path / "dyn.ckpt")
    a, b = module.generate(_request(seed=3)), loaded.generate(_request(seed=3))
    assert a.frames.shape == (5, 3, 32, 32) and torch.equal(a.frames, b.frames)
    assert a.info["guidance"] == {"text": 5.5, "camera": 1.0} and a.info["steps"] == 2
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(UserError, match="not a dynamic-stage checkpoint"):
        DynamicVideoModule.from_checkpoint(tmp_path / "other.ckpt")


def test_guidance_terms_are_separate_and_checked():
    module = DynamicVideoModule(tiny={}, camera_hidden=16).eval()
    for p in module.model.camera.projections.parameters():
        torch.nn.init.normal_(p, std=0.2)
    plain = module.generate(_request(guidance={"text": 1.0, "camera": 1.0})).frames
    cam = module.generate(_request(guidance={"text": 1.0, "camera": 3.0})).frames
    text = module.generate(_request(guidance={"text": 5.5, "camera": 1.0})).frames
    assert not torch.equal(plain, cam) and not torch.equal(plain, text)
    with pytest.raises(UserError, match="unknown terms \\['cfg'\\]"):
        module.generate(_request(guidance={"cfg": 4.0}))
    with pytest.raises(UserError, match="text=-1"):
        module.generate(_request(guidance={"text": -1.0}))
