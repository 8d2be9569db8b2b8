"""Training helpers of the 4D generator: a checkpoint every fraction of an epoch (Table 3: every 0.1
epoch) and the half-cosine learning-rate schedule with linear warm-up (``reference.md`` section 7)."""
from __future__ import annotations

import math

from lightning.pytorch.callbacks import ModelCheckpoint


class FractionModelCheckpoint(ModelCheckpoint):
    """A :class:`ModelCheckpoint` that saves every ``every_epochs`` of an epoch (e.g. 0.1), converted to
    optimizer steps from the trainer's batches per epoch. When the epoch length is unknown (an
    iterable dataset without ``epoch_length``), it is measured over the first epoch, which then saves
    only at its end (every epoch end saves too). Other arguments are ModelCheckpoint's, with its
    defaults (set ``save_last``, ``filename`` etc. in the recipe). The class name ends in ``ModelCheckpoint`` so that
    ``d4d.fit`` puts its files in ``<run_dir>/checkpoints``."""

    def __init__(self, every_epochs: float = 0.1, **kwargs):
        if every_epochs <= 0:
            raise ValueError(f"every_epochs must be > 0, got {every_epochs}")
        kwargs["every_n_train_steps"] = None
        super().__init__(**kwargs)
        self.every_epochs = every_epochs
        self._every_n_train_steps = 10**12  # set when the epoch length is known

    def _set_interval(self, batches_per_epoch: float, trainer) -> None:
        steps = batches_per_epoch / max(1, trainer.accumulate_grad_batches)
        self._every_n_train_steps = max(1, round(self.every_epochs * steps))

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        batches = trainer.num_training_batches
        if batches and math.isfinite(batches):
            self._set_interval(batches, trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._every_n_train_steps >= 10**12 and trainer.current_epoch == 0 and trainer.global_step > 0:
            self._set_interval(trainer.global_step * max(1, trainer.accumulate_grad_batches), trainer)
        super().on_train_epoch_end(trainer, pl_module)


def warmup_half_cosine(step: int, total_steps: int, warmup_steps: int, base_lr: float, final_lr: float) -> float:
    """Multiplier of ``base_lr`` at ``step``: linear from ~0 to 1 over ``warmup_steps``, then half a
    cosine from ``base_lr`` down to ``final_lr`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    lr = final_lr + (base_lr - final_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return lr / base_lr


class WarmupHalfCosine:
    """:func:`warmup_half_cosine` as a ``LambdaLR`` multiplier whose length is set later
    (:meth:`set_length`), once the trainer knows its step count without building the training
    loader early. A callable object, not a lambda: ``LambdaLR`` saves its fields in checkpoints.
    Until the length is set the multiplier is 1."""

    def __init__(self, base_lr: float, final_lr: float, warmup_epochs: float):
        self.base_lr, self.final_lr, self.warmup_epochs = float(base_lr), float(final_lr), float(warmup_epochs)
        self.total_steps: int | None = None
        self.warmup_steps = 0

    def set_length(self, total_steps: int, epochs: int) -> None:
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = int(round(self.warmup_epochs * self.total_steps / max(1, epochs)))

    def __call__(self, step: int) -> float:
        if self.total_steps is None:
            return 1.0
        return warmup_half_cosine(step, self.total_steps, self.warmup_steps, self.base_lr, self.final_lr)

