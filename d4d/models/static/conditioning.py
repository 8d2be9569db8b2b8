"""Camera and image conditioning of the static module (reference.md sections 1, 3 and 5).

* :func:`normalize_poses`: poses relative to the first given view, then SEVA's normalisation:
  camera centres recentred on their mean and scaled so that the first given camera sits at
  distance ``camera_scale`` (2.0) from the origin.
* :func:`latent_plucker`: direction-first ``[d, o x d]`` Plücker map at latent resolution (SEVA).
* :class:`FrozenImageEncoder`: the CLIP image embedding (transformers' ``CLIPVisionModelWithProjection``)
  of the given views as cross-attention tokens.
* :class:`FrozenVAE`: a diffusers ``AutoencoderKL``, or pixel space when no VAE is configured.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from d4d.geometry.cameras import invert_se3
from d4d.geometry.plucker import plucker_rays_resized
from d4d.geometry.precision import full_precision
from d4d.utils.dtypes import to_module_dtype
from d4d.utils.errors import UserError

Tensor = torch.Tensor
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def first_given_index(given: Tensor) -> Tensor:
    """``(B, V)`` bool -> ``(B,)`` index of the first given view (0 when none is given)."""
    idx = torch.arange(given.shape[-1], device=given.device).expand_as(given)
    return torch.where(given.bool(), idx, given.shape[-1]).min(-1).values.clamp(max=given.shape[-1] - 1)


@full_precision
def normalize_poses(c2w: Tensor, reference: Tensor, camera_scale: float = 2.0, eps: float = 1e-6) -> Tensor:
    """SEVA-style pose normalisation.

    Args:
        c2w: ``(B, V, 4, 4)`` OpenCV camera-to-world.
        reference: ``(B,)`` index of the first given view: it becomes the identity rotation.
        camera_scale: distance of the reference camera from the recentred origin.

    Returns:
        ``(B, V, 4, 4)``: ``inv(c2w_ref) @ c2w``, centres shifted by minus their mean, then scaled
        so that the reference centre lies at ``camera_scale``. When all centres coincide (pure
        rotation) only the shift is applied (nothing to scale).
    """
    b = torch.arange(c2w.shape[0], device=c2w.device)
    rel = invert_se3(c2w[b, reference])[:, None] @ c2w
    centres = rel[..., :3, 3]
    centres = centres - centres.mean(1, keepdim=True)
    dist = centres[b, reference].norm(dim=-1)
    scale = torch.where(dist > eps, camera_scale / dist.clamp_min(eps), torch.ones_like(dist))
    out = rel.clone()
    out[..., :3, 3] = centres * scale[:, None, None]
    return out


@full_precision
def latent_plucker(c2w: Tensor, K: Tensor, image_hw: tuple[int, int], latent_hw: tuple[int, int]) -> Tensor:
    """Direction-first Plücker map on the latent grid.

    Args:
        c2w: ``(B, V, 4, 4)`` normalised poses; K: ``(B, V, 3, 3)`` pixel intrinsics at ``image_hw``.

    Returns:
        ``(B, V, 6, h, w)`` float32, ``[d, o x d]`` for the ray through each latent cell's centre.
    """
    return plucker_rays_resized(c2w.float(), K.float(), image_hw, latent_hw, order="direction_first")


class FrozenVAE(nn.Module):
    """Image <-> latent with a frozen ``AutoencoderKL`` (``None``: pixel space, latents = ``2x-1``).

    Latents are ``posterior.mean * scaling_factor`` (deterministic, as many fine-tuning setups).
    """

    def __init__(self, vae: nn.Module | None):
        super().__init__()
        self.vae = vae
        if vae is not None:
            vae.requires_grad_(False).eval()

    @property
    def factor(self) -> int:
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def channels(self) -> int:
        return 3 if self.vae is None else int(self.vae.config.latent_channels)

    def train(self, mode: bool = True):  # stays in eval mode
        return super().train(False)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """``(N, 3, H, W)`` in [0, 1] -> ``(N, C, H/f, W/f)``."""
        x = images * 2 - 1
        if self.vae is None:
            return x
        dtype = next(self.vae.parameters()).dtype
        return self.vae.encode(x.to(dtype)).latent_dist.mean.float() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """``(N, C, h, w)`` -> ``(N, 3, h*f, w*f)`` in [0, 1]."""
        if self.vae is None:
            x = latents
        else:
            dtype = next(self.vae.parameters()).dtype
            x = self.vae.decode((latents / self.vae.config.scaling_factor).to(dtype)).sample.float()
        return ((x + 1) / 2).clamp(0, 1)


class FrozenImageEncoder(nn.Module):
    """CLIP image embedding of the given views -> one cross-attention token per sample.

    The embeddings (``image_embeds``, the projected CLS token) of the given views are averaged and,
    when their width differs from the UNet's ``cross_attention_dim``, mapped by a trainable linear
    layer (identity for SD 2.1 + OpenCLIP ViT-H/14, both 1024). Dropped conditions are zeros.
    """

    def __init__(self, encoder: nn.Module, cross_attention_dim: int):
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        dim = int(encoder.config.projection_dim)
        self.proj = nn.Identity() if dim == cross_attention_dim else nn.Linear(dim, cross_attention_dim)
        self.size = int(encoder.config.image_size)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, images: Tensor, given: Tensor) -> Tensor:
        """images: ``(B, V, 3, H, W)`` in [0, 1]; given: ``(B, V)`` bool. Returns ``(B, 1, D)``."""
        b, v = images.shape[:2]
        g = given.bool()
        sel = images[g]
        with torch.no_grad():
            x = F.interpolate(sel.float(), size=(self.size, self.size), mode="bicubic", align_corners=False)
            x = ((x.clamp(0, 1) - self.mean) / self.std).to(next(self.encoder.parameters()).dtype)
            emb = self.encoder(pixel_values=x).image_embeds.float()
        full = emb.new_zeros(b, v, emb.shape[-1])
        full[g] = emb
        pooled = full.sum(1) / g.sum(1, keepdim=True).clamp_min(1)
        return self.proj(to_module_dtype(pooled, self.proj))[:, None]


def load_vae(spec: str | dict | None, subfolder: str | None = None) -> nn.Module | None:
    """``AutoencoderKL`` from a directory / hub id, from a config dict (random, tests) or None."""
    if spec is None:
        return None
    from diffusers import AutoencoderKL

    if isinstance(spec, dict):
        return AutoencoderKL.from_config(spec)
    try:
        return AutoencoderKL.from_pretrained(spec, **({"subfolder": subfolder} if subfolder else {}))
    except (OSError, ValueError) as exc:
        raise UserError(f"model.vae: cannot load an AutoencoderKL from {spec}: {str(exc).splitlines()[0]}") from None


def load_image_encoder(spec: str | dict, subfolder: str | None = None) -> nn.Module:
    """``CLIPVisionModelWithProjection`` from a directory / hub id or a ``CLIPVisionConfig`` dict."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if isinstance(spec, dict):
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**spec))
    try:
        return CLIPVisionModelWithProjection.from_pretrained(spec, **({"subfolder": subfolder} if subfolder else {}))
    except (OSError, ValueError) as exc:
        raise UserError(f"model.image_encoder: cannot load a CLIPVisionModelWithProjection from {spec}: "
                        f"{str(exc).splitlines()[0]}") from None
