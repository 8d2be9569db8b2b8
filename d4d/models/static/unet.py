"""A diffusers image UNet (Stable Diffusion 2.1 layout) inflated for views (reference.md section 5).

Inflation, applied to a loaded :class:`diffusers.UNet2DConditionModel` in place:

* **3D attention**: in the selected transformer blocks the self-attention ``attn1`` sees the
  tokens of all views of a sample as one sequence: ``(b*v, hw, c) -> (b, v*hw, c)``.
* **1D view attention**: every transformer block gets a self-attention along the view axis,
  ``(b*hw, v, c)``, added as a residual whose output projection starts at zero.
* **Input**: ``conv_in`` takes ``C + 1 + 6`` channels (latent, given-view mask, Plücker map
  direction-first as SEVA); the weights of the new channels start at zero.
* **Plücker FiLM** (optional): every ResBlock output is modulated ``h * (1 + s) + b`` with
  ``(s, b)`` from a zero-initialised 1x1 conv of the Plücker map resized to the block's grid.

All new weights start at zero, so at step 0 the model on a single view is the base model.
The view count travels as ``cross_attention_kwargs={"num_views": v}``; the Plücker map for FiLM
through a small shared context set at every forward.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from d4d.utils.dtypes import module_dtype
from d4d.utils.errors import UserError

Tensor = torch.Tensor
CAMERA_CHANNELS = 7  # 1 given-view mask + 6 Plücker


class ViewAttnProcessor:
    """Scaled-dot-product attention processor that knows the number of views.

    With ``flatten_views`` (3D attention, self-attention only) the tokens of the ``v`` views of a
    sample are attended to as one sequence; otherwise it is the plain per-view attention of
    diffusers' ``AttnProcessor2_0``.
    """

    def __init__(self, flatten_views: bool = False):
        self.flatten_views = flatten_views

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None,
                 num_views: int = 1) -> Tensor:
        if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.ndim != 3:
            raise NotImplementedError("ViewAttnProcessor supports transformer-block attention only")
        residual = hidden_states
        bv, n, c = hidden_states.shape
        flat = self.flatten_views and encoder_hidden_states is None and num_views > 1
        if flat:
            if attention_mask is not None:
                raise NotImplementedError("3D attention does not take an attention mask")
            hidden_states = hidden_states.reshape(bv // num_views, num_views * n, c)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        b = hidden_states.shape[0]
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (t.view(b, -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, k.shape[2], b)
            attention_mask = attention_mask.view(b, attn.heads, -1, attention_mask.shape[-1])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if flat:
            out = out.reshape(bv, n, -1)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class ViewAxisAttention(nn.Module):
    """Pre-norm self-attention along the view axis: token ``(b, p)`` of view ``i`` attends to the
    same position ``p`` in all views of sample ``b``. Output projection zero-initialised."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = max(1, heads)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, num_views: int) -> Tensor:
        """x: ``(b*v, n, c)`` (views of a sample adjacent). Returns the residual ``(b*v, n, c)``."""
        bv, n, c = x.shape
        b = bv // num_views
        seq = x.reshape(b, num_views, n, c).transpose(1, 2).reshape(b * n, num_views, c)
        q, k, v = self.qkv(self.norm(seq)).chunk(3, -1)
        q, k, v = (t.reshape(b * n, num_views, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b * n, num_views, c)
        out = self.proj(out)
        return out.reshape(b, n, num_views, c).transpose(1, 2).reshape(bv, n, c)


class MultiViewTransformerBlock(nn.Module):
    """A diffusers ``BasicTransformerBlock`` followed by a residual :class:`ViewAxisAttention`."""

    def __init__(self, block: nn.Module, heads: int):
        super().__init__()
        self.block = block
        dim = block.norm1.normalized_shape[0] if hasattr(block.norm1, "normalized_shape") else block.attn1.query_dim
        self.view_attn = ViewAxisAttention(dim, heads)

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        out = self.block(hidden_states, *args, **kwargs)
        cak = kwargs.get("cross_attention_kwargs") or (args[4] if len(args) > 4 else None) or {}
        num_views = int(cak.get("num_views", 1))
        return out + self.view_attn(out, num_views) if num_views > 1 else out


class FiLMContext:
    """Holds the ``(b*v, 6, h, w)`` Plücker map of the current forward for the FiLM blocks."""

    plucker: Tensor | None = None


class PluckerFiLMResBlock(nn.Module):
    """A diffusers ResBlock whose output is modulated by the Plücker map (SEVA's FiLM)."""

    def __init__(self, block: nn.Module, context: FiLMContext, channels: int):
        super().__init__()
        self.block, self._context = block, context
        self.film = nn.Conv2d(6, 2 * channels, 1)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, input_tensor: Tensor, temb: Tensor, *args, **kwargs) -> Tensor:
        out = self.block(input_tensor, temb, *args, **kwargs)
        rays = self._context.plucker
        if rays is None:
            return out
        rays = F.interpolate(rays.to(out.dtype), size=out.shape[-2:], mode="area")
        scale, shift = self.film(rays).chunk(2, 1)
        return out * (1 + scale) + shift


def _is_transformer_block(module: nn.Module) -> bool:
    return type(module).__name__ == "BasicTransformerBlock"


class MultiViewUNet(nn.Module):
    """Inflates ``unet`` (a ``diffusers.UNet2DConditionModel``) for ``v`` views; see the module doc.

    Args:
        unet: the base image UNet (its weights are kept; new weights start at zero).
        attention_3d: dotted-name globs of transformer blocks whose ``attn1`` attends over all
            views (e.g. ``["down_blocks.2.*", "mid_block.*", "up_blocks.1.*"]``), ``["*"]`` for all
            (names as in ``unet.named_modules()``, ``...attentions.0.transformer_blocks.0``);
            ``[]`` for none.
        view_attention: add the 1D view-axis attention to every transformer block.
        plucker_film: add Plücker FiLM to every ResBlock.
        view_attention_heads: heads of the view attention (default: those of the block's attn1).
    """

    def __init__(self, unet: nn.Module, attention_3d: Sequence[str] = ("*",), view_attention: bool = True,
                 plucker_film: bool = False, view_attention_heads: int | None = None):
        super().__init__()
        self.unet = unet
        self.base_in_channels = int(unet.config.in_channels)
        self.film_context = FiLMContext()
        self._extend_conv_in()
        self.attention_3d_blocks = self._set_processors(list(attention_3d))
        if view_attention:
            self._wrap_transformer_blocks(view_attention_heads)
        if plucker_film:
            self._wrap_resblocks()

    # ------------------------------------------------------------------------------ inflation
    def _extend_conv_in(self) -> None:
        old = self.unet.conv_in
        new = nn.Conv2d(old.in_channels + CAMERA_CHANNELS, old.out_channels, old.kernel_size,
                        old.stride, old.padding)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:, : old.in_channels] = old.weight
            new.bias.copy_(old.bias)
        self.unet.conv_in = new
        self.unet.register_to_config(in_channels=old.in_channels + CAMERA_CHANNELS)

    def _set_processors(self, patterns: list[str]) -> list[str]:
        blocks = [n for n, m in self.unet.named_modules() if _is_transformer_block(m)]
        chosen = [n for n in blocks if any(fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(n, p + ".*")
                                           for p in patterns)]
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, pattern + ".*") for n in blocks):
                raise UserError(f"attention_3d: {pattern!r} matches no transformer block of the UNet "
                                f"(blocks: {', '.join(blocks[:4])}, ...)")
        processors = {}
        for name in self.unet.attn_processors:
            block = name.rsplit(".", 2)[0]
            processors[name] = ViewAttnProcessor(flatten_views=name.endswith("attn1.processor") and block in chosen)
        self.unet.set_attn_processor(processors)
        return chosen

    def _wrap_transformer_blocks(self, heads: int | None) -> None:
        for module in list(self.unet.modules()):
            blocks = getattr(module, "transformer_blocks", None)
            if isinstance(blocks, nn.ModuleList):
                for i, block in enumerate(blocks):
                    if _is_transformer_block(block):
                        blocks[i] = MultiViewTransformerBlock(block, heads or block.attn1.heads)

    def _wrap_resblocks(self) -> None:
        for module in list(self.unet.modules()):
            resnets = getattr(module, "resnets", None)
            if isinstance(resnets, nn.ModuleList):
                for i, block in enumerate(resnets):
                    if type(block).__name__ == "ResnetBlock2D":
                        resnets[i] = PluckerFiLMResBlock(block, self.film_context, block.out_channels)

    # -------------------------------------------------------------------------------- forward
    @property
    def latent_channels(self) -> int:
        return self.base_in_channels

    def forward(self, x: Tensor, timesteps: Tensor, given: Tensor, plucker: Tensor, context: Tensor) -> Tensor:
        """Predict for every view.

        Args:
            x: ``(B, V, C, h, w)`` model input (noisy latents, clean latents at given views).
            timesteps: ``(B,)`` or ``(B, V)`` diffusion timesteps.
            given: ``(B, V)`` bool/float, 1 where the view is a given input.
            plucker: ``(B, V, 6, h, w)`` direction-first Plücker map at latent resolution.
            context: ``(B, N, D)`` cross-attention tokens (the CLIP image embedding).

        Returns:
            ``(B, V, C, h, w)`` the UNet output (v-prediction for SD 2.1).
        """
        b, v = x.shape[:2]
        dtype = module_dtype(self.unet)  # float32 under autocast, bf16 when DeepSpeed cast the weights
        x, context = x.to(dtype), context.to(dtype)
        mask = given.to(x.dtype)[:, :, None, None, None].expand(b, v, 1, *x.shape[-2:])
        inp = torch.cat([x, mask, plucker.to(x.dtype)], 2).flatten(0, 1)
        t = timesteps if timesteps.ndim == 2 else timesteps[:, None].expand(b, v)
        ctx = context.repeat_interleave(v, 0)
        self.film_context.plucker = plucker.flatten(0, 1)
        out = self.unet(inp, t.reshape(-1), encoder_hidden_states=ctx,
                        cross_attention_kwargs={"num_views": v}, return_dict=False)[0]
        return out.reshape(b, v, *out.shape[1:])


def load_unet(spec: str | dict, subfolder: str | None = None, torch_dtype: torch.dtype | None = None):
    """A ``UNet2DConditionModel`` from a local directory / hub id (``from_pretrained``) or, for tiny
    test models, from a config dict (random weights). Raises :class:`UserError` when it fails."""
    from diffusers import UNet2DConditionModel

    if isinstance(spec, dict):
        return UNet2DConditionModel.from_config(spec)
    try:
        kwargs = {"subfolder": subfolder} if subfolder else {}
        return UNet2DConditionModel.from_pretrained(spec, torch_dtype=torch_dtype, **kwargs)
    except (OSError, ValueError, EnvironmentError) as exc:
        where = f"{spec}" + (f" (subfolder {subfolder})" if subfolder else "")
        raise UserError(f"model.unet: cannot load a UNet2DConditionModel from {where}: "
                        f"{str(exc).splitlines()[0]}") from None
