"""Accounting for samples the shard reader skips: why, how many, and when that is too many.

A training run over millions of clips should not stop on one bad file, but it must not silently
train on a fraction of its data either. :class:`SkipStats` counts every sample a reader looked at and
every one it dropped (by reason), logs one warning line per drop, and raises
:class:`TooManySkippedError` once the dropped fraction passes a threshold.

Counts are per process: each DataLoader worker holds its own copy of the dataset and therefore its own
:class:`SkipStats`, and checks the threshold on its own share. The copy in the main process stays
at zero when ``num_workers > 0``.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import ClassVar

from d4d.data.schema import SampleError
from d4d.utils.logging import get_logger

log = get_logger(__name__)

# Reasons a sample (or a whole shard) is skipped.
UNREADABLE_SHARD = "unreadable_shard"  # cannot be opened, or is not a tar at all
TRUNCATED_SHARD = "truncated_shard"  # ends early: the sample being read at that point is lost
DECODE_ERROR = "decode_error"  # a field's bytes do not decode (bad mp4, npy, jpg or json)
INVALID_SAMPLE = "invalid_sample"  # decodes, but violates the schema (ClipSample.from_raw)
REJECTED = "rejected_by_transform"  # the stage's transform raised SampleError
REASONS = (UNREADABLE_SHARD, TRUNCATED_SHARD, DECODE_ERROR, INVALID_SAMPLE, REJECTED)


class FieldDecodeError(SampleError):
    """A field's bytes could not be decoded. The message names the sample key, shard and field."""


class TooManySkippedError(RuntimeError):
    """More than ``max_skip_fraction`` of the samples seen by one process were skipped."""


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclasses.dataclass
class SkipStats:
    """Counts of samples seen and skipped by one process.

    A shard that cannot be read at all, or the unfinished tail of a truncated one, counts as one
    seen-and-skipped item: how many samples it held is unknown, and counting it keeps a run whose
    shards are all broken from looping forever under the threshold.

    Attributes:
        max_fraction: raise once ``skipped / seen`` exceeds this ...
        min_seen: ... and at least this many items were seen (a single early failure is not a rate).
        seen: items looked at (good samples + skipped items).
        skipped: items dropped.
        by_reason: ``{reason: count}`` over :data:`REASONS`.
        first_errors: the first few messages, for the threshold error.
    """

    max_fraction: float = 0.05
    min_seen: int = 20
    seen: int = 0
    skipped: int = 0
    by_reason: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    first_errors: list[str] = dataclasses.field(default_factory=list)

    keep_errors: ClassVar[int] = 5

    @property
    def fraction(self) -> float:
        return self.skipped / self.seen if self.seen else 0.0

    def record_ok(self) -> None:
        self.seen += 1
        self._check()

    def record_skip(self, reason: str, message: str) -> None:
        """Count one skipped item, log one warning line and check the threshold."""
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {REASONS}")
        message = _one_line(message)
        self.seen += 1
        self.skipped += 1
        self.by_reason[reason] += 1
        if len(self.first_errors) < self.keep_errors:
            self.first_errors.append(f"[{reason}] {message}")
        log.warning("skipped (%s): %s", reason, message)
        self._check()

    def _check(self) -> None:
        if self.seen >= self.min_seen and self.fraction > self.max_fraction:
            raise TooManySkippedError(
                f"{self.skipped} of {self.seen} samples skipped ({100 * self.fraction:.1f}%) > "
                f"max_skip_fraction {self.max_fraction}: first errors: {'; '.join(self.first_errors)}"
                " (counts are per DataLoader worker process)"
            )

    def as_dict(self) -> dict[str, object]:
        return {"seen": self.seen, "skipped": self.skipped, "by_reason": dict(self.by_reason)}
