"""Reading WebDataset shards of :mod:`d4d.data.schema` clips: the pipeline every training stage uses.

    dataset = build_clip_pipeline("data/re10k/shard-{000000..000099}.tar", shuffle=500,  # or https://host/...
                                  resampled=True, epoch_length=20_000, transform=to_tensors)
    loader = DataLoader(dataset, batch_size=8, num_workers=4, persistent_workers=True)

Data flow in each process: shard paths -> (shuffle, split by rank and by DataLoader worker, or draw
with replacement) -> raw samples read from the tar (bytes per field) -> shuffle buffer (of the
compressed bytes, so a large buffer stays cheap) -> decode + :meth:`ClipSample.from_raw` ->
``transform`` -> yielded.

Bad data is skipped, not fatal: see :mod:`d4d.data.skips` for the reasons, the per-process counts
and the threshold beyond which the run stops. Good samples and failures are all counted at one place,
as they leave the shuffle buffer (failures met while reading a tar travel through the buffer as
markers), so the skipped fraction is failures / (failures + good samples) in stream order. A finite
pass (no ``epoch_length``) that ends without one usable sample is an error, not an empty epoch.

Shards are local files (a mounted cluster filesystem counts), ``file:`` URLs, http(s) URLs (read with
curl, with timeouts), ``pipe:COMMAND`` specs or webdataset's other ``gopen`` schemes; see
:mod:`d4d.data.urls` for the spec syntax (brace expansion for every scheme) and the timeouts. Every
shard is read forward once, as a stream, by d4d's own tar reader, which checks that each tar ends
with its end-of-archive block (how a truncated shard is told from a complete one, also over a pipe)
and, for a command or curl, that it exited successfully. Splitting by rank and worker, resampling,
shuffling and skip counting work on the list of shard names, the same for every scheme.
"""
from __future__ import annotations

import itertools
import os
import random
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch.utils.data
from webdataset.utils import pytorch_worker_info

from d4d.data.schema import ClipSample, SampleError
from d4d.data.skips import (DECODE_ERROR, INVALID_SAMPLE, REASONS, REJECTED, DataError, FieldDecodeError,
                             NoUsableSampleError, Skipped, SkipStats)
from d4d.data.tar_reader import decode_sample, read_tar_items, read_tar_samples  # noqa: F401 (re-exported)
from d4d.data.urls import expand_urls  # noqa: F401 (re-exported)
from d4d.utils.errors import UserError
from d4d.utils.logging import get_logger

log = get_logger(__name__)


# -------------------------------------------------------------------------------------- pipeline
def _rng(*parts: int) -> random.Random:
    """A Random seeded from integers only (``hash`` of strings differs between processes)."""
    state = np.random.SeedSequence([p % (1 << 63) for p in parts]).generate_state(2)
    return random.Random(int(state[0]) << 32 | int(state[1]))


def _shuffled(items: Iterable[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``bufsize`` items (no-op for ``bufsize <= 1``)."""
    if bufsize <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < bufsize:
            buffer.append(item)
            continue
        i = rng.randrange(bufsize)
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


class ClipShardDataset(torch.utils.data.IterableDataset):
    """An IterableDataset of ``transform(ClipSample)`` read from WebDataset shards.

    Without ``resampled``, one epoch reads every shard once: the shard list is shuffled (when
    ``shuffle > 0``) identically in all processes, then split ``rank::world_size`` and
    ``worker::num_workers``, so together the ranks and workers read each shard exactly once.
    With ``resampled=True`` each process draws shards with replacement, forever, from its own seed.

    ``epoch_length`` is the number of samples one rank's DataLoader yields per epoch (split over its
    workers), which ``len()`` reports so Lightning knows the epoch size. It is required with
    ``resampled``; without it, shards are read again (new order) until the count is reached. Make
    it a multiple of ``num_workers * batch_size`` so every worker fills whole batches and
    ``len(loader)`` is exact. For DDP training use ``epoch_length``: without it ranks may read
    different numbers of samples and the collective ops of the shorter rank wait forever.

    Randomness derives from ``seed``, :meth:`set_epoch`, the number of iterations this copy of the
    dataset has started, and (where split) rank and worker id: identical runs give identical
    streams, and ranks and workers differ. DataLoader workers that are not persistent start from a
    fresh copy every epoch, so call :meth:`set_epoch` each epoch or use ``persistent_workers=True``
    for a new order per epoch.

    :attr:`stats` counts this process's samples (see :mod:`d4d.data.skips`); with workers, each
    worker has its own copy and the threshold applies to each worker's share. A finite pass over a
    process's share that ends without a usable sample raises :class:`NoUsableSampleError`; one that
    ends above the threshold raises :class:`~d4d.data.skips.TooManySkippedError` (its rate is exact).
    """

    def __init__(self, urls: str | os.PathLike | Sequence[str | os.PathLike], *, shuffle: int = 0,
                 resampled: bool = False, epoch_length: int | None = None, seed: int = 0,
                 split_by_node: bool = True, split_by_worker: bool = True, max_skip_fraction: float = 0.05,
                 min_seen_for_threshold: int = 20, frame_indices: Sequence[int] | None = None,
                 transform: Callable[[ClipSample], Any] | None = None):
        super().__init__()
        if shuffle < 0:
            raise UserError(f"shuffle is a buffer size >= 0, got {shuffle}")
        if epoch_length is not None and epoch_length < 1:
            raise UserError(f"epoch_length must be >= 1 or None, got {epoch_length}")
        if resampled and epoch_length is None:
            raise UserError("resampled=True draws shards forever: give epoch_length "
                            "(samples per epoch per rank)")
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise UserError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        self.urls = expand_urls(urls)
        self.shuffle, self.resampled, self.epoch_length, self.seed = shuffle, resampled, epoch_length, seed
        self.split_by_node, self.split_by_worker = split_by_node, split_by_worker
        self.transform = transform
        self.frame_indices = list(frame_indices) if frame_indices is not None else None
        self.stats = SkipStats(max_fraction=max_skip_fraction, min_seen=min_seen_for_threshold)
        self.epoch = 0
        self._iterations = 0  # iterations started by this copy: advances persistent workers' epochs

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the next iteration (Lightning does not call this by itself)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.epoch_length is None:
            raise TypeError("ClipShardDataset has no length without epoch_length")
        return self.epoch_length

    # -------------------------------------------------------------------------------- iteration
    def _process(self) -> tuple[int, int, int, int]:
        """(rank, world_size, worker, num_workers), with 0/1 where this dataset does not split."""
        rank, world, worker, workers = pytorch_worker_info()
        if not self.split_by_node:
            rank, world = 0, 1
        if not self.split_by_worker:
            worker, workers = 0, 1
        return rank, world, worker, workers

    def _quota(self) -> int | None:
        """Samples this worker yields this epoch: ``epoch_length`` spread over the workers."""
        if self.epoch_length is None:
            return None
        _, _, worker, workers = pytorch_worker_info()
        return self.epoch_length // workers + (worker < self.epoch_length % workers)

    def _my_shards(self, key: tuple[int, ...], pass_index: int, rank: int, world: int, worker: int,
                   workers: int) -> list[str]:
        urls = list(self.urls)
        if self.shuffle:
            # the same seed in every process, so the rank/worker slices below partition the list
            _rng(*key, pass_index, 1).shuffle(urls)
        return urls[rank::world][worker::workers]

    def _raw_samples(self, key: tuple[int, ...], rank: int, world: int, worker: int,
                     workers: int) -> Iterator[dict[str, Any] | Skipped]:
        """Raw samples and :class:`Skipped` markers of this process's shards, in reading order."""
        if self.resampled:
            rng = _rng(*key, rank, worker, 2)
            misses = 0  # draws in a row without a sample; the skip threshold stops this first unless it is 1
            while misses < max(1000, 20 * len(self.urls)):
                misses += 1
                for item in read_tar_items(self.urls[rng.randrange(len(self.urls))]):
                    if not isinstance(item, Skipped):
                        misses = 0
                    yield item
            raise DataError(f"{misses} shards drawn in a row without a readable sample "
                            f"({len(self.urls)} shards: {self.urls[0]}, ...)")
        for pass_index in itertools.count():
            shards = self._my_shards(key, pass_index, rank, world, worker, workers)
            if not shards:
                msg = (f"worker {worker}/{workers} of rank {rank}/{world} gets no shard: "
                       f"{len(self.urls)} shards for {world * workers} readers")
                if self.epoch_length is not None:
                    raise DataError(msg + "; use resampled=True or more, smaller shards")
                log.warning("%s; it yields nothing", msg)
            count = 0
            for url in shards:
                for item in read_tar_items(url):
                    count += not isinstance(item, Skipped)
                    yield item
            if self.epoch_length is None:
                return
            if count == 0:  # passing again over shards without a readable sample would never end
                raise DataError(f"no readable sample in the {len(shards)} shards of worker {worker} "
                                f"of rank {rank} ({shards[0]}, ...): cannot fill epoch_length")

    def _decoded(self, items: Iterable[dict[str, Any] | Skipped]) -> Iterator[Any]:
        """Decoded, transformed samples; every item (good, bad or a reader's marker) is counted here."""
        good, skipped_before = 0, self.stats.skipped
        for item in items:
            if isinstance(item, Skipped):
                self.stats.record_skip(item.reason, item.message, item.shard)
                continue
            # the skip is recorded outside the except clauses: a threshold error raised while
            # recording must not carry this sample's error as its context (a second traceback)
            skip: tuple[str, str] | None = None
            try:
                sample = decode_sample(item, self.frame_indices)
            except FieldDecodeError as e:
                skip = (DECODE_ERROR, str(e))
            except SampleError as e:
                skip = (INVALID_SAMPLE, str(e))
            if skip is None and self.transform is not None:
                try:
                    sample = self.transform(sample)
                except SampleError as e:  # a stage's way to say "this clip is unusable here"
                    reason = getattr(e, "reason", REJECTED)
                    skip = (reason if reason in REASONS else REJECTED, str(e))
            if skip is not None:
                self.stats.record_skip(*skip, item.get("__url__"))
                continue
            self.stats.record_ok()
            good += 1
            yield sample
        # a finite pass is over: judge it on its exact numbers
        skipped = self.stats.skipped - skipped_before
        if good == 0 and skipped and self.stats.max_fraction < 1.0:
            raise NoUsableSampleError(
                f"no usable sample: all {skipped} items read were skipped "
                f"(by reason: {', '.join(f'{r} {n}' for r, n in self.stats.by_reason.most_common())}); "
                f"first bad shards: {', '.join(self.stats.bad_shards) or 'unknown'}; "
                f"first errors: {'; '.join(self.stats.first_errors)}")
        self.stats.check_exhausted()

    def __iter__(self) -> Iterator[Any]:
        # everything random in this iteration derives from `key`, fixed here, not when generators run
        key = (self.seed, self.epoch, self._iterations)
        self._iterations += 1
        rank, world, worker, workers = self._process()
        raws = self._raw_samples(key, rank, world, worker, workers)
        raws = _shuffled(raws, self.shuffle, _rng(*key, rank, worker, 3))
        samples = self._decoded(raws)
        quota = self._quota()
        return samples if quota is None else itertools.islice(samples, quota)


def build_clip_pipeline(urls: str | os.PathLike | Sequence[str | os.PathLike], *, shuffle: int = 0,
                        resampled: bool = False, epoch_length: int | None = None, seed: int = 0,
                        split_by_node: bool = True, split_by_worker: bool = True,
                        max_skip_fraction: float = 0.05,
                        min_seen_for_threshold: int = 20, frame_indices: Sequence[int] | None = None,
                        transform: Callable[[ClipSample], Any] | None = None) -> ClipShardDataset:
    """The shard reading pipeline of a training stage; see :class:`ClipShardDataset` for the options.

    Args:
        urls: shard spec for :func:`expand_urls` (brace pattern, directory, glob, URL, ``pipe:``, or list).
        shuffle: shuffle buffer size in samples (0 = tar order); also shuffles the shard list.
        resampled: draw shards with replacement forever (needs ``epoch_length``).
        epoch_length: samples per epoch for one rank's DataLoader (all its workers together).
        seed: base seed of every random choice.
        split_by_node / split_by_worker: give each rank / DataLoader worker its own part of the data.
        max_skip_fraction, min_seen_for_threshold: see :class:`d4d.data.skips.SkipStats`.
        frame_indices: keep (and decode) only these frames of each clip, e.g. ``[0]``.
        transform: ClipSample -> what the stage wants (tensors); raising SampleError skips the sample.
    """
    return ClipShardDataset(urls, shuffle=shuffle, resampled=resampled, epoch_length=epoch_length, seed=seed,
                            split_by_node=split_by_node, split_by_worker=split_by_worker,
                            max_skip_fraction=max_skip_fraction,
                            min_seen_for_threshold=min_seen_for_threshold, frame_indices=frame_indices,
                            transform=transform)
