"""Epipolar attention branch (CamI2V, ``reference.md`` section 4) for Wan's self-attention.

In each selected block the self-attention ``attn1`` gets a second, parallel attention whose query
token may only attend to (a) key tokens near its epipolar lines in every frame (its own frame along
its row, see :mod:`d4d.geometry.epipolar`), optionally minus keys disoccluded between the two
views (:mod:`d4d.models.dynamic.occlusion`), and (b) ``num_registers`` learnable register tokens that
are always visible, so no row is empty. Its q/k/v projections start as copies of ``attn1``'s and its
output projection is zero-initialised; the result is added to ``attn1``'s output before the block's
gate, so a fresh branch changes nothing.

Masks are per clip ``(L, L)`` bool over the ``L = T h w`` tokens (frame-major, row-major), built
blockwise from :func:`d4d.geometry.epipolar.iter_epipolar_mask_blocks`; the attention runs in chunks
of query frames, so the attention weights never exceed ``chunk_frames * N * (R + L)`` per head.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from d4d.geometry.epipolar import iter_epipolar_mask_blocks
from d4d.geometry.precision import full_precision
from d4d.models.dynamic.occlusion import covisible_keys

Tensor = torch.Tensor


@full_precision
def clip_epipolar_mask(c2w: Tensor, K: Tensor, image_hw: tuple[int, int], grid_hw: tuple[int, int], token_px: int,
                       occlusion: bool = False, depth: Tensor | None = None, block_frames: int = 4) -> Tensor:
    """The ``(T N, T N)`` bool mask of one clip (True = may attend), blockwise.

    Args:
        c2w: ``(T, 4, 4)`` camera of each latent frame; K: ``(3, 3)`` or ``(T, 3, 3)`` at ``image_hw``.
        grid_hw: tokens per frame ``(h, w)``; token_px: image pixels per token side.
        occlusion: also drop keys of ``b`` not covisible from ``a`` (depth ``(T, h, w)`` if known).
    """
    num, n = c2w.shape[0], grid_hw[0] * grid_hw[1]
    out = torch.empty(num * n, num * n, dtype=torch.bool, device=c2w.device)
    covis = covisible_keys(c2w, K, image_hw, grid_hw, token_px, depth) if occlusion else None
    for frames, block in iter_epipolar_mask_blocks(c2w, K, grid_hw, token_px, block_frames):
        if covis is not None:
            keep = covis[frames].reshape(frames.stop - frames.start, 1, num * n)  # (Q, 1, T N)
            block = (block.reshape(-1, n, num * n) & keep).reshape(-1, num * n)
        out[frames.start * n: frames.stop * n] = block
    return out


@dataclasses.dataclass
class BranchContext:
    """Per-forward inputs of the camera branches, shared by all blocks (set by DynamicWan)."""

    camera: Tensor | None = None  # (B, L, hidden) camera features
    mask: Tensor | None = None  # (B, L, L) bool epipolar mask
    keep: Tensor | None = None  # (B,) 1 = camera condition on, 0 = dropped (branches add nothing)
    tokens_per_frame: int = 0


class EpipolarBranch(nn.Module):
    """The trainable part of one block's epipolar attention."""

    def __init__(self, attn: nn.Module, num_registers: int = 4, chunk_frames: int = 4):
        super().__init__()
        dim, inner = attn.to_q.in_features, attn.to_q.out_features
        self.heads, self.chunk_frames = attn.heads, chunk_frames
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.copy_projections(attn)
        self.norm_q = nn.RMSNorm(inner, eps=1e-6)
        self.norm_k = nn.RMSNorm(inner, eps=1e-6)
        self.registers = nn.Parameter(torch.randn(num_registers, dim) * dim ** -0.5)
        self.to_out = nn.Linear(inner, dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    @torch.no_grad()
    def copy_projections(self, attn: nn.Module) -> None:
        """Start q/k/v as copies of the block's own attention projections."""
        for mine, base in ((self.to_q, attn.to_q), (self.to_k, attn.to_k), (self.to_v, attn.to_v)):
            mine.load_state_dict(base.state_dict())

    def forward(self, x: Tensor, mask: Tensor, tokens_per_frame: int) -> Tensor:
        """``x: (B, L, dim)``, ``mask: (B, L, L)`` bool -> ``(B, L, dim)``."""
        b, length, _ = x.shape
        regs = self.registers.to(x.dtype)[None].expand(b, -1, -1)
        kv_in = torch.cat([regs, x], 1)
        q = self.norm_q(self.to_q(x)).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        k = self.norm_k(self.to_k(kv_in)).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        v = self.to_v(kv_in).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        r = regs.shape[1]
        chunk = max(1, self.chunk_frames) * tokens_per_frame
        outs = []
        for start in range(0, length, chunk):
            rows = mask[:, start:start + chunk]
            full = torch.cat([rows.new_ones(b, rows.shape[1], r), rows], -1)[:, None]
            outs.append(F.scaled_dot_product_attention(q[:, :, start:start + chunk], k, v, attn_mask=full))
        out = torch.cat(outs, 2).transpose(1, 2).flatten(2)
        return self.to_out(out)


class EpipolarAttnProcessor:
    """Wraps a block's ``attn1`` processor: base self-attention + the epipolar branch.

    Not an ``nn.Module`` on purpose: the branch's weights live in :class:`DynamicWan` (so the base
    transformer's state dict keeps its keys) and diffusers would otherwise adopt them.
    """

    def __init__(self, base, branch: EpipolarBranch, context: BranchContext):
        self.base, self.branch, self.context = base, branch, context

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        ctx = self.context
        if ctx.mask is None or ctx.keep is None or not bool(ctx.keep.any()):
            return out
        extra = self.branch(hidden_states, ctx.mask, ctx.tokens_per_frame)
        return out + extra * ctx.keep.to(extra.dtype)[:, None, None]
