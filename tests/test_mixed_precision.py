"""Camera geometry under mixed precision, in-process and fast: geometry is float32 (or float64) whatever
the autocast state; under DeepSpeed the batch transfer leaves cameras in float32; the rules that pick
the strategy, the micro batch size and the activation-checkpointing blocks.
(The same paths run end to end through ``d4d.fit`` in ``tests/test_gpu_path.py``.)"""
from __future__ import annotations

import pytest
import torch

from d4d.geometry.epipolar import epipolar_mask
from d4d.geometry.motions import motion_path
from d4d.geometry.plucker import plucker_rays
from d4d.models.dynamic.epipolar_attention import clip_epipolar_mask


def _camera(height: int = 480, width: int = 832) -> torch.Tensor:
    return torch.tensor([[0.9 * width, 0, width / 2], [0, 0.9 * width, height / 2], [0, 0, 1.0]])


@pytest.mark.parametrize("order", ["moment_first", "direction_first"])
def test_plucker_rays_under_cpu_autocast_equal_float32(order):
    c2w = motion_path("orbit", 5)
    K = _camera(60, 104)
    reference = plucker_rays(c2w, K, 60, 104, order)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # before: the rotation matmul came out bf16 and torch.linalg.cross(float32, bf16) raised
        rays = plucker_rays(c2w, K, 60, 104, order)
    assert rays.dtype == torch.float32
    assert torch.equal(rays, reference)


def test_plucker_rays_of_bf16_cameras_are_float32():
    rays = plucker_rays(motion_path("zoom_in", 3).bfloat16(), _camera(8, 8).bfloat16(), 8, 8)
    assert rays.dtype == torch.float32


def test_epipolar_masks_under_autocast_equal_float32():
    c2w, K = motion_path("orbit", 3), _camera()
    reference = epipolar_mask(c2w, K, (30, 52), 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(epipolar_mask(c2w, K, (30, 52), 16), reference)
        assert torch.equal(clip_epipolar_mask(c2w, K, (480, 832), (30, 52), 16), reference)


@pytest.mark.parametrize("motion", ["orbit", "turn_left"])
def test_bf16_rounded_cameras_flip_epipolar_masks_and_the_deepspeed_transfer_keeps_them(motion):
    """Why cameras must stay float32 through the batch transfer: rounding c2w and K to bf16 (what
    Lightning's DeepSpeed precision plugin does to every floating batch tensor) flips entries of the
    epipolar mask at Wan's 480x832 token grid; d4d's plugin leaves them bit-identical."""
    from lightning.pytorch.plugins.precision import DeepSpeedPrecision

    from d4d.callbacks.strategies import AtomicDeepSpeedStrategy, GeometrySafeDeepSpeedPrecision

    c2w = motion_path(motion, 9)[[0, 4, 8]]  # three latent frames of a 9-frame clip
    K = _camera()
    reference = clip_epipolar_mask(c2w, K, (480, 832), (30, 52), 16)
    rounded = clip_epipolar_mask(c2w.bfloat16().float(), K.bfloat16().float(), (480, 832), (30, 52), 16)
    flipped = (rounded != reference).float().mean().item()
    assert flipped > 1e-4, f"bf16 rounding flipped only {flipped:.2e} of the mask"

    strategy = AtomicDeepSpeedStrategy(config={"zero_optimization": {"stage": 2}})
    strategy.precision_plugin = DeepSpeedPrecision("bf16-mixed")  # what Lightning's connector assigns
    assert isinstance(strategy.precision_plugin, GeometrySafeDeepSpeedPrecision)
    batch = {"frames": torch.rand(1, 3, 3, 8, 8), "c2w": c2w[None], "K": K[None], "Ks": K.expand(1, 3, 3, 3),
             "depth": torch.rand(1, 3, 8, 8), "caption": ["a"], "has_depth": torch.tensor([True])}
    moved = strategy.precision_plugin.convert_input(batch)
    assert moved["frames"].dtype == torch.bfloat16  # everything else is cast as Lightning casts it
    for key in ("c2w", "K", "Ks", "depth"):
        assert moved[key].dtype == torch.float32 and torch.equal(moved[key], batch[key]), key
    assert moved["caption"] == ["a"] and moved["has_depth"].dtype == torch.bool


def test_batch_norm_statistics_follow_bf16_weights():
    """DeepSpeed >= 0.19.8 casts parameters but not buffers; batch norm then refuses bf16 weights
    with float32 running statistics. The strategy matches them."""
    from d4d.callbacks.strategies import match_norm_statistics

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.LayerNorm(6))
    for p in net.parameters():
        p.data = p.data.bfloat16()
    x = torch.rand(2, 3, 8, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError):
        net[1](net[0](x))
    assert match_norm_statistics(net) == 1
    assert net[1].running_mean.dtype == torch.bfloat16
    assert torch.isfinite(net[1](net[0](x)).float()).all()


def test_micro_batch_size_comes_from_the_data_module():
    from d4d.data.clip_datamodule import ClipDataModule
    from d4d.data.fourd_datamodule import FourDDataModule
    from d4d.data.motion_datamodule import MotionImageDataModule

    assert FourDDataModule("x", batch_size=6).micro_batch_size == 6
    assert ClipDataModule("x", batch_size=3).micro_batch_size == 3
    assert MotionImageDataModule("x", n_way=8, k_shot=5, n_query=4).micro_batch_size == 72


def test_frozen_depth_model_is_not_in_the_state_dict():
    """Clips without depth build a Depth Anything model on first use; a checkpoint written after that
    must still load into a fresh module (strict), and old checkpoints that hold it still load."""
    from d4d.modules.fourdgen import FourDGenModule

    tiny = {"type": "vit", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 64, "image_size": 32, "patch_size": 8}
    module = FourDGenModule(encoder_config=tiny, dec_dim=32, dec_depth=1, dec_heads=2,
                            init_depth_config={})
    keys = set(module.state_dict())
    module.depth_model()
    assert set(module.state_dict()) == keys
    fresh = FourDGenModule(encoder_config=tiny, dec_dim=32, dec_depth=1, dec_heads=2,
                           init_depth_config={})
    fresh.load_state_dict(module.state_dict(), strict=True)
    old = {"state_dict": {**module.state_dict(), "_depth_model.net.head.conv1.weight": torch.zeros(1)}}
    fresh.on_load_checkpoint(old)
    fresh.load_state_dict(old["state_dict"], strict=True)
