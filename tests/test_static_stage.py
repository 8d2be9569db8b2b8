"""The static stage end to end: the debug recipe trains, writes a ``d4d_stage: static`` checkpoint
and validation videos; the checkpoint generates a path in anchored chunks; the full recipe builds
from tiny local weights; user mistakes are one-line errors."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import REPO, run_module


@pytest.fixture(scope="module")
def trained_run(synthetic_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("static_run")
    recipe = (REPO / "recipes/debug/static.yaml").read_text().replace("data/synthetic", str(synthetic_data))
    path = run_dir / "recipe.yaml"
    path.write_text(recipe)
    run_module("d4d.fit", str(path), "--run_dir", str(run_dir), "--trainer.max_epochs", "1",
               "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--data.init_args.epoch_length", "4",
               "--data.init_args.num_workers", "0", "--model.init_args.val_sample_steps", "2")
    return run_dir


def test_debug_recipe_trains_and_writes_checkpoint_and_videos(trained_run):
    ckpts = sorted((trained_run / "checkpoints").glob("epoch*.ckpt"))
    assert ckpts, list(trained_run.rglob("*"))
    ckpt = torch.load(ckpts[0], map_location="cpu", weights_only=False)
    # epoch_length counts kept (static) windows: 4 windows = 2 batches of 2 = one epoch, then validation
    assert ckpt["d4d_stage"] == "static" and ckpt["global_step"] == 2
    assert ckpt["d4d_static"]["unet_config"]["in_channels"] == 4  # the base layout, before inflation
    videos = list((trained_run / "plots").glob("val_step*.mp4"))
    assert videos and videos[0].stat().st_size > 1000
    from d4d.data.video import decode_mp4

    frames = decode_mp4(videos[0].read_bytes())
    assert frames.shape == (8, 32, 64, 3)  # 8 views, ground truth | generated


def test_checkpoint_generates_a_path_in_anchored_chunks(trained_run):
    from d4d.modules.static import StaticVideoModule
    from d4d.utils.errors import UserError
    from d4d.video.interface import VideoGenerator, VideoRequest
    from d4d.video.paths import resolve_camera_path

    module = StaticVideoModule.from_checkpoint(next((trained_run / "checkpoints").glob("epoch*.ckpt")))
    assert isinstance(module, VideoGenerator) and module.stage == "static"
    camera = resolve_camera_path("orbit", 20, 48, 40)
    image = torch.rand(3, 48, 40)
    calls = []
    result = module.generate(VideoRequest(image=image, camera=camera, seed=3, num_steps=1),
                             progress=lambda done, total, what: calls.append((done, total)))
    chunks = result.info["chunks"]
    assert result.frames.shape == (20, 3, 48, 40) and torch.equal(result.frames[0], image)
    assert sorted(t for c in chunks for t in c["targets"]) == list(range(1, 20))
    assert [c["stage"] for c in chunks] == ["anchor", "between", "between", "between"]
    assert calls[-1] == (len(chunks), len(chunks))
    assert 0 <= result.frames.min() and result.frames.max() <= 1 and result.frames[1:].std() > 0
    again = module.generate(VideoRequest(image=image, camera=resolve_camera_path("orbit", 5, 48, 40), seed=3,
                                         num_steps=1))
    same = module.generate(VideoRequest(image=image, camera=resolve_camera_path("orbit", 5, 48, 40), seed=3,
                                        num_steps=1))
    assert torch.equal(again.frames, same.frames)
    for guidance in ({"cfg": 7.5}, {"cfg": 0.9}, {"camera": 1.0}):
        with pytest.raises(UserError, match="guidance"):
            module.generate(VideoRequest(image=image, camera=camera, guidance=guidance))


def _save_tiny_sd21(root):
    """A tiny model in the layout of the SD 2.1 / unCLIP hub repos: unet/, vae/, image_encoder/."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                         block_out_channels=(16, 16, 32, 32), cross_attention_dim=32, attention_head_dim=2,
                         norm_num_groups=8, use_linear_projection=True).save_pretrained(root / "unet")
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
                  latent_channels=4).save_pretrained(root / "vae")
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=32, patch_size=8,
                                                   projection_dim=24)).save_pretrained(root / "image_encoder")


def test_full_recipe_builds_with_tiny_local_weights(tmp_path):
    from d4d.fit import build_cli
    from d4d.modules.static import StaticVideoModule
    from d4d.utils.activation_checkpointing import count_checkpointed

    _save_tiny_sd21(tmp_path)
    cli = build_cli(str(REPO / "recipes/static.yaml"), [
        "--model.init_args.unet", str(tmp_path), "--model.init_args.vae", str(tmp_path),
        "--model.init_args.image_encoder", str(tmp_path), "--run_dir", str(tmp_path / "run"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "1"])
    model = cli.model
    assert isinstance(model, StaticVideoModule)
    model.configure_model()  # d4d.fit wraps the recipe's activation_checkpointing blocks here
    assert model.unet.unet.conv_in.in_channels == 11 and model.hparams.sample_window == 21
    blocks = model.unet.attention_3d_blocks
    assert blocks and not any(b.startswith(("down_blocks.0", "up_blocks.3")) for b in blocks)
    assert count_checkpointed(model.unet) > 0
    assert isinstance(model.image_encoder.proj, torch.nn.Linear)  # 24-d CLIP -> 32-d cross-attention
    assert cli.trainer.precision == "bf16-mixed"
    views = torch.rand(1, 3, 3, 32, 32)
    c2w = torch.eye(4).repeat(1, 3, 1, 1)
    c2w[:, :, 0, 3] = torch.tensor([0.0, 0.1, 0.2])
    K = torch.tensor([[32.0, 0, 16], [0, 32, 16], [0, 0, 1]]).expand(1, 3, 3, 3)
    loss = model.diffusion_loss({"frames": views, "c2w": c2w, "Ks": K}, torch.tensor([[True, False, False]]))
    loss.backward()
    assert torch.isfinite(loss) and model.unet.unet.conv_in.weight.grad[:, 4:].abs().sum() > 0


def test_bad_3d_block_name_is_a_one_line_error(tmp_path):
    proc = run_module("d4d.fit", "recipes/debug/static.yaml", "--model.init_args.attention_3d",
                      '["down_blocks.7.*"]', "--run_dir", str(tmp_path), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr
    assert "down_blocks.7" in lines[-1] and lines[-1].startswith("d4d.fit: error:")
