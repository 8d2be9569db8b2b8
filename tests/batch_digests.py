"""A test callback for ``d4d.fit`` runs (added with ``--trainer.callbacks+=``): it appends a digest of
every training batch to a file, and can SIGKILL its own process at the start of a given step, after
that step's checkpoint was written, the way a node failure or an OOM kill ends a run."""
from __future__ import annotations

import hashlib
import os
import signal
from typing import Any

import torch
from lightning.pytorch import Callback


def digest(batch: Any) -> str:
    """A hash of a batch's contents: tensors by dtype, shape and bytes; mappings by sorted key."""
    h = hashlib.sha1()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(f"K{k}".encode())
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for item in x:
                feed(item)
        else:
            h.update(f"V{x!r}".encode())

    feed(batch)
    return h.hexdigest()


class BatchDigests(Callback):
    """Append ``epoch batch_idx global_step digest`` per training batch to ``path``; SIGKILL this
    process when a batch starts at ``global_step == kill_at_step``."""

    def __init__(self, path: str, kill_at_step: int = -1):
        self.path, self.kill_at_step = path, int(kill_at_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        with open(self.path, "a") as f:
            f.write(f"{trainer.current_epoch} {batch_idx} {trainer.global_step} {digest(batch)}\n")
