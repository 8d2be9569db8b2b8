"""mLPIPS (AlexNet LPIPS with a spatial map, masked as DyCheck does; reference section 8).

Two backends compute the same network:

* ``"lpips"``: the ``lpips`` package (GPU installs), imported only when asked for.
* ``"d4d"``: our own AlexNet feature extractor (:class:`AlexNetFeatures`) that loads torchvision's
  ImageNet checkpoint ``alexnet-owt-7be5be79.pth`` (a local file, or ``$TORCH_HOME/hub/checkpoints``)
  plus the five LPIPS linear layers that ship inside torchmetrics (``lpips_models/alex.pth``).
  Missing backbone weights raise :class:`UserError` naming where to put them: a random backbone
  would give numbers that look plausible and mean nothing.

``backend="auto"`` uses ``lpips`` when it imports, else ``"d4d"``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d4d.utils.errors import UserError

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = f"https://download.pytorch.org/models/{ALEXNET_FILE}"
# LPIPS input scaling (images in [-1, 1] -> the statistics AlexNet was trained on)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
# torchvision ``features`` indices of the five ReLUs LPIPS taps (conv1..conv5)
_TAPS = (1, 4, 7, 9, 11)
_CHANNELS = (64, 192, 384, 256, 256)


def torch_hub_checkpoints() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` (torch's default ``~/.cache/torch``)."""
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch")
    return Path(home) / "hub" / "checkpoints"


def find_alexnet_weights(path: str | os.PathLike | None = None) -> Path:
    """The torchvision AlexNet checkpoint: ``path`` if given, else the torch hub cache.

    Raises UserError naming both places when neither has it."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"AlexNet weights not found at {p}: download {ALEXNET_URL} there")
        return p
    cached = torch_hub_checkpoints() / ALEXNET_FILE
    if cached.is_file():
        return cached
    raise UserError(f"LPIPS needs torchvision's ImageNet AlexNet weights: download {ALEXNET_URL} to "
                    f"{cached} (or pass --alexnet-weights FILE); no random backbone is used")


def torchmetrics_lpips_linear_file(net: str = "alex") -> Path:
    """The LPIPS linear-layer weights bundled with torchmetrics (``lpips_models/<net>.pth``)."""
    import torchmetrics.functional.image as tmi

    path = Path(tmi.__file__).parent / "lpips_models" / f"{net}.pth"
    if not path.is_file():
        raise UserError(f"the installed torchmetrics has no LPIPS linear layers at {path}")
    return path


class AlexNetFeatures(nn.Module):
    """torchvision's ``alexnet().features`` layout (same module indices, so its state dict loads
    as is); :meth:`forward` returns the five ReLU outputs LPIPS compares."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                outs.append(x)
                if i == _TAPS[-1]:
                    break
        return outs


class LPIPSAlex(nn.Module):
    """AlexNet LPIPS (v0.1 linear layers) returning the spatial map ``(N, 1, H, W)``.

    Input: images ``(N, 3, H, W)`` in [0, 1]. Each tapped feature is unit-normalised over
    channels, the squared difference is weighted by the non-negative linear layer, upsampled
    (bilinear) to ``H x W`` and the five maps are summed; the mean of the map is the usual LPIPS."""

    def __init__(self, alexnet_weights: str | os.PathLike | None = None, *,
                 _state_dict: dict | None = None) -> None:
        super().__init__()
        self.net = AlexNetFeatures()
        state = _state_dict if _state_dict is not None else _load(find_alexnet_weights(alexnet_weights))
        feats = {k: v for k, v in state.items() if k.startswith("features.")}
        missing = sorted(set(self.net.state_dict()) - set(feats))
        if missing:
            raise UserError(f"{alexnet_weights or 'AlexNet weights'}: not a torchvision AlexNet checkpoint "
                            f"(missing {', '.join(missing[:3])})")
        self.net.load_state_dict(feats)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS)
        lin = _load(torchmetrics_lpips_linear_file("alex"))
        for i, conv in enumerate(self.lins):
            conv.weight.data.copy_(lin[f"lin{i}.model.1.weight"])
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        H, W = a.shape[-2:]
        fa = self.net((a * 2 - 1 - self.shift) / self.scale)
        fb = self.net((b * 2 - 1 - self.shift) / self.scale)
        total = 0
        for lin, xa, xb in zip(self.lins, fa, fb):
            na = xa / (torch.sqrt((xa**2).sum(1, keepdim=True)) + 1e-10)  # as the lpips package
            nb = xb / (torch.sqrt((xb**2).sum(1, keepdim=True)) + 1e-10)
            layer = F.interpolate(lin((na - nb) ** 2), size=(H, W), mode="bilinear", align_corners=False)
            total = total + layer
        return total


def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated download, an HTML error page saved as .pth, ...
        raise UserError(f"cannot read weights file {path}: {exc.__class__.__name__}") from None


class _LpipsPackage(nn.Module):
    """The ``lpips`` package's AlexNet LPIPS with ``spatial=True`` (images in [0, 1])."""

    def __init__(self) -> None:
        super().__init__()
        import lpips  # noqa: PLC0415 - optional, GPU installs

        self.model = lpips.LPIPS(net="alex", spatial=True, verbose=False).eval().requires_grad_(False)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.model(a, b, normalize=True)


def build_lpips(backend: str = "auto", alexnet_weights: str | os.PathLike | None = None) -> nn.Module:
    """A module ``(a, b) -> (N, 1, H, W)`` spatial LPIPS map; ``backend`` in auto | lpips | d4d."""
    if backend not in ("auto", "lpips", "d4d"):
        raise UserError(f"LPIPS backend must be auto, lpips or d4d, got {backend!r}")
    if backend in ("auto", "lpips") and alexnet_weights is None:
        try:
            return _LpipsPackage()
        except ImportError:
            if backend == "lpips":
                raise UserError("LPIPS backend 'lpips' asked for but the lpips package is not "
                                "installed") from None
    return LPIPSAlex(alexnet_weights)


@torch.no_grad()
def masked_lpips(model: nn.Module, a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    """mLPIPS ``(N,)``: both images multiplied by the mask, the spatial map averaged over the mask
    (DyCheck). ``a``, ``b``: ``(N, 3, H, W)`` in [0, 1]; ``mask``: ``(N, H, W)``. NaN for an empty mask."""
    if mask is None:
        mask = torch.ones_like(a[:, 0])
    m = mask.to(a.dtype)[:, None]
    dmap = model(a * m, b * m)
    den = m.sum((1, 2, 3))
    val = (dmap * m).sum((1, 2, 3)) / den.clamp_min(1e-12)
    return torch.where(den > 0, val, torch.full_like(val, float("nan")))
