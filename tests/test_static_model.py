"""The static module's networks: inflation parity, view mixing, pose normalisation, chunk plan,
guidance checks and the reprojection-consistency measure."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from d4d.geometry.cameras import make_pose
from d4d.models.static.conditioning import normalize_poses
from d4d.models.static.consistency import reprojection_error
from d4d.models.static.sampling import check_guidance, plan_chunks, view_guidance_scales
from d4d.models.static.unet import MultiViewUNet
from d4d.utils.errors import UserError

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), mid_block_type="UNetMidBlock2DCrossAttn",
                 cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True)


def _base():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(TINY_UNET).eval()


def _randomize_new_weights(model: MultiViewUNet) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "view_attn" in name or "film" in name:
                p.normal_(0, 0.2)
        model.unet.conv_in.weight[:, 4:].normal_(0, 0.2)


def test_step0_single_view_reproduces_base_model():
    base = _base()
    model = MultiViewUNet(copy.deepcopy(base), ["*"], view_attention=True, plucker_film=True).eval()
    assert model.unet.conv_in.in_channels == 4 + 1 + 6
    x, t, ctx = torch.randn(2, 1, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 1, 32)
    with torch.no_grad():
        ref = base(x[:, 0], t, encoder_hidden_states=ctx).sample
        out = model(x, t, torch.tensor([[1.0], [0.0]]), torch.randn(2, 1, 6, 8, 8), ctx)[:, 0]
    assert torch.equal(out, ref)
    _randomize_new_weights(model)  # the parity must come from the zero init, not from a no-op
    with torch.no_grad():
        out = model(x, t, torch.tensor([[1.0], [0.0]]), torch.randn(2, 1, 6, 8, 8), ctx)[:, 0]
    assert (out - ref).abs().max() > 1e-3


@pytest.mark.parametrize("attention_3d,view_attention,mixes", [
    (["*"], False, True),             # 3D attention alone couples the views from step 0
    ([], True, True),                 # 1D view attention (trained weights) couples them
    ([], False, False),               # neither: views are independent images
])
def test_views_interact_only_through_view_attention(attention_3d, view_attention, mixes):
    model = MultiViewUNet(_base(), attention_3d, view_attention=view_attention, plucker_film=False).eval()
    _randomize_new_weights(model)
    x, t, ctx = torch.randn(1, 3, 4, 8, 8), torch.tensor([500]), torch.randn(1, 1, 32)
    rays, given = torch.randn(1, 3, 6, 8, 8), torch.tensor([[1.0, 0.0, 0.0]])
    x2 = x.clone()
    x2[:, 2] += 1.0  # change the last view only
    with torch.no_grad():
        a, b = model(x, t, given, rays, ctx), model(x2, t, given, rays, ctx)
    changed = (a[:, 0] - b[:, 0]).abs().max().item()
    assert (changed > 1e-4) == mixes, changed
    assert (a[:, 2] - b[:, 2]).abs().max() > 1e-3


def test_unknown_3d_block_is_a_user_error():
    with pytest.raises(UserError, match="down_blocks.9"):
        MultiViewUNet(_base(), ["down_blocks.9.*"])


def test_normalize_poses_follows_seva():
    torch.manual_seed(1)
    axis = torch.nn.functional.normalize(torch.randn(4, 3, dtype=torch.float64), dim=-1) * 0.3
    zero = torch.zeros(4, dtype=torch.float64)
    rot = torch.linalg.matrix_exp(torch.stack([zero, -axis[:, 2], axis[:, 1], axis[:, 2], zero,
                                               -axis[:, 0], -axis[:, 1], axis[:, 0], zero], -1).view(4, 3, 3))
    c2w = make_pose(rot.double(), torch.randn(4, 3).double() * 5)[None]
    out = normalize_poses(c2w, torch.tensor([2]), camera_scale=2.0)
    assert torch.allclose(out[0, 2, :3, :3], torch.eye(3, dtype=out.dtype), atol=1e-9)
    assert torch.allclose(out[0, :, :3, 3].mean(0), torch.zeros(3, dtype=out.dtype), atol=1e-9)
    assert math.isclose(out[0, 2, :3, 3].norm().item(), 2.0, rel_tol=1e-9)
    # relative geometry is kept up to the scale: rotations between cameras unchanged
    rel_in = torch.linalg.inv(c2w[0, 0]) @ c2w[0, 3]
    rel_out = torch.linalg.inv(out[0, 0]) @ out[0, 3]
    assert torch.allclose(rel_in[:3, :3], rel_out[:3, :3], atol=1e-9)
    scale = 2.0 / (c2w[0, 2, :3, 3] - c2w[0, :, :3, 3].mean(0)).norm()
    assert torch.allclose(rel_out[:3, 3], rel_in[:3, 3] * scale, atol=1e-8)
    # a pure rotation (all centres equal) is not scaled
    still = make_pose(rot.double(), torch.zeros(4, 3).double())[None]
    assert torch.isfinite(normalize_poses(still, torch.tensor([0]))).all()


@pytest.mark.parametrize("frames,window", [(80, 8), (80, 21), (21, 21), (5, 8), (30, 4)])
def test_plan_chunks_covers_every_frame_once(frames, window):
    chunks = plan_chunks(frames, window)
    targets = [t for c in chunks for t in c.targets]
    assert sorted(targets) == list(range(1, frames)) and len(targets) == len(set(targets))
    done = {0}
    for chunk in chunks:  # every given view exists before the chunk that uses it
        assert set(chunk.given) <= done and len(chunk.given) + len(chunk.targets) <= window
        done |= set(chunk.targets)


def test_guidance_range_is_enforced():
    assert check_guidance(None, 4.0, 1.2) == (4.0, 1.2)
    assert check_guidance({"cfg": 7.0}, 4.0, 1.2) == (7.0, 1.2)
    for bad in ({"cfg": 7.5}, {"cfg": 0.5}, {"cfg_min": 0.9}, {"cfg": 2.0, "cfg_min": 3.0}, {"text": 5.0}):
        with pytest.raises(UserError, match="guidance"):
            check_guidance(bad, 4.0, 1.2)


def test_view_guidance_is_lower_near_the_given_camera():
    c2w = torch.eye(4).repeat(4, 1, 1)
    c2w[:, 0, 3] = torch.tensor([0.0, 0.05, 0.3, 2.0])
    scales = view_guidance_scales(c2w, torch.tensor([True, False, False, False]), 4.0, 1.2)
    assert scales[0] == 1.2 and scales[3] == 4.0 and 1.2 < scales[1] < scales[2] < 4.0


def test_reprojection_error_prefers_consistent_views(synthetic_data):
    from d4d.data.clip_datamodule import ClipDataModule

    val = str(synthetic_data / "val")
    dm = ClipDataModule(val, val_shards=val, num_frames=4, image_size=(32, 32), static_only=True,
                        batch_size=1, num_workers=0)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    frames, depth, K, c2w = batch["frames"][0], batch["depth"][0], batch["Ks"][0], batch["c2w"][0]
    true_err = reprojection_error(frames, depth, K, c2w).item()
    shuffled = reprojection_error(frames.flip(0), depth, K, c2w).item()
    noisy = reprojection_error((frames + 0.2 * torch.randn_like(frames)).clamp(0, 1), depth, K, c2w).item()
    assert true_err < 0.05 and true_err < noisy and true_err < shuffled


def test_euler_sampler_recovers_the_data_with_an_oracle_denoiser():
    """With the exact v-prediction of known clean latents, 20 Euler steps land on them; given views
    stay untouched. Catches wrong input scaling or a wrong prediction type in the sampler."""
    from diffusers import EulerDiscreteScheduler

    from d4d.models.static.sampling import sample_window
    from d4d.modules.static import SD21_SCHEDULER

    scheduler = EulerDiscreteScheduler.from_config(SD21_SCHEDULER, timestep_spacing="linspace")
    clean = torch.randn(1, 3, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    given = torch.tensor([True, False, False])

    def oracle(x_in, t, cond):
        sigma = scheduler.sigmas[scheduler.step_index]
        alpha = 1 / (sigma ** 2 + 1) ** 0.5
        s = sigma * alpha
        eps = (x_in - alpha * clean) / s
        return alpha * eps - s * clean

    out = sample_window(oracle, scheduler, clean, given, torch.ones(3), 20, torch.Generator().manual_seed(1))
    assert torch.equal(out[:, 0], clean[:, 0])
    assert (out[:, 1:] - clean[:, 1:]).abs().max() < 1e-3
