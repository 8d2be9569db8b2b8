"""Reading one WebDataset shard: raw samples out of a tar, then decoded into validated ClipSamples.

The reader is strict about what counts as a complete sample (see :func:`read_tar_samples`) and
reports every problem (as a :class:`d4d.data.skips.Skipped` marker in the stream, or to a
:class:`d4d.data.skips.SkipStats`) instead of raising, so one bad shard or sample costs that shard or
sample only. Shards are read forward once, as streams (local files, ``file:``, http(s), ``pipe:`` and
webdataset's other ``gopen`` schemes; :mod:`d4d.data.urls`), so nothing here seeks.
"""
from __future__ import annotations

import io
import json
import tarfile
import zlib
from typing import Any, Callable, Sequence, Iterator, Mapping

import numpy as np

from d4d.data.schema import ClipSample
from d4d.data.skips import (INVALID_SAMPLE, TRUNCATED_SHARD, UNREADABLE_SHARD, FieldDecodeError, Skipped,
                             SkipStats)
from d4d.data.urls import ShardStream, display, open_shard
from d4d.data.video import decode_mp4

# Errors that mean "these bytes are not a (complete) tar", as opposed to bugs in this code.
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, UnicodeDecodeError)


def _split_name(name: str) -> tuple[str | None, str | None]:
    """``dir/clip001.frames.mp4`` -> (``dir/clip001``, ``frames.mp4``): the key ends at the first dot
    of the file name, as in WebDataset. Unlike WebDataset's default grouping, the field keeps its
    case (webdataset lowercases it; the schema's field names are lowercase anyway)."""
    folder, _, base = name.rpartition("/")
    stem, dot, field = base.partition(".")
    if not dot or not stem:
        return None, None
    return (f"{folder}/{stem}" if folder else stem), field


def _ends_cleanly(stream: ShardStream, offset: int) -> bool:
    """True when the block at ``offset`` (where tarfile stopped) is the all-zero end-of-archive block.

    tarfile stops *silently* on a missing or cut header after the first member, so without this
    check a shard cut between two files would pass as complete with its last sample short of fields.
    The stream is read forward, never seeked, so this works on pipes and HTTP streams as on files.
    """
    block = stream.block_at(offset, tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and block.count(0) == tarfile.BLOCKSIZE


def read_tar_items(url: str) -> Iterator[dict[str, Any] | Skipped]:
    """Raw samples ``{"__key__": str, "__url__": url, "<field>": bytes}`` of one shard, in tar order,
    and a :class:`~d4d.data.skips.Skipped` marker, in its place in the stream, for each failure.

    ``url`` is a path or URL of :func:`d4d.data.urls.expand_urls`, read once, forward, as a stream
    (:func:`d4d.data.urls.open_shard`). The files of a sample must be consecutive in the tar, as
    :class:`ShardWriter` writes them. A shard that cannot be opened or fetched (missing file, HTTP
    404, unreachable host, a ``pipe:`` command that fails before writing a tar) or is not a tar
    gives one ``unreadable_shard`` marker. A shard that ends early (cut file, corrupt header, a
    download or command that fails part way) still yields every sample completed before the cut,
    then one ``truncated_shard`` marker for the rest. A command that exits with an error is never
    taken for a complete shard. A sample with a repeated field is an ``invalid_sample`` marker. The
    caller counts the markers (see :mod:`d4d.data.skips`). Messages are one line naming the URL
    (a password in it masked); abandoning the generator stops a download at once.
    """
    label = display(url)
    try:
        stream = open_shard(url)
    except (OSError, ValueError) as e:
        yield Skipped(UNREADABLE_SHARD, f"shard {label}: cannot open: {_one_line(e)}", label)
        return
    try:
        yield from _read_stream(stream, label)
    finally:
        stream.close()


def _read_stream(stream: ShardStream, url: str) -> Iterator[dict[str, Any] | Skipped]:
    try:
        tar = tarfile.open(fileobj=stream, mode="r|")
    except _TAR_ERRORS as e:
        failed = stream.finish()  # a failed command or download explains an empty or garbled stream
        reason = (f"cannot fetch: {failed}" if failed
                  else f"cannot read as a tar ({type(e).__name__}: {_one_line(e)})")
        yield Skipped(UNREADABLE_SHARD, f"shard {url}: {reason}", url)
        return
    current: dict[str, Any] | None = None
    duplicate: str | None = None
    complete = 0
    error: str | None = None
    members = iter(tar)
    while True:
        try:
            info = next(members)
        except StopIteration:
            break
        except _TAR_ERRORS as e:
            error = f"{type(e).__name__}: {_one_line(e)}"
            break
        tar.members = []  # stream mode keeps every header otherwise: memory grows with the shard
        key, field = _split_name(info.name) if info.isreg() else (None, None)
        if key is None:
            continue
        if current is not None and key != current["__key__"]:
            # a new key starts, so the previous sample has all its files
            if duplicate is None:
                complete += 1
                yield current
            else:
                yield Skipped(INVALID_SAMPLE, f"sample {current['__key__']!r} in {url}: "
                                              f"file {duplicate!r} appears twice", url)
            current, duplicate = None, None
        if current is None:
            current = {"__key__": key, "__url__": url}
        try:
            data = tar.extractfile(info).read()
        except _TAR_ERRORS as e:
            error = f"{type(e).__name__}: {_one_line(e)}"
            break
        if field in current:
            duplicate = field
        current[field] = data
    if error is None:
        try:
            if not _ends_cleanly(stream, tar.offset):
                error = f"no end-of-archive block at byte {tar.offset}"
        except _TAR_ERRORS as e:
            error = f"{type(e).__name__}: {_one_line(e)}"
    failed = stream.finish()  # the stream's source: a command or download that failed part way
    if failed:
        error = failed if error is None else f"{failed}; {error}"
    if error is not None:
        lost = f"sample {current['__key__']!r} and any after it" if current else "any samples after it"
        yield Skipped(TRUNCATED_SHARD, f"shard {url}: ends early after {complete} complete samples "
                                       f"({error}); lost {lost}", url)
    elif current is not None:
        if duplicate is None:
            yield current
        else:
            yield Skipped(INVALID_SAMPLE, f"sample {current['__key__']!r} in {url}: "
                                          f"file {duplicate!r} appears twice", url)


def _one_line(text: object, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_tar_samples(url: str, stats: SkipStats) -> Iterator[dict[str, Any]]:
    """The raw samples of :func:`read_tar_items`; each failure is recorded in ``stats`` as it is met."""
    for item in read_tar_items(url):
        if isinstance(item, Skipped):
            stats.record_skip(item.reason, item.message, item.shard)
        else:
            yield item


# -------------------------------------------------------------------------------------- decoding
def _decode_image(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"), dtype=np.uint8)  # a copy: asarray would be read-only


def _decoder(field: str) -> Callable[[bytes], Any] | None:
    ext = field.rsplit(".", 1)[-1]
    if ext == "mp4":
        return decode_mp4
    if ext == "npy":
        return lambda data: np.load(io.BytesIO(data), allow_pickle=False)
    if ext in ("jpg", "jpeg", "png"):
        return _decode_image
    if ext == "json":
        return json.loads
    return None


_PER_FRAME = ("frames.npy", "c2w.npy", "intrinsics.npy", "depth.npy", "mask.npy")


def decode_sample(raw: Mapping[str, Any], frame_indices: Sequence[int] | None = None) -> ClipSample:
    """A raw WebDataset sample (``__key__``, ``__url__`` and bytes per field) -> validated ClipSample.

    ``frames.mp4`` is decoded (decord, or PyAV without it: :func:`d4d.data.video.decode_mp4`) to
    uint8 ``(T, H, W, 3)``, ``*.npy`` with numpy (no pickles), ``*.jpg``/``*.png`` with PIL to uint8
    RGB ``(H, W, 3)``, ``*.json`` as JSON; fields of other types are dropped. ``__url__`` is kept, so
    errors and :attr:`ClipSample.shard` name the shard. ``frame_indices`` keeps only those frames (of
    the video and of every per-frame array and ``timestamps_us``); an mp4 then decodes only what is
    kept, e.g. ``[0]`` for first-frame stages.

    Raises:
        FieldDecodeError: a field's bytes do not decode (a SampleError).
        SampleError: the decoded sample violates the schema.
    """
    decoded: dict[str, Any] = {}
    for name, value in raw.items():
        if name.startswith("__"):
            decoded[name] = value
            continue
        decode = _decoder(name)
        if decode is None:
            continue
        try:
            if frame_indices is not None and name == "frames.mp4":
                decoded[name] = decode_mp4(value, list(frame_indices))
            else:
                decoded[name] = decode(value)
                if frame_indices is not None and name in _PER_FRAME:
                    decoded[name] = decoded[name][list(frame_indices)]
                elif frame_indices is not None and name == "meta.json" and "timestamps_us" in decoded[name]:
                    ts = decoded[name]["timestamps_us"]
                    decoded[name]["timestamps_us"] = [ts[i] for i in frame_indices]
        except Exception as e:  # any failure on these bytes is the sample's fault, not ours
            raise FieldDecodeError(
                f"sample {raw.get('__key__', '?')!r} in {raw.get('__url__', '?')}: field {name!r} "
                f"does not decode ({type(e).__name__}: {e})") from e
    return ClipSample.from_raw(decoded)
