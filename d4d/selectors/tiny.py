"""A tiny random Qwen2.5-VL with a locally trained tokenizer and an image-only processor.

For tests and benchmarks (no weights can be downloaded): the architecture is the real
``Qwen2_5_VLForConditionalGeneration`` (window-attention vision tower, M-RoPE text model) at toy
width; the tokenizer is a byte-level BPE trained here on the selector's own prompt text, with the
Qwen special tokens; the processor is ``Qwen2VLImageProcessorPil``. :func:`save_tiny_qwen2_5_vl`
writes all three as a ``from_pretrained`` directory, as a real checkpoint is laid out.
"""
from __future__ import annotations

from pathlib import Path

from d4d.selectors.vlm import DEFAULT_INSTRUCTION, MOTION_PHRASES, SYSTEM_MESSAGE, build_instruction

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")


def tiny_tokenizer(vocab_size: int = 400):
    """Byte-level BPE (as Qwen's) trained on the prompt text, wrapped as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [SYSTEM_MESSAGE, DEFAULT_INSTRUCTION, build_instruction("a cat on a sofa"),
              "system user assistant", *MOTION_PHRASES.values()] * 4
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=list(SPECIAL_TOKENS[1:]))


def tiny_image_processor(max_pixels: int = 56 * 56 * 4):
    """``Qwen2VLImageProcessorPil`` with the Qwen2.5-VL normalisation and a small pixel budget."""
    from d4d.selectors.loading import image_processor_class

    return image_processor_class()(min_pixels=56 * 56, max_pixels=max_pixels, patch_size=14,
                                    temporal_patch_size=2, merge_size=2)


def tiny_qwen2_5_vl(tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4, vision_depth: int = 2,
                    seed: int = 0):
    """Random ``Qwen2_5_VLForConditionalGeneration`` (float32, eval) whose special ids match ``tokenizer``."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = hidden // heads
    mrope = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # Qwen's 16:24:24 split of head_dim/2
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                         max_position_embeddings=4096, bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": mrope}),
        vision_config=dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=56, fullatt_block_indexes=[vision_depth - 1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).float().eval()
    # Random init gives near-uniform answers; a larger output scale makes the eight scores differ
    # clearly, so that tests compare distinct numbers.
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    return model


def save_tiny_qwen2_5_vl(out_dir: str | Path, **kwargs) -> Path:
    """Write a tiny model, tokenizer and ``preprocessor_config.json`` to ``out_dir``; returns it."""
    out_dir = Path(out_dir)
    tokenizer = tiny_tokenizer()
    tiny_qwen2_5_vl(tokenizer, **kwargs).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    tiny_image_processor().save_pretrained(out_dir)
    return out_dir
