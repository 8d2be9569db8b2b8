"""Dense prediction heads of the reconstruction network: ``linear`` (224 stage) and ``dpt`` (512 stage).

Both map decoder tokens to ``OUT_CHANNELS`` raw channels per pixel (``reference.md`` section 7, after
DUSt3R/CUT3R): ``[0:3]`` point in the frame's own camera, ``[3:6]`` point in the world (frame-0)
frame, ``[6]`` confidence logit, ``[7:10]`` RGB logits. :func:`postprocess` turns them into points
(DUSt3R's ``exp`` mode: ``p = x / |x| * expm1(|x|)``), confidence ``1 + exp(x)`` and colours.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor
OUT_CHANNELS = 10
HEADS = ("linear", "dpt")


class LinearHead(nn.Module):
    """One linear layer per token to ``patch x patch x OUT_CHANNELS`` values, then pixel shuffle (DUSt3R)."""

    def __init__(self, dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(dim, patch_size * patch_size * OUT_CHANNELS)

    def forward(self, layers: list[Tensor], grid_hw: tuple[int, int], image_hw: tuple[int, int]) -> Tensor:
        """``layers[-1]: (N, h*w, D)`` -> ``(N, OUT_CHANNELS, H, W)``."""
        tokens = layers[-1]
        h, w = grid_hw
        x = self.proj(tokens).transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
        x = F.pixel_shuffle(x, self.patch_size)
        if tuple(x.shape[-2:]) != tuple(image_hw):
            x = F.interpolate(x, size=image_hw, mode="bilinear", align_corners=False)
        return x


class _ResidualConv(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class _Fusion(nn.Module):
    """DPT feature fusion: add the skip (after a residual unit), refine, upsample x2."""

    def __init__(self, ch: int, skip: bool = True):
        super().__init__()
        self.skip = _ResidualConv(ch) if skip else None
        self.refine = _ResidualConv(ch)
        self.out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if skip is not None:
            assert self.skip is not None, "this fusion block takes no skip input"
            if x.shape[-2:] != skip.shape[-2:]:
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = x + self.skip(skip)
        x = self.refine(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return self.out(x)


class DPTHead(nn.Module):
    """A compact DPT head (Ranftl et al.; DUSt3R's 512 head), written for this network.

    Four decoder layers are reassembled into maps at 4x, 2x, 1x and 1/2x the token grid, fused coarse
    to fine with residual conv units (each fusion upsamples x2), then a conv head predicts the
    channels, bilinearly resized to the image size.
    """

    def __init__(self, dim: int, patch_size: int, features: int = 128, layer_dims: tuple[int, ...] = (48, 96, 192, 384)):
        super().__init__()
        self.patch_size = patch_size
        self.project = nn.ModuleList(nn.Conv2d(dim, c, 1) for c in layer_dims)
        self.resample = nn.ModuleList([
            nn.ConvTranspose2d(layer_dims[0], layer_dims[0], 4, stride=4),
            nn.ConvTranspose2d(layer_dims[1], layer_dims[1], 2, stride=2),
            nn.Identity(),
            nn.Conv2d(layer_dims[3], layer_dims[3], 3, stride=2, padding=1),
        ])
        self.to_features = nn.ModuleList(nn.Conv2d(c, features, 3, padding=1, bias=False) for c in layer_dims)
        # the coarsest block starts the chain and has no skip input: no residual unit for one (a unit
        # that never receives a gradient breaks DDP, which requires every parameter to be used)
        self.fusion = nn.ModuleList(_Fusion(features, skip=i < len(layer_dims) - 1) for i in range(len(layer_dims)))
        self.head = nn.Sequential(
            nn.Conv2d(features, features // 2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(features // 2, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, OUT_CHANNELS, 1),
        )

    @staticmethod
    def pick_layers(num_layers: int) -> list[int]:
        """Indices (into the decoder's layer list, 0 = projected encoder output) of the 4 layers used."""
        last = num_layers - 1
        return [round(last * f) for f in (0.25, 0.5, 0.75, 1.0)]

    def forward(self, layers: list[Tensor], grid_hw: tuple[int, int], image_hw: tuple[int, int]) -> Tensor:
        picks = self.pick_layers(len(layers))
        h, w = grid_hw
        maps = []
        for i, idx in enumerate(picks):
            tok = layers[idx]
            x = tok.transpose(1, 2).reshape(tok.shape[0], -1, h, w)
            x = self.resample[i](self.project[i](x))
            maps.append(self.to_features[i](x))
        x = self.fusion[3](maps[3])
        x = self.fusion[2](x, maps[2])
        x = self.fusion[1](x, maps[1])
        x = self.fusion[0](x, maps[0])
        x = self.head(x)
        return F.interpolate(x, size=image_hw, mode="bilinear", align_corners=False)


# Weights of heads written before the coarsest fusion block lost its unused skip unit (never trained).
DEAD_HEAD_KEYS = ("head.fusion.3.skip.",)


def drop_dead_head_keys(state: dict, prefix: str = "") -> dict:
    """``state`` without the :data:`DEAD_HEAD_KEYS` (under ``prefix``), so old DPT checkpoints load strictly."""
    dead = tuple(prefix + k for k in DEAD_HEAD_KEYS)
    return {k: v for k, v in state.items() if not k.startswith(dead)}


def build_head(kind: str, dim: int, patch_size: int, **kwargs) -> nn.Module:
    """The head factory: ``"linear"`` or ``"dpt"`` (``kwargs``: DPTHead's ``features``, ``layer_dims``)."""
    if kind == "linear":
        return LinearHead(dim, patch_size)
    if kind == "dpt":
        return DPTHead(dim, patch_size, **kwargs)
    raise ValueError(f"head must be one of {HEADS}, got {kind!r}")


def postprocess(raw: Tensor) -> dict[str, Tensor]:
    """``raw (B, F, OUT_CHANNELS, H, W)`` -> ``local``/``world`` points ``(B, F, H, W, 3)``,
    ``conf (B, F, H, W)`` = ``1 + exp(x)`` and ``rgb (B, F, 3, H, W)`` in [0, 1]."""
    x = raw.float().movedim(2, -1)

    def points(v: Tensor) -> Tensor:
        n = v.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        return v / n * torch.expm1(n.clamp(max=30.0))

    return {
        "local": points(x[..., 0:3]),
        "world": points(x[..., 3:6]),
        "conf": 1.0 + torch.exp(x[..., 6].clamp(max=30.0)),
        "rgb": torch.sigmoid(x[..., 7:10]).movedim(-1, 2),
    }
