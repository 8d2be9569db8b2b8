"""The camera-motion classifier: ResNet-18 features, dropout 0.5, a linear head for the 8 motions.

The trunk is transformers' ``ResNetModel`` so ImageNet weights load with ``from_pretrained`` from a
local directory or a hub id (``microsoft/resnet-18``); a torchvision-format checkpoint
(``resnet18-f37072fd.pth``) loads through :func:`resnet_state_dict_from_torchvision`.
Inputs are ImageNet-normalised RGB ``(B, 3, S, S)``; see :data:`IMAGENET_MEAN`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import ResNetConfig, ResNetModel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RESNET18 = dict(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                layer_type="basic", downsample_in_first_stage=False)


def resnet_state_dict_from_torchvision(tv_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a torchvision ResNet (basic blocks) state dict to transformers' ``ResNetModel`` keys.

    ``conv1/bn1`` -> the embedder; ``layer{i}.{j}.conv{1,2}/bn{1,2}`` -> ``encoder.stages.{i-1}.
    layers.{j}.layer.{0,1}``; ``downsample.{0,1}`` -> ``shortcut``. The ``fc`` head is dropped:
    the motion head replaces it.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in tv_state.items():
        if key.startswith("fc."):
            continue
        new = None
        m = re.fullmatch(r"(conv1|bn1)\.(.+)", key)
        if m:
            part = "convolution" if m.group(1) == "conv1" else "normalization"
            new = f"embedder.embedder.{part}.{m.group(2)}"
        m = re.fullmatch(r"layer(\d)\.(\d+)\.(conv|bn)(\d)\.(.+)", key)
        if m:
            stage, block, kind, idx, rest = m.groups()
            part = "convolution" if kind == "conv" else "normalization"
            new = f"encoder.stages.{int(stage) - 1}.layers.{block}.layer.{int(idx) - 1}.{part}.{rest}"
        m = re.fullmatch(r"layer(\d)\.(\d+)\.downsample\.([01])\.(.+)", key)
        if m:
            stage, block, idx, rest = m.groups()
            part = "convolution" if idx == "0" else "normalization"
            new = f"encoder.stages.{int(stage) - 1}.layers.{block}.shortcut.{part}.{rest}"
        if new is None:
            raise ValueError(f"unexpected key {key!r} in a torchvision ResNet checkpoint")
        out[new] = value
    return out


def load_resnet_trunk(backbone: str | None, **config_overrides: Any) -> ResNetModel:
    """Build the ResNet trunk.

    Args:
        backbone: ``None`` for random init (ResNet-18 layout, or ``config_overrides`` for tiny test
            models); a local diffusers/transformers-format directory or a hub id for
            ``ResNetModel.from_pretrained``; or a ``.pth``/``.pt`` torchvision-format state dict.
    """
    if backbone is None:
        return ResNetModel(ResNetConfig(**{**RESNET18, **config_overrides}))
    path = Path(os.path.expanduser(backbone))
    if path.suffix in (".pth", ".pt"):
        if not path.is_file():
            raise FileNotFoundError(f"torchvision ResNet checkpoint not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        model = ResNetModel(ResNetConfig(**{**RESNET18, **config_overrides}))
        model.load_state_dict(resnet_state_dict_from_torchvision(state), strict=True)
        return model
    return ResNetModel.from_pretrained(str(path) if path.exists() else backbone)


class MotionClassifier(nn.Module):
    """ResNet trunk -> global average pool -> dropout -> linear over the motion classes.

    ``forward(images: (B, 3, S, S)) -> logits (B, num_classes)``; :meth:`features` gives the pooled
    ``(B, C)`` features (C = 512 for ResNet-18) that the few-shot prototype loss also uses.
    """

    def __init__(self, trunk: ResNetModel, num_classes: int = 8, dropout: float = 0.5):
        super().__init__()
        self.trunk = trunk
        width = trunk.config.hidden_sizes[-1]
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, num_classes)

    @classmethod
    def build(cls, backbone: str | None = None, num_classes: int = 8, dropout: float = 0.5,
              **config_overrides: Any) -> "MotionClassifier":
        return cls(load_resnet_trunk(backbone, **config_overrides), num_classes, dropout)

    @classmethod
    def from_config_dict(cls, config: dict[str, Any], num_classes: int, dropout: float) -> "MotionClassifier":
        """Rebuild the architecture (random weights) from a saved ``ResNetConfig.to_dict()``."""
        return cls(ResNetModel(ResNetConfig(**config)), num_classes, dropout)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(pixel_values=images).pooler_output.flatten(1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(features))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(images))
