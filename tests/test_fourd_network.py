"""The reconstruction network, its loss (reference.md section 7) and validation metrics."""
from __future__ import annotations

import math

import pytest
import torch

from d4d.fourd.heads import postprocess
from d4d.fourd.losses import depth_metrics, gt_points, point_error, reconstruction_loss, rotation_to_quaternion
from d4d.fourd.network import ReconstructionNet
from d4d.geometry.cameras import make_pose

TINY_VIT = {"type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 64, "image_size": 32, "patch_size": 8}


def _net(head: str) -> ReconstructionNet:
    args = {"features": 16, "layer_dims": [8, 16, 32, 32]} if head == "dpt" else None
    return ReconstructionNet(None, TINY_VIT, dec_dim=32, dec_depth=2, dec_heads=2, head=head, head_args=args)


def _clip(b=2, f=3, h=16, w=24):
    c2w = torch.eye(4).repeat(b, f, 1, 1)
    c2w[:, :, 0, 3] = torch.linspace(0, 0.5, f)
    K = torch.tensor([[20.0, 0, w / 2], [0, 20.0, h / 2], [0, 0, 1]]).repeat(b, f, 1, 1)
    depth = 2 + torch.rand(b, f, h, w)
    return c2w, K, depth


@pytest.mark.parametrize("head", ["linear", "dpt"])
def test_network_outputs_per_pixel_maps_at_any_aspect(head):
    net = _net(head)
    frames = torch.rand(2, 3, 3, 16, 40)
    c2w, K, _ = _clip(2, 3, 16, 40)
    out = net(frames, c2w, K)
    assert out["local"].shape == out["world"].shape == (2, 3, 16, 40, 3)
    assert out["conf"].shape == (2, 3, 16, 40) and bool((out["conf"] > 1).all())
    assert out["pose"].shape == (2, 3, 7)
    assert torch.allclose(out["pose"][..., 3:].norm(dim=-1), torch.ones(2, 3), atol=1e-5)
    with pytest.raises(ValueError, match="patch size 8"):
        net(torch.rand(1, 2, 3, 20, 24), c2w[:1, :2], K[:1, :2])


def test_pose_tokens_change_the_prediction():
    torch.manual_seed(0)
    net = _net("linear")
    torch.nn.init.normal_(net.ray_embed.weight, std=0.1)  # starts at zero; give it some weight
    frames = torch.rand(1, 3, 3, 16, 16)
    c2w, K, _ = _clip(1, 3, 16, 16)
    moved = c2w.clone()
    moved[:, 2, :3, 3] = torch.tensor([0.0, 0.4, 0.3])
    assert not torch.allclose(net(frames, c2w, K)["world"], net(frames, moved, K)["world"])


def test_head_postprocess_conventions():
    raw = torch.zeros(1, 1, 10, 1, 1)
    raw[0, 0, 0:3, 0, 0] = torch.tensor([0.0, 0.0, math.log(3.0)])  # expm1(log 3) = 2
    out = postprocess(raw)
    assert torch.allclose(out["local"][0, 0, 0, 0], torch.tensor([0.0, 0.0, 2.0]), atol=1e-6)
    assert torch.allclose(out["conf"], torch.full((1, 1, 1, 1), 2.0))  # 1 + exp(0)


def _perfect(depth, K, c2w, conf_logit=0.0):
    local, world, _ = gt_points(depth, K, c2w)
    conf = torch.full(depth.shape, 1 + math.exp(conf_logit))
    return {"local": local, "world": world, "conf": conf, "pose": torch.zeros(*depth.shape[:2], 7),
            "rgb": torch.zeros(*depth.shape[:2], 3, *depth.shape[-2:])}


def test_loss_matches_formula_and_normalisation():
    c2w, K, depth = _clip()
    metric = torch.tensor([False, False])
    pred = _perfect(depth, K, c2w)
    out = reconstruction_loss(pred, depth, K, c2w, metric)
    assert torch.allclose(out["loss"], torch.tensor(-2 * 0.2 * math.log(2.0)), atol=1e-5)  # zero error
    scaled = dict(pred, local=pred["local"] * 3, world=pred["world"] * 3)
    assert torch.allclose(reconstruction_loss(scaled, depth, K, c2w, metric)["reg"], torch.tensor(0.0), atol=1e-5)
    # metric samples: the prediction is divided by the ground truth's factor, so scale is penalised
    assert reconstruction_loss(scaled, depth, K, c2w, torch.tensor([True, True]))["reg"] > 1.0
    noisy = dict(pred, world=pred["world"] + 0.3)
    assert reconstruction_loss(noisy, depth, K, c2w, metric)["loss"] > out["loss"]


def test_loss_ignores_invalid_pixels_and_has_pose_term():
    c2w, K, depth = _clip()
    pred = _perfect(depth, K, c2w)
    depth2 = depth.clone()
    depth2[:, :, :4] = 0
    pred["world"][:, :, :4] += 100.0
    out = reconstruction_loss(pred, depth2, K, c2w, torch.tensor([False, False]), pose_weight=1.0)
    assert out["reg"] < 1e-4
    assert out["pose"] > 0  # the zero pose prediction is wrong for the moving frames


def test_rotation_to_quaternion():
    angle = 0.7
    R = torch.tensor([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    q = rotation_to_quaternion(R)
    assert torch.allclose(q, torch.tensor([math.cos(angle / 2), 0, 0, math.sin(angle / 2)]), atol=1e-5)
    assert make_pose(R, torch.zeros(3)).shape == (4, 4)


def test_depth_metrics_and_point_error_are_scale_aligned():
    gt = 1 + torch.rand(2, 3, 8, 8)
    m = depth_metrics(gt * 5, gt)
    assert torch.allclose(m["abs_rel"], torch.zeros(2), atol=1e-5) and torch.allclose(m["delta1"], torch.ones(2))
    bad = depth_metrics(torch.ones_like(gt), gt)
    assert bool((bad["abs_rel"] > 0.05).all())
    pts = torch.randn(2, 50, 3)
    valid = torch.ones(2, 50, dtype=torch.bool)
    assert torch.allclose(point_error(pts * 0.3, pts, valid), torch.zeros(2), atol=1e-5)
    assert bool((point_error(pts + 1, pts, valid) > 0.1).all())


@pytest.mark.parametrize("head", ["linear", "dpt"])
def test_every_trainable_parameter_gets_a_gradient(head):
    """DDP refuses a parameter that never receives a gradient: the DPT head's coarsest fusion block
    had a skip unit that nothing fed (the 512 recipe crashed at its first DDP step)."""
    net = _net(head)
    c2w, K, depth = _clip(h=16, w=16)
    out = net(torch.rand(2, 3, 3, 16, 16), c2w, K)
    loss = reconstruction_loss(out, depth, K, c2w, torch.ones(2, dtype=torch.bool), torch.rand(2, 3, 3, 16, 16),
                               0.2, True, 0.1, 0.1)["loss"]
    loss.backward()
    assert [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None] == []


def test_dpt_checkpoints_with_the_old_unused_skip_unit_still_load(tmp_path):
    from d4d.modules.fourdgen import FourDGenModule, load_network

    module = FourDGenModule(encoder_config=TINY_VIT, dec_dim=32, dec_depth=2, dec_heads=2, head="dpt",
                            head_args={"features": 16, "layer_dims": [8, 16, 32, 32]})
    ckpt = {"state_dict": {**module.state_dict(), "net.head.fusion.3.skip.conv1.weight": torch.zeros(16, 16, 3, 3)}}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "old.ckpt")
    net, _ = load_network(tmp_path / "old.ckpt")
    assert torch.equal(net.head.fusion[0].out.weight, module.net.head.fusion[0].out.weight)
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"], strict=True)
