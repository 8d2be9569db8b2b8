"""The pose-conditioned reconstruction network (paper eq. 3, ``Q(x, t) = Transformer(gamma(x), h(t), P_t)``).

``reference.md`` section 7 (CUT3R / DUSt3R), as built here:

* a ViT encoder per frame from transformers classes (``ViTModel`` / ``Dinov2Model`` / any
  ``AutoModel`` image transformer), so pretrained weights load with ``from_pretrained``;
* pose conditioning: the Plücker ray map of each frame (``moment_first``, poses relative to frame 0,
  translations divided by the clip's largest camera distance so the rays do not depend on the SfM
  scale) patch-embedded to one token per patch and added to the patch tokens; the embedding starts
  at zero so a pretrained encoder is undisturbed at the first step;
* a time embedding ``h(t)`` (sinusoidal, then an MLP) added to every token of frame ``t``;
* a decoder of :class:`CrossFrameBlock` s: self-attention inside each frame, cross-attention from
  each frame's tokens to the tokens of all frames, MLP (pre-norm);
* a head from :func:`d4d.fourd.heads.build_head` (points in own camera + world, confidence, RGB) and a
  per-frame pose head (translation + quaternion of c2w relative to frame 0, normalised units).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from d4d.fourd.heads import build_head, postprocess
from d4d.geometry.cameras import relative_poses
from d4d.geometry.plucker import plucker_rays
from d4d.geometry.precision import full_precision

Tensor = torch.Tensor
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ENCODER_TYPES = ("vit", "dinov2")


def build_encoder(encoder: str | None, encoder_config: dict[str, Any] | None) -> nn.Module:
    """A transformers image encoder: ``from_pretrained(encoder)`` (local dir or hub id) or, with
    ``encoder=None``, a random one from ``encoder_config`` (``type``: vit|dinov2, plus config fields)."""
    import transformers

    if encoder:
        model = transformers.AutoModel.from_pretrained(encoder)
        return getattr(model, "vision_model", model)
    cfg = dict(encoder_config or {})
    kind = cfg.pop("type", "vit")
    if kind == "vit":
        return transformers.ViTModel(transformers.ViTConfig(**cfg), add_pooling_layer=False)
    if kind == "dinov2":
        return transformers.Dinov2Model(transformers.Dinov2Config(**cfg))
    raise ValueError(f"encoder_config.type must be one of {ENCODER_TYPES}, got {kind!r}")


def sinusoidal(t: Tensor, dim: int) -> Tensor:
    """``t (...,)`` in [0, 1] -> ``(..., dim)`` sin/cos features at frequencies ``2^k pi``."""
    half = dim // 2
    freqs = torch.pi * 2.0 ** torch.linspace(0, 8, half, device=t.device, dtype=torch.float32)
    ang = t.float()[..., None] * freqs
    out = torch.cat([ang.sin(), ang.cos()], -1)
    return F.pad(out, (0, dim - 2 * half))


class CrossFrameBlock(nn.Module):
    """Frame-local self-attention, cross-attention to all frames' tokens, MLP; pre-norm residuals.

    ``forward(x (B, F, N, D)) -> (B, F, N, D)``.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2, self.norm_kv, self.norm3 = (nn.LayerNorm(dim) for _ in range(4))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj1 = nn.Linear(dim, dim)
        self.proj2 = nn.Linear(dim, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def _split(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(-2, -3)

    def forward(self, x: Tensor) -> Tensor:
        b, f, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, -1)
        a = F.scaled_dot_product_attention(self._split(q), self._split(k), self._split(v))
        x = x + self.proj1(a.transpose(-2, -3).flatten(-2))
        q = self._split(self.q(self.norm2(x)).reshape(b, f * n, d))
        k, v = self.kv(self.norm_kv(x).reshape(b, f * n, d)).chunk(2, -1)
        a = F.scaled_dot_product_attention(q, self._split(k), self._split(v))
        x = x + self.proj2(a.transpose(-2, -3).flatten(-2)).reshape(b, f, n, d)
        return x + self.mlp(self.norm3(x))


@full_precision
def normalised_rays(c2w: Tensor, K: Tensor, height: int, width: int) -> Tensor:
    """Plücker rays ``(B, F, 6, H, W)`` of poses made relative to frame 0 with translations divided by
    the clip's largest camera distance from frame 0 (1 when the camera does not move)."""
    rel = relative_poses(c2w.double(), 0).float() if c2w.ndim == 3 else \
        torch.stack([relative_poses(c.double(), 0).float() for c in c2w])
    scale = rel[..., :3, 3].norm(dim=-1).amax(-1).clamp_min(1e-6)
    scale = torch.where(scale > 1e-5, scale, torch.ones_like(scale))
    rel = rel.clone()
    rel[..., :3, 3] = rel[..., :3, 3] / scale[..., None, None]
    return plucker_rays(rel, K, height, width, order="moment_first")


class ReconstructionNet(nn.Module):
    """Frames + cameras + times -> per-pixel points (own camera, world), confidence, RGB, poses.

    Args:
        encoder / encoder_config: see :func:`build_encoder`.
        dec_dim, dec_depth, dec_heads: decoder width, number of :class:`CrossFrameBlock` s, heads.
        head: ``"linear"`` or ``"dpt"``; head_args: extra DPT arguments (``features``, ``layer_dims``).
    """

    def __init__(self, encoder: str | None = None, encoder_config: dict[str, Any] | None = None,
                 dec_dim: int = 768, dec_depth: int = 12, dec_heads: int = 12, head: str = "linear",
                 head_args: dict[str, Any] | None = None):
        super().__init__()
        self.encoder = build_encoder(encoder, encoder_config)
        cfg = self.encoder.config
        self.patch_size = int(cfg.patch_size)
        enc_dim = int(cfg.hidden_size)
        self._interpolate = "interpolate_pos_encoding" in inspect.signature(self.encoder.forward).parameters
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.enc_proj = nn.Linear(enc_dim, dec_dim)
        self.ray_embed = nn.Conv2d(6, dec_dim, self.patch_size, stride=self.patch_size)
        nn.init.zeros_(self.ray_embed.weight)
        nn.init.zeros_(self.ray_embed.bias)
        self.time_embed = nn.Sequential(nn.Linear(dec_dim, dec_dim), nn.SiLU(), nn.Linear(dec_dim, dec_dim))
        self.decoder = nn.ModuleList(CrossFrameBlock(dec_dim, dec_heads) for _ in range(dec_depth))
        self.norm = nn.LayerNorm(dec_dim)
        self.head_kind = head
        self.head = build_head(head, dec_dim, self.patch_size, **(head_args or {}))
        self.pose_head = nn.Sequential(nn.LayerNorm(dec_dim), nn.Linear(dec_dim, dec_dim), nn.GELU(), nn.Linear(dec_dim, 7))

    def check_size(self, height: int, width: int) -> None:
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not a multiple of the encoder patch size {p}")

    def encode(self, frames: Tensor) -> Tensor:
        """``frames (N, 3, H, W)`` in [0, 1] -> patch tokens ``(N, h*w, D_enc)`` (CLS/registers dropped)."""
        x = (frames - self.mean.to(frames.dtype)) / self.std.to(frames.dtype)
        kwargs = {"interpolate_pos_encoding": True} if self._interpolate else {}
        tokens = self.encoder(pixel_values=x, **kwargs).last_hidden_state
        n = (frames.shape[-2] // self.patch_size) * (frames.shape[-1] // self.patch_size)
        return tokens[:, tokens.shape[1] - n:]

    def forward(self, frames: Tensor, c2w: Tensor, K: Tensor, times: Tensor | None = None) -> dict[str, Tensor]:
        """Args: ``frames (B, F, 3, H, W)`` in [0, 1]; ``c2w (B, F, 4, 4)`` OpenCV camera-to-world;
        ``K (B, 3, 3)`` or ``(B, F, 3, 3)`` pixel intrinsics at (H, W); ``times (B, F)`` in [0, 1]
        (default ``i / (F - 1)``).

        Returns :func:`~d4d.fourd.heads.postprocess`'s dict plus ``pose (B, F, 7)``
        (translation, unit quaternion wxyz) and ``raw`` head output.
        """
        b, f, _, h, w = frames.shape
        self.check_size(h, w)
        gh, gw = h // self.patch_size, w // self.patch_size
        if times is None:
            times = torch.linspace(0, 1, f, device=frames.device).expand(b, f) if f > 1 else frames.new_zeros(b, f)
        Ks = K if K.ndim == 4 else K[:, None].expand(b, f, 3, 3)
        tokens = self.enc_proj(self.encode(frames.flatten(0, 1)))  # (B*F, N, D)
        rays = normalised_rays(c2w.float(), Ks.float(), h, w).to(tokens.dtype)
        tokens = tokens + self.ray_embed(rays.flatten(0, 1)).flatten(2).transpose(1, 2)
        d = tokens.shape[-1]
        temb = self.time_embed(sinusoidal(times, d).to(tokens.dtype))  # (B, F, D)
        x = tokens.view(b, f, gh * gw, d) + temb[:, :, None]
        layers = [x.flatten(0, 1)]
        for block in self.decoder:
            x = block(x)
            layers.append(x.flatten(0, 1))
        layers[-1] = self.norm(layers[-1])
        raw = self.head(layers, (gh, gw), (h, w)).view(b, f, -1, h, w)
        out = postprocess(raw)
        pose = self.pose_head(layers[-1].view(b, f, gh * gw, d).mean(2)).float()
        out["pose"] = torch.cat([pose[..., :3], F.normalize(pose[..., 3:] + pose.new_tensor([1, 0, 0, 0]), dim=-1)], -1)
        out["raw"] = raw
        return out

    def body_state_dict(self) -> dict[str, Tensor]:
        """Weights that carry over between head types (everything except ``head.*``)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("head.")}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

