"""Callbacks and Lightning plugins that ``d4d.fit`` adds to every run: atomic step checkpoints with
keep-last-k, the RNG state needed for exact resume, ``init_from`` and activation checkpointing at
``configure_model`` time, and a DeepSpeed strategy that writes atomically. See ``docs/cluster.md``."""
from d4d.callbacks.checkpointing import AtomicCheckpointIO, ResumeState, StepCheckpoint, atomic_torch_save
from d4d.callbacks.configure import prepare_at_configure

__all__ = ["AtomicCheckpointIO", "ResumeState", "StepCheckpoint", "atomic_torch_save", "prepare_at_configure"]
