"""Load Qwen2.5-VL, its tokenizer and its image-only processor (no torchvision needed).

The stock ``AutoProcessor`` of Qwen2.5-VL also builds a video processor, which needs torchvision;
``Qwen2VLImageProcessorPil`` (PIL + numpy) reads the same ``preprocessor_config.json`` and gives
the same ``pixel_values`` / ``image_grid_thw``, so the selector uses it with the tokenizer directly.
"""
from __future__ import annotations

from pathlib import Path

from d4d.utils.errors import UserError
from d4d.utils.logging import get_logger

log = get_logger(__name__)

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(dtype: str, device: str):
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere; else the named torch dtype."""
    import torch

    if dtype not in _DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(_DTYPES)}")
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def image_processor_class():
    """``Qwen2VLImageProcessorPil`` (transformers >= 5); UserError naming the version otherwise."""
    import transformers

    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    except ImportError:
        raise UserError(f"transformers {transformers.__version__} has no Qwen2VLImageProcessorPil "
                        "(the torchvision-free Qwen2-VL image processor): install transformers>=5") from None
    return Qwen2VLImageProcessorPil


def load_qwen2_5_vl(name_or_path: str, device: str = "cpu", dtype: str = "auto",
                    max_pixels: int | None = None):
    """Local directory or hub id -> ``(model, tokenizer, image_processor)``; UserError naming it on failure.

    ``max_pixels`` caps the image area the processor resizes to (fewer vision tokens, faster).
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    from d4d.selectors.vlm import is_local

    path = Path(name_or_path).expanduser()
    if is_local(name_or_path) and not path.is_dir():
        raise UserError(f"--model {name_or_path}: directory not found")
    source = str(path) if path.is_dir() else name_or_path
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    torch_dtype = resolve_dtype(dtype, device)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise UserError(f"--model {name_or_path}: cannot read a model config ({_first_line(exc)})") from None
    if config.model_type != "qwen2_5_vl":
        raise UserError(f"--model {name_or_path}: model_type is {config.model_type!r}, expected 'qwen2_5_vl'")
    log.info("loading %s (%s on %s)", source, str(torch_dtype).removeprefix("torch."), device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
        image_processor = image_processor_class().from_pretrained(source, **kwargs)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(source, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise UserError(f"--model {name_or_path}: cannot load ({_first_line(exc)})") from None
    return model.to(device).eval(), tokenizer, image_processor


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else exc.__class__.__name__
