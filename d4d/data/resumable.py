"""A DataLoader whose position inside an epoch survives a restart (:class:`ResumableDataLoader`).

Lightning saves :meth:`ResumableDataLoader.state_dict` in every checkpoint and hands it back on
resume; :class:`d4d.callbacks.ResumeState` keeps the loader's epoch and consumed-batch count in step
with the trainer.
"""
from __future__ import annotations

import random
from typing import Any, Iterator

import numpy as np
import torch.utils.data

from d4d.data.shards import ClipShardDataset, _rng
from d4d.utils.errors import UserError
from d4d.utils.logging import get_logger

log = get_logger(__name__)


def _dataset_state(dataset: Any) -> dict[str, int] | None:
    """The in-process counters that seed a dataset's next iteration (``num_workers=0`` matters)."""
    if isinstance(dataset, ClipShardDataset):
        return {"epoch": dataset.epoch, "iterations": dataset._iterations}
    if isinstance(getattr(dataset, "epoch", None), int):
        return {"epoch": dataset.epoch}
    return None


def _load_dataset_state(dataset: Any, state: dict[str, int] | None) -> None:
    if not state:
        return
    if isinstance(dataset, ClipShardDataset):
        dataset.epoch, dataset._iterations = state["epoch"], state["iterations"]
    elif "epoch" in state:
        dataset.epoch = state["epoch"]


class _ResumeView(torch.utils.data.IterableDataset):
    """The dataset as a resumed DataLoader's workers see it: each (impersonated) worker skips the
    items it had already delivered before the checkpoint. Applies once per copy, so persistent
    workers skip only in the resumed epoch."""

    def __init__(self, dataset: torch.utils.data.IterableDataset):
        super().__init__()
        self.inner = dataset
        self.skips: list[int] = []   # items to skip, indexed by the original worker id
        self.rotation = 0            # resumed worker w plays original worker (w + rotation) % W
        self._used = False

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[Any]:
        skips, rotation = (self.skips, self.rotation) if not self._used else ([], 0)
        self._used = True
        info = torch.utils.data.get_worker_info()
        worker = 0
        if info is not None:
            worker = (info.id + rotation) % info.num_workers
            if worker != info.id:
                _impersonate_worker(info, worker)
        skip = skips[worker] if worker < len(skips) else 0
        items = iter(self.inner)
        for _ in range(skip):
            if next(items, _END) is _END:
                break
        return items


_END = object()


def _impersonate_worker(info: Any, worker: int) -> None:
    """Make this DataLoader worker look and seed exactly like worker ``worker`` (torch's own
    per-worker seeding: ``base_seed + id`` for torch and random, ``_generate_state`` for numpy)."""
    from torch.utils.data._utils import worker as worker_mod

    base_seed = info.seed - info.id
    seed = base_seed + worker
    worker_mod._worker_info = worker_mod.WorkerInfo(id=worker, num_workers=info.num_workers, seed=seed,
                                                    dataset=info.dataset)
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(worker_mod._generate_state(base_seed, worker))


class ResumableDataLoader(torch.utils.data.DataLoader):
    """A DataLoader over an IterableDataset whose position inside an epoch survives a restart.

    ``state_dict()`` = ``{"epoch", "batches", "num_workers", "batch_size", "dataset_state"}``: the
    epoch (iterations started by this loader, from 0) and the batches of it consumed by training.
    Lightning saves it in every checkpoint and hands it back to :meth:`load_state_dict` on resume
    (the loader is ``_Stateful``); the next iteration then continues that epoch: with ``W`` workers
    in torch's round-robin order, original worker ``w`` had delivered ``n // W + (w < n % W)``
    batches, which it skips, and workers are rotated so the next batch comes from worker ``n % W``.
    The loader calls the dataset's ``set_epoch`` (if any) before each iteration. Together with the
    per-epoch ``generator`` (worker seeds depend on ``seed`` and the epoch only,
    not on the global RNG) the resumed stream equals the uninterrupted one, item for item, as long
    as the dataset is deterministic given its worker seed and the workers' quotas are equal
    (``epoch_length`` a multiple of ``num_workers * batch_size``).

    Args:
        dataset: an IterableDataset (e.g. :class:`ClipShardDataset`); available as :attr:`inner`.
        seed: base of the per-epoch generator (default: ``torch.initial_seed()`` at construction,
            i.e. the recipe's ``seed_everything``).
        lookahead: batches a plain consumer fetches ahead of the one it trains on (a ``for`` loop:
            0). Consumed = yielded - lookahead until exhaustion, unless the consumer reports the
            count with :meth:`note_consumed` (``d4d.callbacks.ResumeState`` does, after every
            training batch: Lightning's fetcher looks ahead by a number of batches that depends on
            whether the loader has a length).
        Other arguments: as :class:`torch.utils.data.DataLoader` (no ``generator``, no sampler).
    """

    def __init__(self, dataset: torch.utils.data.IterableDataset, *args: Any, seed: int | None = None,
                 lookahead: int = 1, **kwargs: Any):
        if not isinstance(dataset, torch.utils.data.IterableDataset):
            raise TypeError("ResumableDataLoader reads IterableDatasets (map-style: use a sampler with state)")
        if "generator" in kwargs:
            raise TypeError("ResumableDataLoader makes its own per-epoch generator from `seed`")
        super().__init__(_ResumeView(dataset), *args, **kwargs)
        self.seed = torch.initial_seed() if seed is None else int(seed)
        self.lookahead = int(lookahead)
        self._epoch = -1
        self._iterating = False  # an iterator of epoch `_epoch` has been made
        self.restored: dict[str, Any] | None = None  # the state the last iteration continued from
        self._yielded = 0
        self._exhausted = False
        self._pending: dict[str, Any] | None = None
        self._epoch_dataset_state: dict[str, int] | None = None
        self._consumed: int | None = None
        self._noted = False

    @property
    def inner(self) -> torch.utils.data.IterableDataset:
        return self.dataset.inner

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch ``epoch`` (by default iterations count 0, 1, ...).

        A no-op when the iteration under way already is epoch ``epoch``: Lightning starts the
        first epoch's iterator (``FitLoop.setup_data``) before ``on_train_epoch_start``, and
        renumbering it then would record epoch ``-1`` in checkpoints taken during epoch 0."""
        epoch = int(epoch)
        if self._iterating and self._epoch == epoch:
            return
        self._epoch = epoch - 1

    def note_consumed(self, batches: int) -> None:
        """Report that ``batches`` batches of the current epoch have been trained on."""
        self._consumed, self._noted = int(batches), True

    def state_dict(self) -> dict[str, Any]:
        consumed = self._consumed if self._consumed is not None else (
            self._yielded if self._exhausted else max(0, self._yielded - self.lookahead))
        return {"epoch": self._epoch, "batches": consumed, "num_workers": self.num_workers,
                "batch_size": self.batch_size, "dataset_state": self._epoch_dataset_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue epoch ``state["epoch"]`` after ``state["batches"]`` batches at the next ``iter``."""
        for key, now in (("num_workers", self.num_workers), ("batch_size", self.batch_size)):
            if state.get(key, now) != now:
                raise UserError(f"data loader {key} is {now} but was {state[key]} when the checkpoint was "
                                f"saved: the position inside epoch {state['epoch']} cannot be restored; "
                                f"resume with {key}={state[key]}")
        self._pending = dict(state)
        self._epoch = int(state["epoch"]) - 1

    def __iter__(self) -> Iterator[Any]:
        self._epoch += 1
        pending, self._pending = self._pending, None
        view: _ResumeView = self.dataset
        done = 0
        if pending is not None and pending["epoch"] == self._epoch:
            done = int(pending["batches"])
            _load_dataset_state(view.inner, pending.get("dataset_state"))
            workers = max(1, self.num_workers)
            per_item = 1 if self.batch_size is None else self.batch_size
            view.skips = [(done // workers + (w < done % workers)) * per_item for w in range(workers)]
            view.rotation = done % workers
            view._used = False
            self.restored = pending
            log.info("resuming epoch %d of the data stream after %d batches", self._epoch, done)
        elif pending is not None:
            raise RuntimeError(f"the data loader was restored at epoch {pending['epoch']} but its next "
                               f"iteration is epoch {self._epoch}")
        if callable(getattr(view.inner, "set_epoch", None)):
            view.inner.set_epoch(self._epoch)  # e.g. ClipShardDataset: a new shard order per epoch
        self._epoch_dataset_state = _dataset_state(view.inner)
        self.generator = torch.Generator().manual_seed(int(_rng(self.seed, self._epoch, 4).getrandbits(62)))
        self._yielded, self._exhausted = done, False
        self._consumed = done if self._noted else None
        iterator = super().__iter__()
        self._iterating = True
        view.skips, view.rotation = [], 0
        return self._counted(iterator)

    def _counted(self, iterator: Iterator[Any]) -> Iterator[Any]:
        for batch in iterator:
            self._yielded += 1
            yield batch
        self._exhausted = True
