"""The one way d4d selects DeepSpeed: ``deepspeed: zero1 | zero2 | zero3 | zero3_offload | PATH.json``
(a top-level recipe key or ``--deepspeed``) selects :class:`AtomicDeepSpeedStrategy`, Lightning's
DeepSpeed strategy with a shipped config from ``configs/deepspeed`` and d4d's additions:

* checkpoint directories appear atomically (``<name>.tmp`` renamed by rank 0 when all ranks are done);
* resuming reads DeepSpeed's files weights-only (a crafted checkpoint is refused, its code never runs);
* a module with ``checkpoint_frozen_weights = False`` (the dynamic stage on a pretrained backbone)
  gets checkpoints without its frozen parameters (DeepSpeed's ``exclude_frozen_parameters``): they are
  rebuilt from the backbone when the module is made, on resume and for sampling;
* the micro batch size DeepSpeed needs is taken from the data module (``micro_batch_size``), also for
  loaders that batch by themselves (``batch_size=None``), where Lightning's guess fails;
* camera geometry stays float32 through the batch transfer: Lightning casts every floating tensor of
  a batch to bf16/fp16 under DeepSpeed, which rounds ``c2w`` and intrinsics (at 480x832 that flips
  several percent of the epipolar mask entries); the keys of :data:`FP32_BATCH_KEYS` are left as
  they are, everything else is cast as Lightning casts it.

The shipped JSON files hold only the ZeRO section: batch size, gradient accumulation, clipping and
bf16 come from the trainer (``accumulate_grad_batches``, ``gradient_clip_val``, ``precision``) and
the data module, which Lightning writes into the DeepSpeed config, so a recipe states each of them once.
``trainer.strategy: deepspeed_stage_N`` (Lightning's registry names) is refused by ``d4d.fit`` with
the preset to use instead: those strings would bypass all of the above.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.precision import DeepSpeedPrecision
from lightning.pytorch.strategies import DeepSpeedStrategy

from d4d.utils.errors import UserError
from d4d.utils.safe_load import refused, weights_only_loads
from d4d.utils.logging import get_logger

log = get_logger(__name__)
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"

# Batch entries that describe geometry: never rounded to 16 bits by a precision plugin.
FP32_BATCH_KEYS = frozenset({"c2w", "K", "Ks", "depth"})

# Lightning's registered DeepSpeed strategy names -> the d4d preset that does the same
LIGHTNING_DEEPSPEED_NAMES = {
    "deepspeed": "zero2", "deepspeed_stage_1": "zero1", "deepspeed_stage_2": "zero2",
    "deepspeed_stage_2_offload": None, "deepspeed_stage_3": "zero3", "deepspeed_stage_3_offload": "zero3_offload",
    "deepspeed_stage_3_offload_nvme": None,
}


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
    if not isinstance(config, dict):
        raise UserError(f"deepspeed: {path}: expected a JSON object, got {type(config).__name__}")
    for key in ("gradient_accumulation_steps", "train_micro_batch_size_per_gpu", "train_batch_size"):
        if key in config:
            raise UserError(f"deepspeed: {path}: remove {key!r}; the trainer and data module set it")
    return str(path)


def keep_geometry(convert, data: Any) -> Any:
    """``convert(data)`` for everything but the :data:`FP32_BATCH_KEYS` entries of a dict batch."""
    if not isinstance(data, dict):
        return convert(data)
    return {k: v if k in FP32_BATCH_KEYS else convert(v) for k, v in data.items()}


def match_norm_statistics(module) -> int:
    """Cast the running statistics of every BatchNorm/InstanceNorm layer to its weight's dtype.

    DeepSpeed >= 0.19.8 casts parameters to bf16/fp16 but keeps buffers in their dtype, which leaves
    batch norm with bf16 weights and float32 running statistics, a combination ``batch_norm`` refuses.
    (Older DeepSpeed cast the whole module, statistics included; this restores that for norm layers
    only, so other float32 buffers, e.g. normalisation constants, keep their precision.)"""
    from torch.nn.modules.batchnorm import _NormBase

    count = 0
    for layer in module.modules():
        weight = getattr(layer, "weight", None)
        if not isinstance(layer, _NormBase) or weight is None or layer.running_mean is None:
            continue
        if layer.running_mean.dtype != weight.dtype:
            layer.running_mean.data = layer.running_mean.data.to(weight.dtype)
            layer.running_var.data = layer.running_var.data.to(weight.dtype)
            count += 1
    return count


class GeometrySafeDeepSpeedPrecision(DeepSpeedPrecision):
    """Lightning's DeepSpeed precision plugin whose batch cast leaves camera geometry in float32."""

    def convert_input(self, data: Any) -> Any:
        return keep_geometry(super().convert_input, data)


class AtomicDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy with the d4d additions of the module docstring."""

    @DeepSpeedStrategy.precision_plugin.setter
    def precision_plugin(self, plugin) -> None:
        if type(plugin) is DeepSpeedPrecision:
            plugin = GeometrySafeDeepSpeedPrecision(plugin.precision)
        self._precision_plugin = plugin

    def _auto_select_batch_size(self) -> int:
        """Samples per optimizer micro-step on one rank, from the data module's ``micro_batch_size``
        (Lightning reads ``loader.batch_sampler.batch_size``, which a loader that batches by itself
        does not have); else Lightning's own guess."""
        trainer = self.lightning_module.trainer
        datamodule = getattr(trainer, "datamodule", None)
        size = getattr(datamodule, "micro_batch_size", None)
        if size is not None:
            return int(size)
        source = trainer.fit_loop._data_source
        loader = source.dataloader() if source.is_defined() else None
        sampler = getattr(loader, "batch_sampler", None)
        if sampler is not None and getattr(sampler, "batch_size", None):
            return int(sampler.batch_size)
        log.info("DeepSpeed micro batch size: the data module gives none (micro_batch_size); using 1, "
                 "which only affects DeepSpeed's throughput logging")
        return 1

    def init_deepspeed(self) -> None:
        super().init_deepspeed()
        cast = match_norm_statistics(self.lightning_module)
        if cast:
            log.info("DeepSpeed: running statistics of %d normalisation layers cast to their weights' dtype", cast)

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict[str, Any]:
        """Lightning's DeepSpeed resume, with DeepSpeed's unrestricted ``torch.load`` calls
        made weights-only (:mod:`d4d.utils.safe_load`): a crafted checkpoint is refused, not run."""
        try:
            with weights_only_loads():
                return super().load_checkpoint(checkpoint_path, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise refused(checkpoint_path, exc, "resume") from None

    def _names_frozen_parameters_as_saved(self) -> None:
        """DeepSpeed drops frozen parameters from a checkpoint by their ``named_parameters`` names, which
        inside an activation-checkpointed block carry ``_checkpoint_wrapped_module.``, while the state
        dict's keys do not: every frozen weight of a wrapped block stayed in. The engine's
        ``module_state_dict`` is given the same rule with the names as the state dict writes them."""
        engine = self.deepspeed_engine
        if getattr(engine, "_d4d_frozen_by_saved_name", False):
            return
        full = engine.module_state_dict

        def module_state_dict(*args, exclude_frozen_parameters: bool = False, **kwargs):
            state = full(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
            if exclude_frozen_parameters:
                for name, param in engine.module.named_parameters():
                    if not param.requires_grad:
                        state.pop(name.replace("_checkpoint_wrapped_module.", ""), None)
            return state

        engine.module_state_dict = module_state_dict
        engine._d4d_frozen_by_saved_name = True

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        filepath = str(filepath)
        tmp = filepath + ".tmp"
        if getattr(self.lightning_module, "checkpoint_frozen_weights", True) is False:
            self.exclude_frozen_parameters = True  # the module reloads them from its pretrained source
            self._names_frozen_parameters_as_saved()
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("d4d_deepspeed_checkpoint_written")
        if self.is_global_zero:
            if os.path.isdir(filepath):
                shutil.rmtree(filepath)
            os.replace(tmp, filepath)
        self.barrier("d4d_deepspeed_checkpoint_renamed")
