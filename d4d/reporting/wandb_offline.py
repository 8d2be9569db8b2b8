"""Read a wandb run from its local files, without network: the ``run-<id>.wandb`` transaction log.

The log is LevelDB's log format with a 7-byte wandb header (``:W&B``, magic ``0xBEE1``, version):
32 KiB blocks of chunks ``crc32c (4) | length (2, LE) | type (1: full, 2: first, 3: middle,
4: last) | data``; a block tail shorter than a chunk header is zero padding. Each assembled record is
a ``wandb.proto.wandb_internal_pb2.Record`` (history rows, summary updates, config, run info).
A run still being written may end in a partial chunk: it is ignored. Checksums are not verified
(CRC-32C is not in the standard library); a corrupt length ends the scan with a warning.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from d4d.utils.errors import UserError
from d4d.utils.logging import get_logger

log = get_logger(__name__)

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_records(path: str | Path):
    """Yield the raw protobuf bytes of every complete record of a ``.wandb`` file."""
    data = Path(path).read_bytes()
    if len(data) < _HEADER or data[:4] != b":W&B":
        raise UserError(f"{path}: not a wandb transaction log (no ':W&B' header)")
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _HEADER:
            pos += room
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, pos)
        start, end = pos + _HEADER, pos + _HEADER + length
        if kind == 0 and length == 0:  # zero padding up to the block end
            pos += room
            continue
        if end > len(data) or length > room - _HEADER or kind not in (1, 2, 3, 4):
            if end <= len(data):
                log.warning("%s: corrupt chunk at byte %d; the rest of the log is skipped", path, pos)
            break
        chunk = data[start:end]
        pos = end
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        else:
            yield pending + chunk
            pending = b""


def _item_value(item):
    """The value of a history / summary / config item: ``value_json`` (all wandb versions) or the
    typed ``value`` oneof of newer history items."""
    text = item.value_json
    kind = item.WhichOneof("value") if any(o.name == "value" for o in item.DESCRIPTOR.oneofs) else None
    if not text and kind is not None:
        if kind == "none":
            return None
        if kind != "json":
            return getattr(item, kind)
        text = item.json
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def read_run_file(path: str | Path) -> dict:
    """``{"id", "name", "project", "group", "tags", "job_type", "config", "summary", "history"}`` of one
    ``.wandb`` file. ``history`` is a list of row dicts (with ``_step``); ``summary`` holds the last
    summary update of each key, completed by the last history value of keys never summarised."""
    from wandb.proto import wandb_internal_pb2 as pb

    info: dict = {"id": None, "name": None, "project": None, "group": None, "tags": [], "job_type": None,
                  "config": {}, "summary": {}, "history": []}
    summarised: set[str] = set()
    for raw in iter_records(path):
        rec = pb.Record()
        try:
            rec.ParseFromString(raw)
        except Exception:  # noqa: BLE001 - a record of a newer wandb: skip it
            continue
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            info.update(id=r.run_id or info["id"], name=r.display_name or info["name"],
                        project=r.project or info["project"], group=r.run_group or info["group"],
                        job_type=r.job_type or info["job_type"])
            if r.tags:
                info["tags"] = list(r.tags)
            for item in r.config.update:
                info["config"][_key(item)] = _item_value(item)
        elif kind == "config":
            for item in rec.config.update:
                info["config"][_key(item)] = _item_value(item)
        elif kind == "history":
            row = {_key(item): _item_value(item) for item in rec.history.item}
            if rec.history.HasField("step"):
                row.setdefault("_step", rec.history.step.num)
            info["history"].append(row)
        elif kind == "summary":
            for item in rec.summary.update:
                info["summary"][_key(item)] = _item_value(item)
                summarised.add(_key(item))
    # media (images, videos, tables) are summarised as nested dicts with a "_type": not metrics
    media = {k[: -len("/_type")] + "/" for k in info["summary"] if k.endswith("/_type")}
    info["summary"] = {k: v for k, v in info["summary"].items() if not any(k.startswith(m) for m in media)}
    # keys logged to history but never summarised (possible when a run was killed): last value
    for row in info["history"]:
        for k, v in row.items():
            if not k.startswith("_") and isinstance(v, (int, float)) and k not in summarised:
                info["summary"][k] = v
    return info


def find_run_files(path: str | Path) -> list[Path]:
    """The ``.wandb`` files under ``path``: a file itself, a run folder (``offline-run-*``/``run-*``) or
    any folder containing them (e.g. a ``d4d.fit`` run directory: ``<run_dir>/wandb/...``), newest last."""
    p = Path(path)
    if p.is_file() and p.suffix == ".wandb":
        return [p]
    if not p.is_dir():
        raise UserError(f"{path}: no such wandb run file or directory")
    unique = {f.resolve(): f for f in p.rglob("*.wandb") if f.parent.name != "latest-run"}  # the symlink
    files = sorted(unique.values(), key=lambda f: f.parent.name)
    if not files:
        raise UserError(f"{path}: no wandb run file (*.wandb) under it")
    return files
