"""Accounting for samples the shard reader skips: why, how many, and when that is too many.

A training run over millions of clips should not stop on one bad file, but it must not silently
train on a fraction of its data either. :class:`SkipStats` counts every item a reader looked at and
every one it dropped (by reason), logs one warning line per drop, and raises
:class:`TooManySkippedError` once the dropped fraction is above a threshold beyond chance.

Where counting happens: :class:`d4d.data.shards.ClipShardDataset` counts good samples and every
kind of failure at one place, as items leave the shuffle buffer. Failures found while reading a tar
(a shard that cannot be read, the lost tail of a truncated one, a sample with a repeated file) travel
through the buffer as :class:`Skipped` markers, in stream order, so they cannot be counted before the
good samples read alongside them (which once made the early ratio look like 2 failures of 20 and
aborted healthy runs).

Counts are per process: each DataLoader worker holds its own copy of the dataset and therefore its own
:class:`SkipStats`, and checks the threshold on its own share. The copy in the main process stays
at zero when ``num_workers > 0``.

The errors raised here are :class:`d4d.utils.errors.UserError` (bad data is for the user to fix), so
entry points print them as one line; :class:`DataError` also survives the trip from a DataLoader
worker to the main process as that one line (torch rebuilds worker exceptions from a message that
embeds the worker's whole traceback).
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import ClassVar, NamedTuple

from d4d.data.schema import SampleError
from d4d.utils.errors import UserError
from d4d.utils.logging import get_logger

log = get_logger(__name__)

# Reasons a sample (or a whole shard) is skipped.
UNREADABLE_SHARD = "unreadable_shard"  # cannot be opened, or is not a tar at all
TRUNCATED_SHARD = "truncated_shard"  # ends early: the sample being read at that point is lost
DECODE_ERROR = "decode_error"  # a field's bytes do not decode (bad mp4, npy, jpg or json)
INVALID_SAMPLE = "invalid_sample"  # decodes, but violates the schema (ClipSample.from_raw)
REJECTED = "rejected_by_transform"  # the stage's transform raised SampleError
NO_CAMERA = "no_camera"  # the stage needs poses (c2w.npy + intrinsics.npy) and the clip has none
TOO_FEW_FRAMES = "too_few_frames"  # shorter than the stage's window
NO_DEPTH = "no_depth"  # the stage needs depth.npy and nothing else can stand in for it
REASONS = (UNREADABLE_SHARD, TRUNCATED_SHARD, DECODE_ERROR, INVALID_SAMPLE, REJECTED, NO_CAMERA,
           TOO_FEW_FRAMES, NO_DEPTH)


class FieldDecodeError(SampleError):
    """A field's bytes could not be decoded. The message names the sample key, shard and field."""


class SkipSample(SampleError):
    """Raised by a stage's transform: this (valid) clip is unusable here, for ``reason`` (one of
    :data:`REASONS`). Counted under that reason instead of ``rejected_by_transform``."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {REASONS}")
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):
        return type(self), (self.reason, str(self))


class Skipped(NamedTuple):
    """A failure found while reading a tar, passed down the stream to be counted where samples are."""

    reason: str
    message: str
    shard: str | None = None


class DataError(UserError, RuntimeError):
    """Bad data that ends the run: one line naming the shards, exit status 2 at entry points.

    Also a RuntimeError, as these errors were before. Raised in a DataLoader worker, torch rebuilds
    it in the main process as ``type(msg)`` with ``msg`` = "Caught ... in DataLoader worker process
    N.\\nOriginal Traceback ...": the constructor takes that apart and keeps the original one line.
    """

    def __init__(self, message: object = ""):
        text = str(message)
        if text.startswith("Caught ") and "\nOriginal Traceback" in text:
            marker = f"{type(self).__qualname__}: "
            at = text.rfind(marker)
            if at >= 0:
                text = text[at + len(marker):]
        super().__init__(_one_line(text, limit=100_000))


class TooManySkippedError(DataError):
    """More than ``max_skip_fraction`` of the samples seen by one process were skipped."""


class NoUsableSampleError(DataError):
    """A finite pass over a process's shards ended without one usable sample."""


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def wilson_lower_bound(k: int, n: int, z: float) -> float:
    """Lower end of the Wilson score interval of a binomial proportion ``k / n`` at ``z`` sigmas."""
    if n <= 0:
        return 0.0
    p = k / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return (centre - spread) / (1 + z2 / n)


@dataclasses.dataclass
class SkipStats:
    """Counts of items seen and skipped by one process.

    An item is a sample, or a shard that cannot be read at all, or the unfinished tail of a truncated
    one: how many samples those held is unknown, so each counts as one seen-and-skipped item (which
    also keeps a run whose shards are all broken from looping forever under the threshold). All
    items are counted at one place, in stream order (module docstring).

    The threshold: once ``seen >= min_seen``, raise when the skipped fraction is above
    ``max_fraction`` beyond chance, i.e. when the lower end of its Wilson score interval at ``z``
    sigmas is above ``max_fraction``. A plain ``skipped / seen > max_fraction`` test on a sample of
    20 items fires on most healthy sets sooner or later (2 failures in the first 40 items happen
    often at a 1.8% rate); with ``z = 3.5`` a set at 1.8% against a 5% threshold practically never
    fires, while a set with all items bad stops after ``min_seen`` items and one at 35% within about
    50. :meth:`check_exhausted` applies the plain test once a finite pass is over: its rate is then
    exact, not an estimate.

    Attributes:
        max_fraction: the highest acceptable skipped fraction (1.0: never raise).
        min_seen: no verdict before this many items were seen.
        z: how sure the threshold must be (sigmas of the Wilson score interval).
        seen: items looked at (good samples + skipped items).
        skipped: items dropped.
        by_reason: ``{reason: count}`` over :data:`REASONS`.
        first_errors: the first few messages, for the threshold error.
        bad_shards: the first few distinct shards with a skipped item, in order.
    """

    max_fraction: float = 0.05
    min_seen: int = 20
    z: float = 3.5
    seen: int = 0
    skipped: int = 0
    by_reason: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    first_errors: list[str] = dataclasses.field(default_factory=list)
    bad_shards: list[str] = dataclasses.field(default_factory=list)

    keep_errors: ClassVar[int] = 3
    keep_shards: ClassVar[int] = 5

    @property
    def fraction(self) -> float:
        return self.skipped / self.seen if self.seen else 0.0

    def record_ok(self) -> None:
        self.seen += 1
        self._check()

    def record_skip(self, reason: str, message: str, shard: str | None = None) -> None:
        """Count one skipped item (of ``shard``, when known), log one warning line, check the threshold."""
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {REASONS}")
        message = _one_line(message)
        self.seen += 1
        self.skipped += 1
        self.by_reason[reason] += 1
        if len(self.first_errors) < self.keep_errors:
            self.first_errors.append(f"[{reason}] {message}")
        if shard is not None and shard not in self.bad_shards and len(self.bad_shards) < self.keep_shards:
            self.bad_shards.append(str(shard))
        log.warning("skipped (%s): %s", reason, message)
        self._check()

    def _check(self) -> None:
        if (self.seen >= self.min_seen and self.fraction > self.max_fraction
                and wilson_lower_bound(self.skipped, self.seen, self.z) > self.max_fraction):
            raise TooManySkippedError(self.summary())

    def check_exhausted(self) -> None:
        """The threshold after a finite pass: every item of this process's share was counted, so the
        fraction is exact and is compared as it is (still only from ``min_seen`` items on)."""
        if self.seen >= self.min_seen and self.fraction > self.max_fraction:
            raise TooManySkippedError(self.summary())

    def summary(self) -> str:
        """One line: counts, the first bad shards and the first errors."""
        reasons = ", ".join(f"{r} {n}" for r, n in self.by_reason.most_common())
        shards = ", ".join(self.bad_shards) or "unknown"
        return (f"{self.skipped} of {self.seen} samples skipped ({100 * self.fraction:.1f}%) > "
                f"max_skip_fraction {self.max_fraction}; by reason: {reasons}; first bad shards: {shards}; "
                f"first errors: {'; '.join(self.first_errors)} (counts are per DataLoader worker process)")

    def as_dict(self) -> dict[str, object]:
        return {"seen": self.seen, "skipped": self.skipped, "by_reason": dict(self.by_reason)}
