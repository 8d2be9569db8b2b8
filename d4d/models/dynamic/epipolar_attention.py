"""Epipolar attention branch (CamI2V, ``reference.md`` section 4) for Wan's self-attention.

In each selected block the self-attention ``attn1`` gets a second, parallel attention whose query
token may only attend to (a) key tokens near its epipolar lines in every frame (its own frame along
its row, see :mod:`d4d.geometry.epipolar`), optionally minus keys disoccluded between the two
views (:mod:`d4d.models.dynamic.occlusion`), and (b) ``num_registers`` learnable register tokens that
are always visible, so no row is empty. Its output projection is zero-initialised and the result is
added to ``attn1``'s output before the block's gate, so a fresh branch changes nothing.

Queries, keys and values (``projections``):

* ``"copy"`` (CamI2V's design): the branch has trainable q/k/v projections (+ q/k RMSNorms) started
  as copies of ``attn1``'s: at Wan 14B 105M trainable parameters per block (4.2B over 40 blocks) and
  three more ``L x dim x dim`` projections per block;
* ``"shared"``: the branch attends with ``attn1``'s own normalised queries, keys and values, taken
  from the base attention's forward as it computes them (forward hooks on ``attn1.norm_q``,
  ``norm_k``, ``to_v``: no extra projection FLOPs, no copy); only the registers and the output
  projection train (26M per block at Wan 14B). The registers' keys and values go through
  ``attn1``'s frozen projections. Rotary embeddings are not applied in either design.

Masks come as an :class:`~d4d.models.dynamic.epipolar_mask.EpipolarMask` (exact row spans, never the
dense ``(L, L)`` mask). Two attention paths compute the same thing (``backend``):

* ``"dense"`` (the reference): scaled-dot-product attention over chunks of ``chunk_frames`` query frames
  against all ``R + L`` keys with a bool mask of the chunk's rows, built from the spans per chunk;
  weights ``chunk_frames * N * (R + L)`` per head, every pair computed (only 3-4 % are allowed at
  Wan 480p), no flash kernel (none takes a bool mask);
* ``"flex"``: :func:`torch.nn.attention.flex_attention.flex_attention` with the mask's
  :class:`~torch.nn.attention.flex_attention.BlockMask`: only the 128 x 128 tiles holding an allowed pair
  are computed (about a quarter for orbits and turns, nearly all for zooms), fused, no score matrix.
  It runs ``torch.compile(flex_attention)``, compiled once per device type (:func:`flex_kernel`).
  What torch 2.13 offers on CPU, measured here: the compiled CPU kernel (inductor C++) runs the
  forward block-sparse (about 10-20 s to compile per shape on 2 cores); eager ``flex_attention``
  materialises the full score matrix and ignores the tiles; there is no backward on CPU at all (eager
  or compiled: torch refuses inputs that require grad). So ``"flex"`` on CPU serves inference only,
  and training on CPU with it is a :class:`~d4d.utils.errors.UserError`;
* ``"auto"``: ``"flex"`` on CUDA, ``"dense"`` elsewhere. On CPU flex cannot train, and for the forward
  alone ``benchmarks/epipolar.py`` (one thread) measured the compiled CPU kernel 1.5x faster and 5x
  leaner than the dense path at Wan's 30 x 52 grid (49 frames, 22 % of the tiles non-empty, width
  128) but 2-3x slower at 15 x 26 (72-83 % non-empty), after 10-20 s of compilation per shape: not a
  safe automatic choice.

Nothing in the branch synchronises with the host; whether any clip of the batch keeps its camera is
a host-side bool of the context (:class:`BranchContext`), not read from a device tensor.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import flex_attention

from d4d.geometry.precision import full_precision
from d4d.models.dynamic.epipolar_mask import EpipolarMask, clip_epipolar_spans
from d4d.utils.errors import UserError

Tensor = torch.Tensor
BACKENDS = ("dense", "flex", "auto")
PROJECTIONS = ("copy", "shared")
_FLEX_KERNELS: dict[str, Callable] = {}


def check_backend(backend: str, key: str = "model.epipolar_backend") -> str:
    if backend not in BACKENDS:
        raise UserError(f"{key}: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"auto"`` -> ``"flex"`` on CUDA, ``"dense"`` elsewhere (module docstring); others unchanged."""
    if backend == "auto":
        return "flex" if device.type == "cuda" else "dense"
    return backend


def flex_kernel(device: torch.device, needs_grad: bool) -> Callable:
    """``torch.compile(flex_attention)``, compiled once per device type and kept for the process.

    Raises a one-line :class:`UserError` for a backward on CPU, which torch's flex_attention lacks.
    """
    if device.type == "cpu" and needs_grad:
        raise UserError("model.epipolar_backend: flex_attention has no backward on CPU in torch "
                        f"{torch.__version__}; train on CPU with 'dense' or 'auto' (flex serves CPU inference only)")
    if device.type not in _FLEX_KERNELS:
        _FLEX_KERNELS[device.type] = torch.compile(flex_attention, dynamic=False)
    return _FLEX_KERNELS[device.type]


@full_precision
def clip_epipolar_mask(c2w: Tensor, K: Tensor, image_hw: tuple[int, int], grid_hw: tuple[int, int], token_px: int,
                       occlusion: bool = False, depth: Tensor | None = None, block_frames: int = 2) -> Tensor:
    """The dense ``(T N, T N)`` bool mask of one clip (True = may attend), for tests and small clips.

    Arguments as in :func:`~d4d.models.dynamic.epipolar_mask.clip_epipolar_spans`, of which it is the
    expansion: c2w ``(T, 4, 4)`` per latent frame, K at ``image_hw``, ``grid_hw`` tokens of ``token_px``
    pixels, ``occlusion`` with optional depth ``(T, h, w)``.
    """
    return clip_epipolar_spans(c2w, K, image_hw, grid_hw, token_px, occlusion, depth, block_frames).dense()[0]


@dataclasses.dataclass
class BranchContext:
    """Per-forward inputs of the camera branches, shared by all blocks (set by DynamicWan)."""

    camera: Tensor | None = None  # (B, L, hidden) camera features
    mask: EpipolarMask | Tensor | None = None  # the epipolar masks (a dense (B, L, L) bool for the dense path only)
    keep: Tensor | None = None  # (B,) 1 = camera condition on, 0 = dropped (branches add nothing), on the device
    any_keep: bool = True  # known on the host: False = every clip dropped its camera, the branches are skipped
    tokens_per_frame: int = 0


def check_projections(projections: str) -> str:
    if projections not in PROJECTIONS:
        raise UserError(f"model.epipolar_projections: expected one of {', '.join(PROJECTIONS)}, got {projections!r}")
    return projections


class EpipolarBranch(nn.Module):
    """The trainable part of one block's epipolar attention (``backend``, ``projections``: module docstring)."""

    def __init__(self, attn: nn.Module, num_registers: int = 4, chunk_frames: int = 4, backend: str = "auto",
                 projections: str = "copy"):
        super().__init__()
        dim, inner = attn.to_q.in_features, attn.to_q.out_features
        self.heads, self.chunk_frames, self.backend = attn.heads, chunk_frames, check_backend(backend)
        self.shared = check_projections(projections) == "shared"
        if not self.shared:
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
        """Start q/k/v as copies of the block's own attention projections (nothing to do when shared)."""
        if self.shared:
            return
        for mine, base in ((self.to_q, attn.to_q), (self.to_k, attn.to_k), (self.to_v, attn.to_v)):
            mine.load_state_dict(base.state_dict())

    def forward(self, x: Tensor, mask: EpipolarMask | Tensor, tokens_per_frame: int,
                shared: tuple[nn.Module, Tensor, Tensor, Tensor] | None = None) -> Tensor:
        """``x: (B, L, dim)``, ``mask``: an :class:`EpipolarMask` (or, dense path only, a ``(B, L, L)``
        bool tensor) -> ``(B, L, dim)`` in ``x``'s dtype. ``shared``: ``(attn1, q, k, v)``, the base
        attention and its normalised ``(B, L, inner)`` projections (``projections="shared"`` only)."""
        b = x.shape[0]
        if self.shared:
            if shared is None:
                raise RuntimeError("a shared-projection epipolar branch needs attn1's q, k, v (EpipolarAttnProcessor)")
            attn, q, k, v = shared
            regs = self.registers.to(attn.to_k.weight.dtype)  # (R, dim): projected once, then batched
            k = torch.cat([attn.norm_k(attn.to_k(regs)).to(k.dtype)[None].expand(b, -1, -1), k], 1)
            v = torch.cat([attn.to_v(regs).to(v.dtype)[None].expand(b, -1, -1), v], 1)
        else:  # the branch's own float32 weights: x may come in the frozen transformer's bf16
            x_in = x.to(self.to_q.weight.dtype)
            kv_in = torch.cat([self.registers.to(x_in.dtype)[None].expand(b, -1, -1), x_in], 1)
            q, k, v = self.norm_q(self.to_q(x_in)), self.norm_k(self.to_k(kv_in)), self.to_v(kv_in)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        if resolve_backend(self.backend, x.device) == "flex":
            out = self._flex(q, k, v, mask)
        else:
            out = self._dense(q, k, v, mask, tokens_per_frame)
        out = out.transpose(1, 2).flatten(2)
        return self.to_out(out.to(self.to_out.weight.dtype)).to(x.dtype)

    def _dense(self, q: Tensor, k: Tensor, v: Tensor, mask: EpipolarMask | Tensor, tokens_per_frame: int) -> Tensor:
        b, _, length, _ = q.shape
        r = k.shape[2] - length
        chunk = max(1, self.chunk_frames) * tokens_per_frame
        outs = []
        for start in range(0, length, chunk):
            rows = mask.rows(start, start + chunk) if isinstance(mask, EpipolarMask) else mask[:, start:start + chunk]
            full = torch.cat([rows.new_ones(b, rows.shape[1], r), rows], -1)[:, None]
            outs.append(F.scaled_dot_product_attention(q[:, :, start:start + chunk], k, v, attn_mask=full))
        return torch.cat(outs, 2)

    def _flex(self, q: Tensor, k: Tensor, v: Tensor, mask: EpipolarMask | Tensor) -> Tensor:
        if not isinstance(mask, EpipolarMask):
            raise TypeError("the flex epipolar backend needs an EpipolarMask (DynamicWan.camera_inputs), not a dense mask")
        dtype = v.dtype  # under autocast the RMSNorm'd q, k may be float32 while v is bf16
        q, k = q.to(dtype), k.to(dtype)
        kernel = flex_kernel(q.device, torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
        return kernel(q, k, v, block_mask=mask.block_mask(k.shape[2] - q.shape[2]))


class EpipolarAttnProcessor:
    """Wraps a block's ``attn1`` processor: base self-attention + the epipolar branch.

    Not an ``nn.Module`` on purpose: the branch's weights live in :class:`DynamicWan` (so the base
    transformer's state dict keeps its keys) and diffusers would otherwise adopt them.
    """

    def __init__(self, base, branch: EpipolarBranch, context: BranchContext, attn: nn.Module | None = None):
        self.base, self.branch, self.context = base, branch, context
        self.captured: dict[str, Tensor] = {}
        self.capturing = False
        if branch.shared:  # attn1's normalised q, k and its v, as the base attention computes them
            if attn is None:
                raise ValueError("a shared-projection branch needs the attention module to hook")
            for name, module in (("q", attn.norm_q), ("k", attn.norm_k), ("v", attn.to_v)):
                module.register_forward_hook(self._capture(name))

    def _capture(self, name: str):
        def hook(module, args, output):
            if self.capturing:
                self.captured[name] = output
        return hook

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        ctx = self.context
        active = not (ctx.mask is None or ctx.keep is None or not ctx.any_keep)
        self.captured.clear()
        self.capturing = active and self.branch.shared
        try:
            out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        finally:
            self.capturing = False
        if not active:
            return out
        shared = None
        if self.branch.shared:
            if set(self.captured) != {"q", "k", "v"}:  # e.g. fused qkv projections bypass to_v
                raise RuntimeError(f"shared epipolar projections: captured {sorted(self.captured)} of attn1's q, k, v")
            shared = (attn, self.captured["q"], self.captured["k"], self.captured["v"])
        extra = self.branch(hidden_states, ctx.mask, ctx.tokens_per_frame, shared)
        self.captured.clear()
        return out + extra * ctx.keep.to(extra.dtype)[:, None, None]
