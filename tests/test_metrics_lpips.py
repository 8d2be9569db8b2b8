"""mLPIPS: our AlexNet LPIPS against a hand-written functional LPIPS, masking, weight loading errors.

No ImageNet weights can be downloaded here: the backbone is a random AlexNet state dict saved in
torchvision's key layout (``features.N.weight``), as the real ``alexnet-owt-7be5be79.pth`` has it."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from d4d.metrics.lpips import ALEXNET_FILE, LPIPSAlex, build_lpips, find_alexnet_weights, masked_lpips, \
    torchmetrics_lpips_linear_file
from d4d.utils.errors import UserError

CONVS = {0: (64, 3, 11), 3: (192, 64, 5), 6: (384, 192, 3), 8: (256, 384, 3), 10: (256, 256, 3)}


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    state = {}
    for i, (co, ci, k) in CONVS.items():
        state[f"features.{i}.weight"] = torch.randn(co, ci, k, k, generator=g) * math.sqrt(2 / (ci * k * k))
        state[f"features.{i}.bias"] = torch.randn(co, generator=g) * 0.01
    state["classifier.6.bias"] = torch.zeros(1000)  # torchvision's head keys are ignored
    path = tmp_path_factory.mktemp("weights") / ALEXNET_FILE
    torch.save(state, path)
    return path


def _reference_lpips(state: dict, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LPIPS written out layer by layer (Zhang et al. 2018, v0.1 AlexNet) -> ``(N,)``."""
    lin = torch.load(torchmetrics_lpips_linear_file("alex"), map_location="cpu", weights_only=True)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def feats(x):
        x = (2 * x - 1 - shift) / scale
        out = []
        x = F.relu(F.conv2d(x, state["features.0.weight"], state["features.0.bias"], stride=4, padding=2))
        out.append(x)
        x = F.max_pool2d(x, 3, 2)
        x = F.relu(F.conv2d(x, state["features.3.weight"], state["features.3.bias"], padding=2))
        out.append(x)
        x = F.max_pool2d(x, 3, 2)
        for i in (6, 8, 10):
            x = F.relu(F.conv2d(x, state[f"features.{i}.weight"], state[f"features.{i}.bias"], padding=1))
            out.append(x)
        return out

    total = torch.zeros(a.shape[0])
    for k, (fa, fb) in enumerate(zip(feats(a), feats(b))):
        na = fa / (fa.norm(dim=1, keepdim=True) + 1e-10)
        nb = fb / (fb.norm(dim=1, keepdim=True) + 1e-10)
        d = F.conv2d((na - nb) ** 2, lin[f"lin{k}.model.1.weight"])
        total += F.interpolate(d, size=a.shape[-2:], mode="bilinear", align_corners=False).mean((1, 2, 3))
    return total


def test_matches_reference_formula(alexnet_file):
    model = LPIPSAlex(alexnet_file)
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 3, 64, 64, generator=g)
    b = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    ours = masked_lpips(model, a, b)
    ref = _reference_lpips(torch.load(alexnet_file, weights_only=True), a, b)
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-6), (ours, ref)
    assert (ours > 0).all()
    assert torch.allclose(masked_lpips(model, a, a), torch.zeros(2), atol=1e-7)


def test_more_noise_is_farther(alexnet_file):
    model = LPIPSAlex(alexnet_file)
    g = torch.Generator().manual_seed(2)
    a = torch.rand(1, 3, 64, 64, generator=g)
    noise = torch.randn(a.shape, generator=g)
    d = [masked_lpips(model, a, (a + s * noise).clamp(0, 1)).item() for s in (0.02, 0.1, 0.3)]
    assert d[0] < d[1] < d[2]


def test_mask_semantics(alexnet_file):
    model = LPIPSAlex(alexnet_file)
    g = torch.Generator().manual_seed(3)
    a = torch.rand(1, 3, 64, 64, generator=g)
    b = a.clone()
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[:, :, :32] = True
    b[..., 32:] = torch.rand(1, 3, 64, 32, generator=g)  # differs only outside the mask
    assert masked_lpips(model, a, b, mask).item() == pytest.approx(0.0, abs=1e-7)
    assert masked_lpips(model, a, b).item() > 0.01
    # the average runs over the mask: the masked map of (a*m, b*m) averaged over m, by hand
    b[..., :4, :4] = 0.0
    dmap = model(a * mask[:, None], b * mask[:, None])
    expect = (dmap * mask[:, None]).sum() / mask.sum()
    assert masked_lpips(model, a, b, mask).item() == pytest.approx(expect.item(), rel=1e-6)
    assert math.isnan(masked_lpips(model, a, b, torch.zeros_like(mask)).item())


def test_missing_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError, match=r"torch/hub/checkpoints/alexnet-owt-7be5be79\.pth"):
        find_alexnet_weights()
    with pytest.raises(UserError, match="not found at"):
        build_lpips("d4d", tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(UserError, match="not a torchvision AlexNet checkpoint"):
        LPIPSAlex(bad)


def test_torch_hub_cache_is_found(tmp_path, monkeypatch, alexnet_file):
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / ALEXNET_FILE).write_bytes(alexnet_file.read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert find_alexnet_weights() == hub / ALEXNET_FILE
    assert isinstance(build_lpips("d4d"), LPIPSAlex)
