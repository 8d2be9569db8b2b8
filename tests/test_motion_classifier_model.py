"""The classifier network: ResNet-18 layout, weight loading from transformers and torchvision formats."""
import torch
from torch import nn
from transformers import ResNetConfig, ResNetModel

from d4d.models.motion_classifier import MotionClassifier, load_resnet_trunk, resnet_state_dict_from_torchvision


class _TvBlock(nn.Module):
    """torchvision's BasicBlock layout (names conv1/bn1/conv2/bn2/downsample), written here as the
    independent reference for the checkpoint conversion."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class _TvResNet18(nn.Module):
    def __init__(self, widths=(64, 128, 256, 512)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(_TvBlock(cin, w, stride), _TvBlock(w, w, 1)))
            cin = w
        self.fc = nn.Linear(cin, 1000)

    def features(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
        return x.mean((2, 3))


def _randomise_bn(module):
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def test_default_trunk_is_resnet18():
    model = MotionClassifier.build(None)
    trunk_params = sum(p.numel() for p in model.trunk.parameters())
    assert trunk_params == 11_176_512  # torchvision resnet18 without its fc layer
    assert isinstance(model.dropout, nn.Dropout) and model.dropout.p == 0.5
    assert model.head.in_features == 512 and model.head.out_features == 8


def test_torchvision_checkpoint_matches_reference_forward(tmp_path):
    torch.manual_seed(0)
    ref = _TvResNet18().eval()
    _randomise_bn(ref)
    path = tmp_path / "resnet18-tv.pth"
    torch.save(ref.state_dict(), path)
    trunk = load_resnet_trunk(str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ref.features(x)
        got = trunk(pixel_values=x).pooler_output.flatten(1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_unknown_torchvision_key_is_reported():
    try:
        resnet_state_dict_from_torchvision({"layer9.weird": torch.zeros(1)})
    except ValueError as exc:
        assert "layer9.weird" in str(exc)
    else:
        raise AssertionError("an unexpected key must be reported")


def test_from_pretrained_directory(tmp_path):
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    saved = ResNetModel(config)
    saved.save_pretrained(tmp_path / "tiny-resnet")
    model = MotionClassifier.build(str(tmp_path / "tiny-resnet"), num_classes=8)
    for (name, a), b in zip(saved.state_dict().items(), model.trunk.state_dict().values()):
        assert torch.equal(a, b), name
    logits = model.eval()(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 8) and torch.isfinite(logits).all()
