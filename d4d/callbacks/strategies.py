"""Strategy presets: ``deepspeed: zero2 | zero3 | zero3_offload | PATH.json`` in a recipe (top-level)
selects Lightning's DeepSpeed strategy with a shipped config from ``configs/deepspeed``.

The shipped JSON files hold only the ZeRO section: batch size, gradient accumulation, clipping and
bf16 come from the trainer (``accumulate_grad_batches``, ``gradient_clip_val``, ``precision``), which
Lightning writes into the DeepSpeed config, so a recipe states each of them once.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from lightning.pytorch.strategies import DeepSpeedStrategy

from d4d.utils.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"


def deepspeed_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def resolve_deepspeed_config(spec: str) -> str:
    """Path of the DeepSpeed JSON named by ``spec`` (a preset name or a file); UserError otherwise."""
    path = CONFIG_DIR / f"{spec}.json" if not spec.endswith(".json") else Path(spec)
    if not path.is_file():
        raise UserError(f"deepspeed: {spec!r} is neither a preset ({', '.join(deepspeed_presets())}) "
                        "nor an existing .json file")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"deepspeed: {path}: not valid JSON ({exc.msg} line {exc.lineno})") from None
    for key in ("gradient_accumulation_steps", "train_micro_batch_size_per_gpu", "train_batch_size"):
        if key in config:
            raise UserError(f"deepspeed: {path}: remove {key!r}; the trainer and data module set it")
    return str(path)


class AtomicDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy whose checkpoint directories appear atomically: every rank
    writes its shards into ``<name>.tmp``, then global rank 0 renames it to ``<name>`` (replacing an
    older one of the same name) after all ranks are done."""

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        filepath = str(filepath)
        tmp = filepath + ".tmp"
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("d4d_deepspeed_checkpoint_written")
        if self.is_global_zero:
            if os.path.isdir(filepath):
                shutil.rmtree(filepath)
            os.replace(tmp, filepath)
        self.barrier("d4d_deepspeed_checkpoint_renamed")
