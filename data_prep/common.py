"""Shared machinery of the dataset preparation CLIs: arguments, Slurm slicing, resumable shards.

Work layout. The inputs (clips or images, in a fixed sorted order) are cut into *groups* of
``--shard-size`` consecutive inputs; group ``g`` writes exactly one shard ``OUT/<sub>/shard-{g:06d}.tar``
per output folder (``sub`` is ``""`` for the main samples, e.g. ``motion_images`` for extra outputs;
a folder gets no shard from a group that produced no sample for it) and then its record
``OUT/parts/group-{g:06d}.json`` (counts, labels, rejected inputs). Shards are written to
``NAME.tmp`` and renamed when complete (:class:`d4d.data.writer.ShardWriter`); the record is
written last, also by rename, so it marks a finished group.

* Slurm arrays: task ``i`` of ``n`` (``--array-index/--array-count`` or ``SLURM_ARRAY_TASK_ID`` and
  ``SLURM_ARRAY_TASK_COUNT``) takes groups ``g`` with ``g % n == i``: disjoint, and names depend on
  ``g`` only, so any ``n`` gives the same files.
* Resume: a group whose record exists (for the same arguments) is skipped; an unfinished group is
  redone from scratch, overwriting its shards with identical bytes; stray ``.tmp`` files are removed.
* ``--workers N``: inputs are processed by a process pool; ``imap`` keeps input order and the parent
  writes, so the output does not depend on ``N``.
* Merge: :func:`merge` combines all group records into ``OUT/manifest.json`` and
  ``OUT/<sub>/manifest.json``; a single-task run merges by itself, array jobs run
  ``python -m data_prep.merge OUT`` once all tasks are done.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from d4d.data.writer import ShardWriter
from d4d.geometry.motions import MOTIONS
from d4d.utils.cli_args import OneLineParser, nonneg_int, positive_int
from d4d.utils.errors import UserError, exit_with_error
from d4d.utils.logging import get_logger
from d4d.utils.paths import check_output_dir

log = get_logger("data_prep")

PARTS = "parts"
#: Debug/test hook: seconds to sleep after each input, to make a run slow enough to interrupt.
THROTTLE_ENV = "D4D_PREP_THROTTLE_S"


@dataclasses.dataclass
class ItemResult:
    """What processing one input gave.

    Attributes:
        item_id: the input's name (clip id, file name) for the manifest.
        samples: output sub-folder (``""`` = main) -> encoded samples (see ``encode_sample``).
        labels: motion label (or None) of each main sample, for the histogram.
        rejected: the reason the input was rejected, or None.
    """

    item_id: str
    samples: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    labels: list[str | None] = dataclasses.field(default_factory=list)
    rejected: str | None = None


class ReproducibleShardWriter(ShardWriter):
    """ShardWriter whose tar members carry mtime 0, so equal samples give byte-identical shards."""

    def _open(self) -> None:
        super()._open()
        self._tar.mtime = 0.0


class Parser(OneLineParser):
    """ArgumentParser whose errors are one line and exit with status 2 (:class:`d4d.utils.cli_args.OneLineParser`)."""


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--workers", type=positive_int, default=1, help="processes (output does not depend on it)")
    p.add_argument("--shard-size", type=positive_int, default=64, help="inputs (clips/images) per shard")
    p.add_argument("--array-index", type=nonneg_int, default=None,
                   help="this task's index (default $SLURM_ARRAY_TASK_ID or 0)")
    p.add_argument("--array-count", type=positive_int, default=None,
                   help="number of tasks (default $SLURM_ARRAY_TASK_COUNT or 1)")


def array_task(args: argparse.Namespace, prog: str) -> tuple[int, int]:
    """(index, count) of this array task: flags first, then the Slurm environment, else (0, 1)."""
    def pick(flag: int | None, env: str, default: int) -> int:
        if flag is not None:
            return flag
        try:
            return int(os.environ.get(env, default))
        except ValueError:
            exit_with_error(f"${env} is not an integer: {os.environ[env]!r}", prog)
    count = pick(args.array_count, "SLURM_ARRAY_TASK_COUNT", 1)
    index = pick(args.array_index, "SLURM_ARRAY_TASK_ID", 0)
    if count < 1 or not 0 <= index < count:
        exit_with_error(f"array index {index} is not in [0, {count}) (--array-index/--array-count)", prog)
    return index, count


def check_common(args: argparse.Namespace, prog: str) -> None:
    """Checks of the common arguments, right after parsing: counts, and that ``--out`` can be written."""
    if args.workers < 1:
        exit_with_error(f"--workers must be >= 1, got {args.workers}", prog)
    if args.shard_size < 1:
        exit_with_error(f"--shard-size must be >= 1, got {args.shard_size}", prog)
    try:
        check_output_dir(args.out, "--out")
    except UserError as exc:
        exit_with_error(str(exc), prog)


def fingerprint(args: argparse.Namespace) -> str:
    """Hash of the arguments that change the output (not --out, --workers, or the array slicing)."""
    skip = {"out", "workers", "array_index", "array_count"}
    kept = {k: str(v) for k, v in sorted(vars(args).items()) if k not in skip}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _init_worker(initializer: Callable[[], None] | None) -> None:
    torch.set_num_threads(1)  # no oversubscription, and the same floats as a single process
    if initializer is not None:
        initializer()


def run_prep(dataset: str, items: Sequence[Any], process: Callable[[Any], ItemResult], args: argparse.Namespace,
             prog: str, subdirs: Sequence[str] = ("",), unit: str = "item") -> dict[str, Any]:
    """Process ``items`` (picklable, fixed order) with ``process`` into shards under ``args.out``.

    Returns the merged manifest when this is the only array task, else this task's summary.
    """
    index, count = array_task(args, prog)
    out: Path = args.out
    parts = out / PARTS
    for sub in subdirs:
        (out / sub).mkdir(parents=True, exist_ok=True)
    parts.mkdir(parents=True, exist_ok=True)
    n_groups = max(1, -(-len(items) // args.shard_size))
    fp = fingerprint(args)
    mine = [g for g in range(n_groups) if g % count == index]
    pending = []
    for g in mine:
        rec = parts / f"group-{g:06d}.json"
        if rec.exists() and json.loads(rec.read_text()).get("fingerprint") == fp:
            continue
        for sub in subdirs:  # leftovers of an interrupted attempt
            (out / sub / f"shard-{g:06d}.tar.tmp").unlink(missing_ok=True)
            (out / sub / f"shard-{g:06d}.tar").unlink(missing_ok=True)
        pending.append(g)
    todo = [(g, items[i]) for g in pending for i in range(g * args.shard_size, min(len(items), (g + 1) * args.shard_size))]
    log.info("%s: task %d/%d, %d of %d groups to do (%d done earlier), %d %ss", dataset, index, count,
             len(pending), len(mine), len(mine) - len(pending), len(todo), unit)
    torch.set_num_threads(1)
    throttle = float(os.environ.get(THROTTLE_ENV, "0") or 0)
    pool = None
    if args.workers > 1 and len(todo) > 1:
        pool = mp.get_context("spawn").Pool(args.workers, initializer=_init_worker, initargs=(None,))
        results = pool.imap(process, [it for _, it in todo], chunksize=1)
    else:
        results = map(process, (it for _, it in todo))
    start = time.perf_counter()
    totals: Counter = Counter()
    state: dict[str, Any] = {"group": None}

    def finish_group() -> None:
        g = state["group"]
        if g is None:
            return
        shards = {}
        for sub, w in state["writers"].items():
            w.close()
            shards[sub] = [p.name for p in w.shards]
        _write_json(parts / f"group-{g:06d}.json", {
            "dataset": dataset, "group": g, "groups": n_groups, "fingerprint": fp, "shards": shards,
            "inputs": state["inputs"], "samples": dict(state["samples"]), "motions": dict(state["motions"]),
            "rejected": state["rejected"], "args": {k: str(v) for k, v in sorted(vars(args).items())
                                                    if k not in ("out", "workers", "array_index", "array_count")},
        })
        state["group"] = None

    try:
        bar = tqdm(zip(todo, results), total=len(todo), desc=dataset, unit=unit, dynamic_ncols=True,
                   file=sys.stderr, mininterval=0.5, disable=bool(os.environ.get("TQDM_DISABLE")))
        for (g, _), res in bar:
            if g != state["group"]:
                finish_group()
                state.update(group=g, inputs=0, samples=Counter(), motions=Counter(), rejected=[],
                             writers={sub: ReproducibleShardWriter(out / sub, prefix="shard", max_count=1 << 40,
                                                                   max_bytes=1 << 62, start_index=g)
                                      for sub in subdirs})
            state["inputs"] += 1
            if res.rejected is not None:
                state["rejected"].append({"id": res.item_id, "reason": res.rejected})
                totals["rejected"] += 1
            for sub, samples in res.samples.items():
                for s in samples:
                    state["writers"][sub].write(s)
                state["samples"][sub] += len(samples)
                totals[f"samples:{sub}"] += len(samples)
            for label in res.labels:
                state["motions"][label or "unlabelled"] += 1
            bar.set_postfix(samples=totals["samples:"], rejected=totals["rejected"], refresh=False)
            if throttle:
                time.sleep(throttle)
        finish_group()
    finally:
        if pool is not None:
            pool.terminate()
    seconds = time.perf_counter() - start
    log.info("%s: %d %ss in %.1f s (%.2f %ss/s), %d samples, %d rejected", dataset, len(todo), unit, seconds,
             len(todo) / max(seconds, 1e-9), unit, totals["samples:"], totals["rejected"])
    if count == 1:
        return merge(out, prog)
    log.info("%s: task %d/%d done; once every task is done run: python -m data_prep.merge %s",
             dataset, index, count, out)
    return {"task": index, "count": count, "groups": len(mine), "done": len(pending)}


def merge(out: Path, prog: str = "python -m data_prep.merge") -> dict[str, Any]:
    """Combine ``OUT/parts/group-*.json`` into ``OUT/manifest.json`` (and one per output sub-folder).

    Exits with status 2 when groups are missing (an array task has not finished) or records disagree.
    """
    parts = Path(out) / PARTS
    records = sorted(parts.glob("group-*.json")) if parts.is_dir() else []
    if not records:
        exit_with_error(f"{parts}: no group records (run a data_prep module with --out {out} first)", prog)
    recs = [json.loads(p.read_text()) for p in records]
    n, fps = recs[0]["groups"], {r["fingerprint"] for r in recs}
    if len(fps) > 1 or {r["groups"] for r in recs} != {n}:
        exit_with_error(f"{parts}: group records come from runs with different arguments; delete {out} and rerun", prog)
    missing = sorted(set(range(n)) - {r["group"] for r in recs})
    if missing:
        exit_with_error(f"{parts}: {len(missing)} of {n} groups unfinished (first: {missing[0]}); "
                        "rerun the missing array tasks", prog)
    subs = sorted({s for r in recs for s in r["shards"]})
    motions: Counter = Counter()
    for r in recs:
        motions.update(r["motions"])
    manifest = {
        "dataset": recs[0]["dataset"], "args": recs[0]["args"], "groups": n,
        "inputs": sum(r["inputs"] for r in recs),
        "rejected": [x for r in recs for x in r["rejected"]],
        "samples": {sub or ".": sum(r["samples"].get(sub, 0) for r in recs) for sub in subs},
        "motions": {m: motions[m] for m in (*MOTIONS, "unlabelled") if motions[m]},
        "shards": {sub or ".": [s for r in recs for s in r["shards"].get(sub, [])] for sub in subs},
    }
    manifest["accepted"] = manifest["inputs"] - len(manifest["rejected"])
    _write_json(Path(out) / "manifest.json", manifest)
    for sub in subs:
        if sub:
            _write_json(Path(out) / sub / "manifest.json", {
                "dataset": manifest["dataset"], "samples": manifest["samples"][sub],
                "shards": manifest["shards"][sub], "motions": _sub_motions(Path(out) / sub, manifest["shards"][sub])})
    log.info("manifest: %d inputs, %d accepted, %d rejected, samples %s -> %s", manifest["inputs"],
             manifest["accepted"], len(manifest["rejected"]), manifest["samples"], Path(out) / "manifest.json")
    return manifest


def _sub_motions(folder: Path, shards: list[str]) -> dict[str, int]:
    """Per-label histogram of a sub-folder's samples, read from their meta.json members."""
    import tarfile

    counts: Counter = Counter()
    for name in shards:
        with tarfile.open(folder / name) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".meta.json"):
                    counts[json.load(tar.extractfile(m)).get("motion") or "unlabelled"] += 1
    return {m: counts[m] for m in (*MOTIONS, "unlabelled") if counts[m]}


def need_dir(path: Path, what: str, prog: str) -> Path:
    if not path.is_dir():
        exit_with_error(f"{path}: {what} folder does not exist", prog)
    return path


def safe_key(name: str) -> str:
    """A WebDataset key from a name: no dots or slashes."""
    return name.replace(".", "_").replace("/", "_")
