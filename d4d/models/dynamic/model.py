"""DynamicWan: Wan 2.1 image-to-video with camera control (Plücker addition + epipolar attention).

A plain ``nn.Module`` (no Lightning). The base parts (:class:`~d4d.models.dynamic.backbone.WanParts`)
are frozen unless a LoRA is asked for; the trainable parts are

* ``camera``: :class:`~d4d.models.dynamic.camera.CameraEncoder`, whose zero-initialised per-block
  projection is added to the hidden states entering each block of ``camera_blocks`` (a forward
  pre-hook on the block, so the diffusers module tree and its state-dict keys stay unchanged);
* ``epipolar``: one :class:`~d4d.models.dynamic.epipolar_attention.EpipolarBranch` per block of
  ``epipolar_blocks``, installed as a wrapping attention processor on that block's ``attn1``;
* optional LoRA adapters (peft, through diffusers) on ``attn1``/``attn2`` q, k, v, out;
* or, with ``train_base=True``, the whole transformer (full fine-tuning, or pre-training a small
  base from scratch as the camera-control benchmark does); the VAE and encoders stay frozen.

Conventions: frames are float in [0, 1], ``(B, F, 3, H, W)``; ``c2w`` ``(B, F, 4, 4)`` OpenCV,
relative to frame 0 (the conditioning frame); ``K`` pixel intrinsics at ``(H, W)``. Latents are
``(B, z, T, h, w)`` normalised with the VAE's ``latents_mean``/``latents_std`` as Wan does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from d4d.models.dynamic.backbone import WAN_TEXT_TOKENS, WanParts
from d4d.models.dynamic.camera import (CameraEncoder, group_frames, latent_frame_cameras, plucker_tokens,
                                       relative_scaled_poses)
from d4d.models.dynamic.epipolar_attention import BranchContext, EpipolarAttnProcessor, EpipolarBranch, check_backend
from d4d.models.dynamic.epipolar_mask import EpipolarMask, clip_epipolar_spans
from d4d.utils.dtypes import module_dtype, to_module_dtype
from d4d.utils.errors import UserError

Tensor = torch.Tensor
LORA_TARGETS = r".*blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"


def _select(spec: str | list[int] | None, num: int, key: str) -> list[int]:
    if spec is None or spec == "none":
        return []
    if spec == "all":
        return list(range(num))
    if isinstance(spec, str):
        raise UserError(f"model.{key}: expected 'all', 'none' or a list of block indices, got {spec!r}")
    bad = [i for i in spec if not 0 <= int(i) < num]
    if bad:
        raise UserError(f"model.{key}: block indices {bad} out of range for {num} blocks")
    return sorted({int(i) for i in spec})


class DynamicWan(nn.Module):
    """See the module docstring.

    Args:
        parts: the Wan parts. camera_blocks / epipolar_blocks: ``"all"``, ``"none"`` or indices.
        camera_hidden: width of the camera MLP. num_registers: epipolar register tokens.
        occlusion: occlusion-sensitive epipolar masks. epipolar_chunk_frames: query frames per
            attention chunk (dense path). lora_rank: 0 = no LoRA. train_base: also train the transformer
            itself. epipolar_backend: ``"dense"`` (chunked SDPA, the reference), ``"flex"`` (block-sparse
            flex_attention; no backward on CPU) or ``"auto"`` (flex on CUDA, dense elsewhere); see
            :mod:`d4d.models.dynamic.epipolar_attention`. epipolar_projections: ``"copy"`` (trainable
            q/k/v copied from ``attn1``, CamI2V) or ``"shared"`` (``attn1``'s own q/k/v; only the
            registers and the output projection train): same module docstring.
    """

    def __init__(self, parts: WanParts, camera_blocks: str | list[int] = "all", epipolar_blocks: str | list[int] = "all",
                 camera_hidden: int = 256, num_registers: int = 4, occlusion: bool = True,
                 epipolar_chunk_frames: int = 4, lora_rank: int = 0, train_base: bool = False,
                 epipolar_backend: str = "auto", epipolar_projections: str = "copy"):
        super().__init__()
        self.epipolar_backend = check_backend(epipolar_backend)
        if train_base and lora_rank > 0:
            raise UserError("model.train_base trains the whole transformer: set model.lora_rank to 0 with it")
        self.transformer, self.vae = parts.transformer, parts.vae
        self.text_encoder, self.image_encoder = parts.text_encoder, parts.image_encoder
        self.tokenizer = parts.tokenizer
        self.image_size, self.temporal_factor, self.spatial_factor = parts.image_size, parts.temporal_factor, parts.spatial_factor
        self.register_buffer("image_mean", torch.tensor(parts.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(parts.image_std).view(1, 3, 1, 1), persistent=False)
        vcfg = parts.vae.config
        self.register_buffer("latents_mean", torch.tensor(vcfg.latents_mean).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("latents_std", torch.tensor(vcfg.latents_std).view(1, -1, 1, 1, 1), persistent=False)
        for module in (self.transformer, self.vae, self.text_encoder, self.image_encoder):
            module.requires_grad_(False)
            module.eval()
        tcfg = self.transformer.config
        self.patch = int(tcfg.patch_size[1])
        self.token_px = self.spatial_factor * self.patch
        dim = tcfg.num_attention_heads * tcfg.attention_head_dim
        blocks = self.transformer.blocks
        self.occlusion = occlusion
        self.context = BranchContext()
        self.camera_blocks = _select(camera_blocks, len(blocks), "camera_blocks")
        self.epipolar_blocks = _select(epipolar_blocks, len(blocks), "epipolar_blocks")
        channels = 6 * self.token_px ** 2 * self.temporal_factor
        self.camera = CameraEncoder(channels, camera_hidden, dim, len(self.camera_blocks))
        for slot, index in enumerate(self.camera_blocks):
            blocks[index].register_forward_pre_hook(self._camera_hook(slot))
        self.epipolar = nn.ModuleDict()
        for index in self.epipolar_blocks:
            attn = blocks[index].attn1
            branch = EpipolarBranch(attn, num_registers, epipolar_chunk_frames, epipolar_backend, epipolar_projections)
            self.epipolar[str(index)] = branch
            attn.set_processor(EpipolarAttnProcessor(attn.processor, branch, self.context, attn))
        self.lora_rank = lora_rank
        if lora_rank > 0:
            from peft import LoraConfig

            self.transformer.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=LORA_TARGETS))
        self.train_base = train_base
        if train_base:
            self.transformer.requires_grad_(True)

    def _camera_hook(self, slot: int):
        def hook(module, args):
            ctx = self.context
            if ctx.camera is None or ctx.keep is None:
                return None
            hidden = args[0]
            add = self.camera.projections[slot](ctx.camera) * ctx.keep.to(ctx.camera.dtype)[:, None, None]
            return (hidden + add.to(hidden.dtype), *args[1:])
        return hook

    def train(self, mode: bool = True):
        super().train(mode)
        for module in (self.vae, self.text_encoder, self.image_encoder):
            module.eval()  # frozen encoders never switch to training behaviour
        return self

    # ------------------------------------------------------------------------------ encoders
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Tensor:
        """UMT5 embeddings ``(B, 512, text_dim)``, zero beyond each prompt's tokens (as Wan's pipeline)."""
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=WAN_TEXT_TOKENS, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        device = self.latents_mean.device
        ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
        hidden = self.text_encoder(ids, mask).last_hidden_state
        return hidden * mask[..., None].to(hidden.dtype)

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Tensor:
        """CLIP penultimate hidden states of ``(B, 3, H, W)`` images in [0, 1] (Wan 2.1 I2V)."""
        x = F.interpolate(images.float(), size=(self.image_size, self.image_size), mode="bicubic",
                          align_corners=False, antialias=True).clamp(0, 1)
        x = (x - self.image_mean) / self.image_std
        return self.image_encoder(pixel_values=to_module_dtype(x, self.image_encoder),
                                  output_hidden_states=True).hidden_states[-2]

    @torch.no_grad()
    def encode_video(self, frames: Tensor) -> Tensor:
        """``(B, F, 3, H, W)`` in [0, 1] -> normalised latents ``(B, z, T, h, w)``."""
        x = frames.permute(0, 2, 1, 3, 4).float() * 2 - 1
        mu = self.vae.encode(to_module_dtype(x, self.vae)).latent_dist.mode().float()
        return (mu - self.latents_mean.float()) / self.latents_std.float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents -> ``(B, F, 3, H, W)`` in [0, 1]."""
        z = latents.float() * self.latents_std.float() + self.latents_mean.float()
        x = self.vae.decode(to_module_dtype(z, self.vae)).sample.float()
        return ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4)

    @torch.no_grad()
    def image_condition(self, image: Tensor, num_frames: int) -> Tensor:
        """Wan I2V condition ``(B, t_f + z, T, h, w)``: first-frame mask and latents of [image, zeros...]."""
        b, _, height, width = image.shape
        video = torch.cat([image[:, None], image.new_zeros(b, num_frames - 1, 3, height, width)], 1)
        latents = self.encode_video(video)
        t_f, (t, h, w) = self.temporal_factor, latents.shape[2:]
        mask = latents.new_zeros(b, t_f, t, h, w)
        mask[:, :, 0] = 1.0  # latent 0 is frame 0 alone, repeated t_f times
        return torch.cat([mask, latents], 1)

    def check_frames(self, num_frames: int, height: int, width: int) -> None:
        if (num_frames - 1) % 4:  # Wan's VAE encodes frame 0, then chunks of 4 frames, whatever its t_f
            raise UserError(f"frames: Wan needs 1 + 4 k frames (5, 9, ..., 49, 81), got {num_frames}")
        if height % self.token_px or width % self.token_px:
            raise UserError(f"image size {height}x{width} must be a multiple of {self.token_px} (VAE x patch)")

    # ------------------------------------------------------------------------------- camera
    def camera_inputs(self, c2w: Tensor, K: Tensor, image_hw: tuple[int, int], trajectory_scale: float | Tensor = 1.0,
                      depth: Tensor | None = None) -> tuple[Tensor, EpipolarMask | None]:
        """Plücker tokens ``(B, C, T, h, w)`` and the epipolar masks of the ``B`` clips (None without
        branches), as an :class:`~d4d.models.dynamic.epipolar_mask.EpipolarMask` (``.dense()`` is the
        ``(B, L, L)`` bool mask), built on ``c2w``'s device without host synchronisation.

        Args:
            c2w: ``(B, F, 4, 4)`` (made relative to frame 0 and scaled here); K: ``(B, 3, 3)`` or
                ``(B, F, 3, 3)`` at ``image_hw``; depth: ``(B, F, H, W)`` z-depth (0 = unknown) or None; a clip
                whose depth is all 0 gets the depth-free covisibility (decided on the device).
        """
        rel = relative_scaled_poses(c2w.double(), trajectory_scale).float()
        tokens = plucker_tokens(rel, K, image_hw, self.token_px, self.temporal_factor)
        if not self.epipolar_blocks:
            return tokens, None
        grid = (image_hw[0] // self.token_px, image_hw[1] // self.token_px)
        cams = latent_frame_cameras(rel, self.temporal_factor)
        K0 = K if K.ndim == 3 else K[:, 0]
        masks = []
        for i in range(c2w.shape[0]):
            d = None
            if depth is not None and self.occlusion:
                idx = [g[-1] for g in group_frames(c2w.shape[1], self.temporal_factor)]
                d = _token_depth(depth[i, idx], self.token_px)
            masks.append(clip_epipolar_spans(cams[i], K0[i], image_hw, grid, self.token_px, self.occlusion, d))
        return tokens, EpipolarMask.stack(masks)

    # ------------------------------------------------------------------------------ forward
    def forward(self, noisy: Tensor, timestep: Tensor, condition: Tensor, text: Tensor, image: Tensor,
                camera: Tensor | None = None, mask: EpipolarMask | Tensor | None = None,
                keep_camera: Tensor | None = None) -> Tensor:
        """Flow prediction ``(B, z, T, h, w)``.

        Args:
            noisy: ``(B, z, T, h, w)``; timestep: ``(B,)`` in [0, 1000]; condition: from
                :meth:`image_condition`; text: ``(B, 512, text_dim)``; image: CLIP states;
            camera: Plücker tokens; mask: epipolar masks (:meth:`camera_inputs`); keep_camera: ``(B,)``
                1/0 (None = 1). A CPU ``keep_camera`` tells the host, without a device sync, whether
                any clip keeps its camera (if none does the epipolar branches are skipped); one on the
                device is used as it is: the branches run and are multiplied by it.
        """
        b = noisy.shape[0]
        ctx = self.context
        # every input in the transformer's dtype: float32 under autocast, bf16 when DeepSpeed cast it
        dtype = module_dtype(self.transformer)
        noisy, text, image = noisy.to(dtype), text.to(dtype), image.to(dtype)
        if camera is not None:
            # the camera MLP feeds only the camera blocks' additions: skipped without any
            ctx.camera = self.camera(to_module_dtype(camera, self.camera)) if self.camera_blocks else None
            if keep_camera is None:
                ctx.keep, ctx.any_keep = noisy.new_ones(b), True
            else:  # a CPU tensor is read on the host (no device sync); a device one is never read
                ctx.any_keep = keep_camera.device.type != "cpu" or bool(keep_camera.any())
                ctx.keep = keep_camera.to(noisy.device, non_blocking=True)
            ctx.mask = mask
            ctx.tokens_per_frame = (noisy.shape[-2] // self.patch) * (noisy.shape[-1] // self.patch)
        else:
            ctx.camera = ctx.mask = ctx.keep = None
        try:
            x = torch.cat([noisy, condition.to(noisy.dtype)], 1)
            return self.transformer(x, timestep, text, encoder_hidden_states_image=image, return_dict=False)[0]
        finally:
            if not torch.is_grad_enabled():
                ctx.camera = ctx.mask = ctx.keep = None

    def load_base(self, transformer_state: dict[str, Tensor]) -> None:
        """Replace the base transformer's weights (e.g. a base pre-trained elsewhere) and re-copy the
        epipolar branches' q/k/v from the new attention, as they would have been built on it."""
        self.transformer.load_state_dict(transformer_state)
        self.recopy_branches(list(self.epipolar))

    def recopy_branches(self, indices: list[str]) -> None:
        for index in indices:
            self.epipolar[index].copy_projections(self.transformer.blocks[int(index)].attn1)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]


def _token_depth(depth: Tensor, token_px: int) -> Tensor:
    """``(T, H, W)`` z-depth -> ``(T, h, w)``: the median of the valid depths in each token cell (0 if none)."""
    t, height, width = depth.shape
    cells = depth.reshape(t, height // token_px, token_px, width // token_px, token_px).permute(0, 1, 3, 2, 4).flatten(3)
    valid = cells > 0
    filled = torch.where(valid, cells, torch.full_like(cells, float("nan")))
    med = filled.nanmedian(-1).values
    return torch.nan_to_num(med, nan=0.0)
