"""The Wan 2.1 image-to-video backbone (diffusers/transformers parts) and a tiny random twin of it.

Layout (diffusers' ``WanImageToVideoPipeline`` directory, e.g. ``Wan-AI/Wan2.1-I2V-14B-480P-Diffusers``):
``transformer/`` (:class:`~diffusers.WanTransformer3DModel`, ``in_channels = 2 z + t_f``: noisy
latents, the first-frame mask folded over ``t_f`` temporal factor channels, image-condition latents),
``vae/`` (:class:`~diffusers.AutoencoderKLWan`), ``text_encoder/`` (UMT5 encoder), ``tokenizer/``,
``image_encoder/`` (CLIP vision; Wan uses its penultimate hidden states) and ``image_processor/``.

:func:`build_tiny_wan` builds the same five parts from small configs with random weights (tests and
the debug recipe); :func:`save_wan` writes them in the layout above so :func:`load_wan` reads both.
"""
from __future__ import annotations

import dataclasses
import json
import os
import string
from typing import Any

import torch
from torch import nn

from d4d.utils.devices import resolve_device
from d4d.utils.errors import UserError

# diffusers' WanAttnProcessor splits image tokens from text tokens assuming exactly 512 text tokens.
WAN_TEXT_TOKENS = 512


@dataclasses.dataclass
class WanParts:
    transformer: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    image_encoder: nn.Module
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    image_size: int  # CLIP input side

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(bool(x) for x in self.vae.config.temperal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 ** len(self.vae.config.temperal_downsample)

    @property
    def z_dim(self) -> int:
        return int(self.vae.config.z_dim)


# Small enough to train on a CPU, shaped like Wan 2.1 I2V (same classes, same wiring).
TINY_DEFAULTS: dict[str, Any] = {
    "dim": 32, "heads": 2, "layers": 2, "ffn_dim": 64, "text_dim": 32, "image_dim": 32,
    "z_dim": 4, "vae_base_dim": 8, "vae_temporal_downsample": [False, False], "clip_image_size": 32,
}


def _char_tokenizer():
    """A character-level fast tokenizer (tokenizers + transformers) standing in for UMT5's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(string.ascii_lowercase + string.digits + " .,-'")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    from tokenizers import normalizers, processors

    tok.normalizer = normalizers.Lowercase()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def backbone_spec(backbone: str | None, tiny: dict[str, Any] | None, tiny_seed: int = 0) -> dict[str, Any]:
    """What identifies the frozen encoders (written in precomputed-latent manifests, compared on use)."""
    return {"backbone": backbone} if backbone else {"tiny": tiny or {}, "tiny_seed": tiny_seed}


def build_tiny_wan(tiny: dict[str, Any] | None = None, seed: int = 0) -> WanParts:
    """Random Wan-I2V-shaped parts from ``TINY_DEFAULTS`` updated by ``tiny``."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    cfg = {**TINY_DEFAULTS, **(tiny or {})}
    unknown = set(cfg) - set(TINY_DEFAULTS)
    if unknown:
        raise UserError(f"model.tiny: unknown keys {sorted(unknown)}; known: {sorted(TINY_DEFAULTS)}")
    if cfg["dim"] % cfg["heads"] or (cfg["dim"] // cfg["heads"]) % 2:
        raise UserError(f"model.tiny: dim {cfg['dim']} must split into {cfg['heads']} even-sized heads")
    torch.manual_seed(seed)
    levels = len(cfg["vae_temporal_downsample"])
    z = cfg["z_dim"]
    vae = AutoencoderKLWan(base_dim=cfg["vae_base_dim"], z_dim=z, dim_mult=[1] + [2] * levels, num_res_blocks=1,
                           temperal_downsample=list(cfg["vae_temporal_downsample"]),
                           latents_mean=[0.0] * z, latents_std=[1.0] * z)
    t_f = 2 ** sum(bool(x) for x in cfg["vae_temporal_downsample"])
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=cfg["heads"], attention_head_dim=cfg["dim"] // cfg["heads"],
        in_channels=2 * z + t_f, out_channels=z, text_dim=cfg["text_dim"], freq_dim=32, ffn_dim=cfg["ffn_dim"],
        num_layers=cfg["layers"], image_dim=cfg["image_dim"], added_kv_proj_dim=cfg["dim"], rope_max_seq_len=64)
    tokenizer = _char_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=cfg["text_dim"], d_kv=8,
                                               d_ff=2 * cfg["text_dim"], num_layers=1, num_heads=2))
    side = cfg["clip_image_size"]
    image_encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=cfg["image_dim"], intermediate_size=2 * cfg["image_dim"],
                                                     num_hidden_layers=2, num_attention_heads=2,
                                                     image_size=side, patch_size=side // 4))
    return WanParts(transformer, vae, text_encoder, tokenizer, image_encoder,
                    (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), side)


def save_wan(parts: WanParts, path: str | os.PathLike) -> None:
    """Write ``parts`` in diffusers' Wan I2V directory layout (what :func:`load_wan` reads)."""
    path = os.fspath(path)
    parts.transformer.save_pretrained(os.path.join(path, "transformer"))
    parts.vae.save_pretrained(os.path.join(path, "vae"))
    parts.text_encoder.save_pretrained(os.path.join(path, "text_encoder"))
    parts.tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
    parts.image_encoder.save_pretrained(os.path.join(path, "image_encoder"))
    side = parts.image_size
    os.makedirs(os.path.join(path, "image_processor"), exist_ok=True)
    with open(os.path.join(path, "image_processor", "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": side},
                   "crop_size": {"height": side, "width": side}, "do_center_crop": True, "do_normalize": True,
                   "image_mean": list(parts.image_mean), "image_std": list(parts.image_std)}, f, indent=1)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str, key: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; a one-line :class:`UserError` naming ``key`` otherwise."""
    if name not in DTYPES:
        raise UserError(f"{key}: unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def cast_frozen(parts: WanParts, dtype: torch.dtype) -> WanParts:
    """Cast the transformer and the two encoders to ``dtype`` as ``from_pretrained(torch_dtype=...)``
    would: diffusers keeps a class's ``_keep_in_fp32_modules`` (Wan's norms, time embedder,
    modulation tables) in float32 for any lower precision; transformers keeps its
    ``_keep_in_fp32_modules`` (UMT5's ``wo``) only for float16 and ``_keep_in_fp32_modules_strict``
    for float16 and bfloat16. The VAE is left as it is."""
    for module in (parts.transformer, parts.text_encoder, parts.image_encoder):
        if module is parts.transformer:
            keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
        else:
            keep = set(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
            if dtype == torch.float16:
                keep |= set(getattr(module, "_keep_in_fp32_modules", None) or ())
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point() and not keep.intersection(name.split(".")):
                tensor.data = tensor.data.to(dtype)
    return parts


def local_device(spec: str = "auto") -> torch.device:
    """Where this rank loads the backbone: ``"auto"`` is its own GPU (``cuda:LOCAL_RANK``, else
    ``SLURM_LOCALID``, else 0) when CUDA is available, else the CPU; anything else is taken as a
    device string (:func:`d4d.utils.devices.resolve_device`, which the commands' ``--device`` uses)."""
    return resolve_device(spec)


def load_wan(source: str, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None) -> WanParts:
    """Load the five parts from a local diffusers directory or a hub id (``Wan-AI/...-Diffusers``).

    Memory: the transformer, the UMT5 text encoder and the CLIP image encoder are read in ``dtype``
    (the frozen parts of the dynamic stage: bfloat16 halves the host memory of the full model,
    45 GB instead of 91 GB for Wan 14B + UMT5-XXL + CLIP-H); the VAE (0.1B) stays float32, as Wan's
    own pipeline runs it. Weights are read with ``low_cpu_mem_usage`` (the module is built empty and
    the safetensors are copied in once, no randomly initialised second copy) and, with ``device``,
    straight onto that device (``device_map``), so a rank of an 8-GPU node never holds the model in
    host memory: :func:`local_device` picks the rank's GPU.

    Raises :class:`UserError` naming ``source`` when it cannot be read.
    """
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, CLIPVisionModel, UMT5EncoderModel

    place = {"low_cpu_mem_usage": True}
    if device is not None and torch.device(device).type != "cpu":
        place["device_map"] = {"": torch.device(device)}
    try:
        transformer = WanTransformer3DModel.from_pretrained(source, subfolder="transformer", torch_dtype=dtype, **place)
        vae = AutoencoderKLWan.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32, **place)
        text_encoder = UMT5EncoderModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **place)
        tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer")
        image_encoder = CLIPVisionModel.from_pretrained(source, subfolder="image_encoder", dtype=dtype, **place)
        processor = _read_processor_config(source)
    except (OSError, ValueError, EnvironmentError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"model.backbone: cannot load Wan parts from {source!r}: {first}") from None
    crop = processor.get("crop_size", 224)
    side = int(crop["height"] if isinstance(crop, dict) else crop)
    return WanParts(transformer, vae, text_encoder, tokenizer, image_encoder,
                    tuple(processor["image_mean"]), tuple(processor["image_std"]), side)


def _read_processor_config(source: str) -> dict[str, Any]:
    """``image_processor/preprocessor_config.json`` (read as JSON: the CLIP processor class would
    want torchvision, and only its size, mean and std are used)."""
    local = os.path.join(source, "image_processor", "preprocessor_config.json")
    if not os.path.isdir(source):
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(source, "preprocessor_config.json", subfolder="image_processor")
    with open(local) as f:
        return json.load(f)


def build_published_wan(dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "meta") -> WanParts:
    """The full-size Wan 2.1 I2V 14B 480P parts, without weights, from the published configs
    (:mod:`d4d.models.published`), in the dtypes :func:`load_wan` reads them in: transformer, UMT5
    and CLIP in ``dtype`` with what ``from_pretrained(torch_dtype=dtype)`` keeps in float32
    (diffusers: the class's ``_keep_in_fp32_modules`` for any dtype; transformers: ``..._strict``
    for fp16/bf16, ``_keep_in_fp32_modules`` for fp16 only), the VAE in float32. On ``"meta"``
    (default) nothing is allocated: for counting parameters, FLOPs and memory
    (``benchmarks/memory_plan.py``). The tokenizer is the character stand-in of the tiny model
    (UMT5's own is a download); it only makes token ids."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    from d4d.models.published import (WAN21_CLIP_VIT_H14, WAN21_I2V_14B_TRANSFORMER, WAN21_IMAGE_PROCESSOR,
                                      WAN21_UMT5_XXL, WAN21_VAE)

    with torch.device(device):
        transformer = WanTransformer3DModel(**WAN21_I2V_14B_TRANSFORMER)
        vae = AutoencoderKLWan(**WAN21_VAE)
        text_encoder = UMT5EncoderModel(UMT5Config(**WAN21_UMT5_XXL))
        image_encoder = CLIPVisionModel(CLIPVisionConfig(**WAN21_CLIP_VIT_H14))
    proc = WAN21_IMAGE_PROCESSOR
    parts = WanParts(transformer, vae, text_encoder, _char_tokenizer(), image_encoder,
                     tuple(proc["image_mean"]), tuple(proc["image_std"]), int(proc["crop_size"]))
    return cast_frozen(parts, dtype) if dtype != torch.float32 else parts
