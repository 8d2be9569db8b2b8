"""Published configurations of the pretrained networks the full recipes load (data only).

Each dict holds the values of the named repository's config file, as the ``from_pretrained`` call of
the stage would read them, so the full-size networks can be built without their weights (on the
meta device: :func:`d4d.models.dynamic.backbone.build_published_wan`, ``benchmarks/memory_plan.py``).
Only fields that change the architecture are listed; the rest are the classes' defaults.
"""
from __future__ import annotations

# --- Wan 2.1 I2V 14B 480P, diffusers layout: Wan-AI/Wan2.1-I2V-14B-480P-Diffusers ---------------
# transformer/config.json (WanTransformer3DModel)
WAN21_I2V_14B_TRANSFORMER = {
    "patch_size": (1, 2, 2), "num_attention_heads": 40, "attention_head_dim": 128, "in_channels": 36,
    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 13824, "num_layers": 40,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": 1280,
    "added_kv_proj_dim": 5120, "rope_max_seq_len": 1024,
}
# text_encoder/config.json (UMT5EncoderModel, UMT5-XXL encoder)
WAN21_UMT5_XXL = {
    "vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6, "tie_word_embeddings": False,
}
# image_encoder/config.json (CLIPVisionModel, OpenCLIP ViT-H/14)
WAN21_CLIP_VIT_H14 = {
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
    "image_size": 224, "patch_size": 14, "projection_dim": 1024, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
}
# vae/config.json (AutoencoderKLWan): the class defaults (base_dim 96, z_dim 16, dim_mult [1, 2, 4, 4],
# 2 res blocks, temperal_downsample [False, True, True], Wan's latents_mean / latents_std)
WAN21_VAE: dict = {}
# image_processor/preprocessor_config.json (CLIPImageProcessor): crop side, mean, std
WAN21_IMAGE_PROCESSOR = {
    "crop_size": 224, "image_mean": (0.48145466, 0.4578275, 0.40821073),
    "image_std": (0.26862954, 0.26130258, 0.27577711),
}

# --- Stable Diffusion 2.1: stabilityai/stable-diffusion-2-1 -------------------------------------
# unet/config.json (UNet2DConditionModel)
SD21_UNET = {
    "sample_size": 96, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True,
    "upcast_attention": True, "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu",
    "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
}
# vae/config.json (AutoencoderKL)
SD21_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2, "norm_num_groups": 32, "act_fn": "silu", "sample_size": 768, "scaling_factor": 0.18215,
}
# stabilityai/stable-diffusion-2-1-unclip: image_encoder/config.json (CLIPVisionModelWithProjection, ViT-H/14)
SD21_UNCLIP_IMAGE_ENCODER = {
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
    "image_size": 224, "patch_size": 14, "projection_dim": 1024, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
}

# --- DINOv2 ViT-B/14: facebook/dinov2-base, config.json (Dinov2Model) ------------------------------
DINOV2_BASE = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "mlp_ratio": 4, "patch_size": 14,
    "image_size": 518, "layerscale_value": 1.0, "layer_norm_eps": 1e-6, "hidden_act": "gelu", "qkv_bias": True,
    "use_swiglu_ffn": False,
}

# --- ResNet-18: microsoft/resnet-18, config.json (ResNetModel) -------------------------------------
RESNET18 = {
    "num_channels": 3, "embedding_size": 64, "hidden_sizes": [64, 128, 256, 512], "depths": [2, 2, 2, 2],
    "layer_type": "basic", "hidden_act": "relu", "downsample_in_first_stage": False,
}

# hub id (as the recipes name it) -> what stands in for it on the meta device
PUBLISHED = {
    "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers": {
        "transformer": WAN21_I2V_14B_TRANSFORMER, "text_encoder": WAN21_UMT5_XXL,
        "image_encoder": WAN21_CLIP_VIT_H14, "vae": WAN21_VAE, "image_processor": WAN21_IMAGE_PROCESSOR},
    "stabilityai/stable-diffusion-2-1": {"unet": SD21_UNET, "vae": SD21_VAE},
    "stabilityai/stable-diffusion-2-1-unclip": {"image_encoder": SD21_UNCLIP_IMAGE_ENCODER},
    "facebook/dinov2-base": {"encoder": DINOV2_BASE},
    "microsoft/resnet-18": {"backbone": RESNET18},
}
