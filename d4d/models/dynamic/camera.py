"""Camera conditioning of the dynamic module: Plücker maps folded onto Wan's token grid.

Follows ``reference.md`` sections 1 and 3 (CamI2V): poses are made relative to the conditioning
frame (frame 0 becomes the identity), translations are multiplied by the trajectory scale, the
moment-first Plücker map ``[o x d, d]`` is computed at pixel resolution and folded with a
pixel-unshuffle by the token footprint ``s * p`` (VAE spatial factor times the transformer's patch),
so each token carries the 6 channels of all its pixels. Wan's VAE also folds ``t_f`` frames into one
latent frame (latent 0 is frame 0 alone); the maps of those frames are stacked on channels, frame 0
repeated ``t_f`` times as Wan does with its first-frame mask. Result: ``6 * (s p)^2 * t_f`` channels.
"""
from __future__ import annotations

import torch
from torch import nn

from d4d.geometry.cameras import relative_poses
from d4d.geometry.plucker import fold_to_latent, plucker_rays
from d4d.geometry.precision import full_precision

Tensor = torch.Tensor


@full_precision
def relative_scaled_poses(c2w: Tensor, scale: float | Tensor = 1.0) -> Tensor:
    """``(B, F, 4, 4)`` c2w -> relative to frame 0 (the conditioning frame), translations times
    ``scale`` (a float or ``(B,)``): CamI2V's ``trace_scale_factor`` (reference section 1)."""
    return relative_poses(c2w, reference=0, translation_scale=scale)


def group_frames(num_frames: int, temporal_factor: int) -> list[list[int]]:
    """Frames folded into each latent frame by Wan's causal VAE: ``[[0]*t_f, [1..t_f], ...]``."""
    if (num_frames - 1) % temporal_factor:
        raise ValueError(f"{num_frames} frames: Wan needs 1 + {temporal_factor} k frames")
    groups = [[0] * temporal_factor]
    groups += [list(range(1 + k * temporal_factor, 1 + (k + 1) * temporal_factor))
               for k in range((num_frames - 1) // temporal_factor)]
    return groups


@full_precision
def latent_frame_cameras(c2w: Tensor, temporal_factor: int) -> Tensor:
    """Camera of each latent frame: the last frame of its group. ``(B, F, 4, 4) -> (B, T, 4, 4)``."""
    idx = [g[-1] for g in group_frames(c2w.shape[1], temporal_factor)]
    return c2w[:, idx]


@full_precision
def plucker_tokens(c2w: Tensor, K: Tensor, image_hw: tuple[int, int], token_px: int, temporal_factor: int) -> Tensor:
    """Plücker maps on the token grid.

    Args:
        c2w: ``(B, F, 4, 4)`` OpenCV camera-to-world, already relative and scaled.
        K: ``(B, F, 3, 3)`` or ``(B, 3, 3)`` pixel intrinsics at ``image_hw``.
        token_px: pixels per token side (VAE spatial factor x patch size).

    Returns:
        ``(B, 6 * token_px^2 * t_f, T, H / token_px, W / token_px)``, ``T = 1 + (F - 1) / t_f``.
    """
    b, f = c2w.shape[:2]
    if K.ndim == 3:
        K = K[:, None].expand(b, f, 3, 3)
    rays = plucker_rays(c2w.float(), K.float(), image_hw[0], image_hw[1], "moment_first")  # (B, F, 6, H, W)
    folded = fold_to_latent(rays, token_px)  # (B, F, C, h, w)
    groups = group_frames(f, temporal_factor)
    stacked = torch.stack([folded[:, g].flatten(1, 2) for g in groups], 2)  # (B, t_f C, T, h, w)
    return stacked


class CameraEncoder(nn.Module):
    """Plücker tokens -> per-block additions to the hidden states.

    A shared two-layer MLP (``in_channels -> hidden``) followed by one zero-initialised linear
    projection per conditioned block (``hidden -> dim``): at initialisation every addition is exactly
    zero, so the wrapped model reproduces the base model.
    """

    def __init__(self, in_channels: int, hidden: int, dim: int, num_blocks: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_channels, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.projections = nn.ModuleList(nn.Linear(hidden, dim) for _ in range(num_blocks))
        for proj in self.projections:
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        """``(B, C, T, h, w)`` -> features ``(B, T h w, hidden)`` (frame-major, row-major tokens)."""
        return self.encoder(tokens.flatten(2).transpose(1, 2))
