"""Checkpoint writing that survives a kill, keep-last-k step checkpoints, and the process state
(RNGs) that Lightning does not save but exact resume needs.

Why a CheckpointIO: Lightning's ``_atomic_save`` writes through an fsspec transaction, which for a
local path writes a ``tempfile.mkstemp()`` file in ``$TMPDIR`` and ``shutil.move``s it: across
filesystems (node-local /tmp -> shared run directory) that is a copy, and a kill during the copy
leaves a truncated checkpoint under the final name. Here the temporary file sits next to the
target, is fsync'ed, and ``os.replace`` makes it appear under its name in one step.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from d4d.utils.errors import UserError
from d4d.utils.logging import get_logger

log = get_logger(__name__)

_STEP_NAME = re.compile(r"step(\d+)\.ckpt")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``<path>.tmp<pid>`` in the same directory, fsync, rename to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch CheckpointIO with an atomic, same-directory, fsync'ed save for local paths
    (remote fsspec URLs keep Lightning's own transaction)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))


class StepCheckpoint(ModelCheckpoint):
    """Step-named checkpoints ``step{step:08d}.ckpt`` every ``every_n_steps`` optimizer steps,
    keeping the newest ``keep_last`` (Lightning's top-k on the ``step`` counter). ``last.ckpt`` is
    not written: ``resume: auto`` finds the newest checkpoint of the run directory by itself."""

    def __init__(self, dirpath: str | None = None, every_n_steps: int = 1000, keep_last: int = 3):
        if every_n_steps < 1:
            raise ValueError(f"checkpoint every_n_steps must be >= 1, got {every_n_steps}")
        if keep_last < 1 and keep_last != -1:
            raise ValueError(f"keep_last must be >= 1 (or -1 for all), got {keep_last}")
        super().__init__(dirpath=dirpath, filename="step{step:08d}", monitor="step", mode="max",
                         save_top_k=keep_last, every_n_train_steps=every_n_steps,
                         auto_insert_metric_name=False, save_on_train_epoch_end=False)
        self.keep_last = keep_last

    def step_checkpoints_on_disk(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of the complete step checkpoints in ``dirpath``, oldest first."""
        if self.dirpath is None or not os.path.isdir(self.dirpath):
            return []
        found = []
        for path in Path(self.dirpath).iterdir():
            match = _STEP_NAME.fullmatch(path.name)
            if match and not path.is_symlink():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if self.keep_last == -1:
            return
        # Lightning's top-k only knows the checkpoints this process saved (and those recorded in the
        # checkpoint it resumed from, under the keep_last of that run): keep-last-k is applied over
        # what is on disk, and Lightning's book-keeping is then made to describe exactly those files.
        on_disk = self.step_checkpoints_on_disk()
        for _, path in on_disk[:-self.keep_last]:
            if os.path.abspath(path) != os.path.abspath(filepath):
                trainer.strategy.remove_checkpoint(str(path))  # global rank 0 removes, files or DeepSpeed dirs
        kept = on_disk[-self.keep_last:]
        if not kept:
            return
        self.best_k_models = {str(path): torch.tensor(float(step)) for step, path in kept}
        self.kth_best_model_path, self.kth_value = str(kept[0][1]), self.best_k_models[str(kept[0][1])]
        self.best_model_path, self.best_model_score = str(kept[-1][1]), self.best_k_models[str(kept[-1][1])]


def resumable_loaders(trainer) -> list:
    """The training DataLoaders of ``trainer`` that can record their position."""
    from d4d.data.resumable import ResumableDataLoader

    combined = getattr(trainer.fit_loop, "_combined_loader", None)
    loaders = combined.flattened if combined is not None else []
    return [loader for loader in loaders if isinstance(loader, ResumableDataLoader)]


class ResumeState(Callback):
    """Keeps :class:`d4d.data.resumable.ResumableDataLoader` in step with the trainer (its epoch number
    at each epoch start, the batches consumed after each training batch), so that Lightning's
    checkpoints record the exact data position. Saves this process's RNG states (torch CPU/CUDA, numpy, random) with every checkpoint and
    restores them just before the first training batch after a resume, so dropout, noise and
    timestep sampling continue as if the run had not stopped. (Restoring at load time would be
    undone by the sanity-check validation and data-loader start that come before that batch.)
    In multi-process runs the states of global rank 0 are saved and every rank restores them
    (``seed_everything`` gives all ranks the same seed, so their states agree in a normal run)."""

    def __init__(self):
        self._pending: dict[str, Any] | None = None
        self._loader_states = 0  # data-loader states in the checkpoint being resumed

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        self._loader_states = len(fit_loop.get("state_dict", {}).get("combined_loader", []))

    def on_train_start(self, trainer, pl_module) -> None:
        """Refuse to go on when the checkpoint's data position was not applied: the run would
        silently train on the data it had already seen (the loader's iterator was made before the
        checkpoint was loaded, e.g. by ``trainer.estimated_stepping_batches`` in
        ``configure_optimizers``: Lightning issue #20550)."""
        if not self._loader_states:
            return
        unapplied = getattr(trainer.fit_loop, "_combined_loader_states_to_load", None)
        if unapplied or any(loader.restored is None for loader in resumable_loaders(trainer)):
            raise UserError(
                "the checkpoint's data-loader position was not restored: the training loader was iterated "
                "before the checkpoint was loaded (e.g. trainer.estimated_stepping_batches in "
                f"{type(pl_module).__name__}.configure_optimizers, Lightning issue #20550); resuming would "
                "repeat data already trained on")
        self._loader_states = 0

    def state_dict(self) -> dict[str, Any]:
        states = _collect_rng_states(include_cuda=torch.cuda.is_available())
        # numpy's state holds an ndarray, which torch.load(weights_only=True) refuses: store a list
        kind, keys, pos, has_gauss, cached = states["numpy"]
        states["numpy"] = (kind, keys.tolist(), pos, has_gauss, cached)
        return {"rng": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict.get("rng")
        if states is not None and "numpy" in states:
            kind, keys, pos, has_gauss, cached = states["numpy"]
            states["numpy"] = (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)
        self._pending = states

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        for loader in resumable_loaders(trainer):
            loader.set_epoch(trainer.current_epoch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        for loader in resumable_loaders(trainer):
            loader.note_consumed(batch_idx + 1)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._pending is None:
            return
        states, self._pending = self._pending, None
        if "torch.cuda" in states and not torch.cuda.is_available():
            states = {k: v for k, v in states.items() if k != "torch.cuda"}
        _set_rng_states(states)
        log.info("restored the RNG states of the checkpoint at step %d", trainer.global_step)
