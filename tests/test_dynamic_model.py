"""DynamicWan: tiny random Wan 2.1 I2V parts, zero-init equivalence, loading, camera tokens, LoRA."""
from __future__ import annotations

import pytest
import torch

from d4d.geometry.motions import motion_path
from d4d.models.dynamic import DynamicWan, build_tiny_wan, load_wan, save_wan
from d4d.models.dynamic.camera import group_frames, plucker_tokens
from d4d.utils.errors import UserError

FRAMES, H, W = 5, 32, 32


@pytest.fixture(scope="module")
def parts():
    return build_tiny_wan(seed=0)


def _inputs(model: DynamicWan, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.rand(2, FRAMES, 3, H, W, generator=g)
    c2w = torch.stack([motion_path("turn_left", FRAMES), motion_path("zoom_in", FRAMES)])
    K = torch.tensor([[28.0, 0, 16], [0, 28.0, 16], [0, 0, 1]]).expand(2, 3, 3)
    x0 = model.encode_video(frames)
    cond = model.image_condition(frames[:, 0], FRAMES)
    text = model.encode_text(["a red box on a floor", ""])
    image = model.encode_image(frames[:, 0])
    camera, mask = model.camera_inputs(c2w, K, (H, W))
    noisy = torch.randn(x0.shape, generator=g)
    return noisy, torch.tensor([700.0, 200.0]), cond, text, image, camera, mask


def test_text_embeddings_are_padded_to_512_tokens(parts):
    model = DynamicWan(parts, camera_hidden=16)
    text = model.encode_text(["ab", "a longer prompt"])
    assert text.shape == (2, 512, 32)
    # "ab" + </s> = 3 tokens: the rest is exactly zero, as in Wan's pipeline
    assert text[0, 3:].abs().sum() == 0 and text[0, :3].abs().sum() > 0


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_fresh_camera_branches_reproduce_the_base_model_exactly(lora_rank):
    base = build_tiny_wan(seed=0)
    reference = build_tiny_wan(seed=0).transformer.eval()  # identical weights, no branches
    model = DynamicWan(base, camera_hidden=16, lora_rank=lora_rank).eval()
    noisy, t, cond, text, image, camera, mask = _inputs(model)
    assert mask.shape == (2, 5 * 16, 5 * 16) and 0 < mask.dense().float().mean() < 1
    with torch.no_grad():
        expected = reference(torch.cat([noisy, cond], 1), t, text, encoder_hidden_states_image=image, return_dict=False)[0]
        got = model(noisy, t, cond, text, image, camera, mask)
    assert torch.equal(got, expected)
    # ... and training moves it: after one step on the camera parameters the output changes
    opt = torch.optim.SGD(model.trainable_parameters(), lr=1.0)
    model(noisy, t, cond, text, image, camera, mask).square().mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("camera.projections") for n in grads)
    assert any(n.startswith("epipolar.") and "to_out" in n for n in grads)
    assert not any(n.startswith(("vae.", "text_encoder.", "image_encoder.")) for n in grads)
    assert lora_rank == 0 or any("lora" in n for n in grads)
    opt.step()
    with torch.no_grad():
        assert not torch.equal(model(noisy, t, cond, text, image, camera, mask), expected)


def test_dropped_camera_is_the_base_model(parts):
    model = DynamicWan(parts, camera_hidden=16).eval()
    for p in model.camera.projections.parameters():
        torch.nn.init.normal_(p)
    for branch in model.epipolar.values():
        torch.nn.init.normal_(branch.to_out.weight)
    noisy, t, cond, text, image, camera, mask = _inputs(model)
    with torch.no_grad():
        base = model(noisy, t, cond, text, image)
        dropped = model(noisy, t, cond, text, image, camera, mask, torch.zeros(2))
        kept = model(noisy, t, cond, text, image, camera, mask, torch.tensor([1.0, 0.0]))
    assert torch.equal(dropped, base)
    assert not torch.allclose(kept[0], base[0]) and torch.equal(kept[1], base[1])


def test_load_from_a_saved_diffusers_directory(tmp_path, parts):
    save_wan(parts, tmp_path / "wan")
    loaded = load_wan(str(tmp_path / "wan"))
    for a, b in zip(parts.transformer.state_dict().values(), loaded.transformer.state_dict().values()):
        assert torch.equal(a, b)
    assert loaded.temporal_factor == 1 and loaded.spatial_factor == 4 and loaded.image_size == 32
    assert loaded.tokenizer("ab").input_ids == parts.tokenizer("ab").input_ids
    with pytest.raises(UserError, match="model.backbone.*nope"):
        load_wan(str(tmp_path / "nope"))


def test_plucker_tokens_fold_pixels_and_frames():
    c2w = motion_path("orbit", 9)[None]
    K = torch.tensor([[[20.0, 0, 8], [0, 20.0, 8], [0, 0, 1]]])
    tok = plucker_tokens(c2w, K, (16, 16), token_px=8, temporal_factor=4)
    assert tok.shape == (1, 6 * 64 * 4, 3, 2, 2)
    assert group_frames(9, 4) == [[0, 0, 0, 0], [1, 2, 3, 4], [5, 6, 7, 8]]
    # latent frame 0 repeats frame 0; frame 0 is the identity, so its moments o x d are zero
    assert torch.equal(tok[0, : 6 * 64, 0], tok[0, 6 * 64 : 12 * 64, 0])
    assert tok[0, : 3 * 64, 0].abs().max() == 0
    assert tok[0, : 3 * 64, 2].abs().max() > 0.01
    with pytest.raises(ValueError, match="1 \\+ 4 k"):
        group_frames(8, 4)


def test_train_base_unfreezes_only_the_transformer(parts):
    model = DynamicWan(parts, camera_hidden=16, train_base=True)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"transformer", "camera", "epipolar"}
    assert all(not p.requires_grad for p in model.vae.parameters())
    with pytest.raises(UserError, match="lora_rank"):
        DynamicWan(build_tiny_wan(seed=0), train_base=True, lora_rank=4)


def test_init_from_a_base_checkpoint_recopies_the_epipolar_projections(tmp_path):
    from d4d.modules.dynamic import DynamicVideoModule
    from d4d.utils.resume import init_weights_from

    base = DynamicVideoModule(tiny={}, camera_blocks="none", epipolar_blocks="none", train_base=True, seed=0)
    with torch.no_grad():
        for p in base.model.transformer.parameters():
            p.add_(0.1)  # "pre-trained": differs from the seed-0 weights the next module is built on
    torch.save({"state_dict": base.state_dict()}, tmp_path / "base.ckpt")
    module = DynamicVideoModule(tiny={}, camera_hidden=16, seed=0)
    attn = module.model.transformer.blocks[0].attn1
    assert not torch.equal(module.model.epipolar["0"].to_q.weight, base.model.transformer.blocks[0].attn1.to_q.weight)
    missing, _ = init_weights_from(module, tmp_path / "base.ckpt")
    assert any(k.startswith("model.epipolar.0.to_q") for k in missing)
    assert torch.equal(attn.to_q.weight, base.model.transformer.blocks[0].attn1.to_q.weight)
    assert torch.equal(module.model.epipolar["0"].to_q.weight, attn.to_q.weight)
    assert torch.equal(module.model.epipolar["1"].to_v.bias, module.model.transformer.blocks[1].attn1.to_v.bias)


def test_load_in_the_compute_dtype(tmp_path, parts):
    """frozen parts in bfloat16 (Wan's float32-kept modules stay float32), the VAE float32, and the
    module's trainable weights (branches, LoRA) float32 whatever the frozen dtype."""
    from d4d.models.dynamic.backbone import local_device
    from d4d.modules.dynamic import DynamicVideoModule

    save_wan(parts, tmp_path / "wan")
    loaded = load_wan(str(tmp_path / "wan"), torch.bfloat16, local_device("cpu"))
    assert loaded.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert loaded.transformer.scale_shift_table.dtype == torch.float32  # diffusers' _keep_in_fp32_modules
    assert loaded.text_encoder.shared.weight.dtype == torch.bfloat16
    assert loaded.image_encoder.dtype == torch.bfloat16 and loaded.vae.dtype == torch.float32
    assert local_device("auto") == torch.device("cpu") or torch.cuda.is_available()
    module = DynamicVideoModule(backbone=str(tmp_path / "wan"), frozen_dtype="bfloat16", lora_rank=2,
                                epipolar_blocks=[0])
    frozen = {p.dtype for p in module.model.transformer.parameters() if not p.requires_grad}
    trainable = {n: p.dtype for n, p in module.named_parameters() if p.requires_grad}
    assert torch.bfloat16 in frozen and any("lora" in n for n in trainable)
    assert set(trainable.values()) == {torch.float32}
    with pytest.raises(UserError, match="model.frozen_dtype.*'bf16'"):
        DynamicVideoModule(frozen_dtype="bf16")
    with pytest.raises(UserError, match="train_base.*frozen_dtype to float32"):
        DynamicVideoModule(frozen_dtype="bfloat16", train_base=True)


def test_camera_dropout_is_drawn_on_the_host_and_a_fully_dropped_batch_skips_the_branches(monkeypatch):
    """flow_loss draws the camera dropout on the CPU: DynamicWan knows without a device sync whether any
    clip keeps its camera (epipolar branches skipped when none does); an unknown backend is refused."""
    from d4d.modules.dynamic import DynamicVideoModule

    module = DynamicVideoModule(tiny={}, camera_hidden=16, seed=0, camera_drop=1.0, epipolar_backend="dense")
    assert module.hparams.epipolar_backend == "dense" and module.model.epipolar["0"].backend == "dense"
    g = torch.Generator().manual_seed(0)
    batch = {"frames": torch.rand(2, FRAMES, 3, H, W, generator=g), "caption": ["a", "b"],
             "c2w": torch.stack([motion_path("orbit", FRAMES), motion_path("zoom_in", FRAMES)]),
             "K": torch.tensor([[28.0, 0, 16], [0, 28.0, 16], [0, 0, 1]]).expand(2, 3, 3)}
    keeps, calls = [], []
    forward = module.model.forward
    monkeypatch.setattr(module.model, "forward", lambda *args: keeps.append(args[7]) or forward(*args))
    for branch in module.model.epipolar.values():
        branch.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        module.flow_loss(batch)
        assert keeps[-1].device.type == "cpu" and not keeps[-1].any() and not calls
        module.hparams.camera_drop = 0.0
        module.flow_loss(batch)
    assert keeps[-1].device.type == "cpu" and keeps[-1].all() and len(calls) == len(module.model.epipolar)
    with pytest.raises(UserError, match="model.epipolar_backend: expected one of dense, flex, auto, got 'fast'"):
        DynamicVideoModule(tiny={}, epipolar_backend="fast")


def test_shared_projections_attend_with_attn1s_own_queries_keys_values():
    """epipolar_projections="shared": only registers + output projection train, and the branch equals a
    copy branch whose q/k/v and norms are attn1's (same registers and output weights), so no projection
    is computed twice; a fresh shared branch is still the base model."""
    copy = DynamicWan(build_tiny_wan(seed=0), camera_hidden=16, epipolar_projections="copy").eval()
    shared = DynamicWan(build_tiny_wan(seed=0), camera_hidden=16, epipolar_projections="shared").eval()
    names = {n.split(".", 2)[2] for n, p in shared.named_parameters() if n.startswith("epipolar.") and p.requires_grad}
    assert names == {"registers", "to_out.weight", "to_out.bias"}
    noisy, t, cond, text, image, camera, mask = _inputs(shared)
    reference = build_tiny_wan(seed=0).transformer.eval()
    with torch.no_grad():
        base = reference(torch.cat([noisy, cond], 1), t, text, encoder_hidden_states_image=image, return_dict=False)[0]
        assert torch.equal(shared(noisy, t, cond, text, image, camera, mask), base)
        g = torch.Generator().manual_seed(1)
        for key, branch in shared.epipolar.items():
            mine = copy.epipolar[key]
            attn = copy.transformer.blocks[int(key)].attn1
            attn.norm_q.weight.normal_(1.0, 0.3, generator=g)  # attn1's norms differ from a fresh RMSNorm
            shared.transformer.blocks[int(key)].attn1.norm_q.weight.copy_(attn.norm_q.weight)
            mine.norm_q.load_state_dict(attn.norm_q.state_dict())
            mine.norm_k.load_state_dict(attn.norm_k.state_dict())
            mine.to_out.weight.normal_(0, 0.5, generator=g)
            branch.to_out.load_state_dict(mine.to_out.state_dict())
            branch.registers.copy_(mine.registers)
        got, expected = shared(noisy, t, cond, text, image, camera, mask), copy(noisy, t, cond, text, image, camera, mask)
    assert not torch.allclose(got, base, atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="model.epipolar_projections.*'lowrank'"):
        DynamicWan(build_tiny_wan(seed=0), epipolar_projections="lowrank")


@pytest.mark.parametrize("projections", ["copy", "shared"])
def test_bf16_frozen_weights_train_without_autocast(projections):
    """frozen_dtype bfloat16 under precision 32-true (no autocast): the transformer runs in bf16, the
    float32 branches take and give its dtype, and every trainable weight gets a float32 gradient."""
    from d4d.modules.dynamic import DynamicVideoModule

    module = DynamicVideoModule(tiny={"vae_temporal_downsample": [False, False]}, frozen_dtype="bfloat16",
                                epipolar_projections=projections, camera_hidden=16)
    g = torch.Generator().manual_seed(0)
    batch = {"frames": torch.rand(1, FRAMES, 3, H, W, generator=g), "c2w": motion_path("orbit", FRAMES)[None],
             "K": torch.tensor([[[28.0, 0, 16], [0, 28.0, 16], [0, 0, 1]]]), "caption": ["a room"]}
    loss = module.flow_loss(batch, dropout=False)
    loss.backward()
    trainable = dict((n, p) for n, p in module.model.named_parameters() if p.requires_grad)
    assert torch.isfinite(loss) and all(p.dtype == torch.float32 for p in trainable.values())
    # the zero-initialised outputs (camera projections, epipolar to_out) are what the first step moves
    outputs = [n for n in trainable if n.startswith("camera.projections.") or ".to_out." in n]
    assert len(outputs) == 2 * (2 + 2)  # weight + bias, 2 camera and 2 epipolar blocks
    assert all(trainable[n].grad is not None and trainable[n].grad.abs().sum() > 0 for n in outputs)


def test_shared_projections_under_activation_checkpointing():
    """The captured q/k/v are recaptured when a checkpointed block recomputes: same loss and gradients."""
    from d4d.utils.activation_checkpointing import apply_activation_checkpointing

    models = [DynamicWan(build_tiny_wan(seed=0), camera_hidden=16, epipolar_projections="shared") for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    assert apply_activation_checkpointing(models[1], ["WanTransformerBlock"]) == 2
    grads = []
    for model in models:
        for branch in model.epipolar.values():
            torch.nn.init.constant_(branch.to_out.weight, 0.05)  # non-zero: gradients reach the registers
        noisy, t, cond, text, image, camera, mask = _inputs(model)
        model(noisy, t, cond, text, image, camera, mask).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert any("registers" in n and g.abs().sum() > 0 for n, g in grads[0].items())
    assert grads[0].keys() == {n.replace("_checkpoint_wrapped_module.", "") for n in grads[1]}
    for name, g in grads[1].items():
        torch.testing.assert_close(g, grads[0][name.replace("_checkpoint_wrapped_module.", "")])
