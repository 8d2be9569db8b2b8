"""Writing samples of :mod:`d4d.data.schema` into WebDataset shards, atomically.

Each shard is written to ``<name>.tmp`` and renamed to ``<name>`` only once it is complete, so an
interrupted writer never leaves a truncated ``.tar`` that a reader would take for a real shard.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from d4d.data.video import encode_mp4


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _jpg(image: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_sample(
    key: str,
    frames: np.ndarray,
    meta: dict[str, Any],
    c2w: np.ndarray | None = None,
    K: np.ndarray | None = None,
    depth: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    frame_format: str = "mp4",
    fps: float = 8.0,
) -> dict[str, bytes | str]:
    """Arrays of the schema -> the byte fields of one WebDataset sample.

    Args:
        key: sample key, no dots.
        frames: uint8 ``(T, H, W, 3)``.
        frame_format: ``mp4`` (H.264), ``npy`` (lossless) or ``jpg`` (only for ``T == 1``).
        c2w, K, depth, mask: see :mod:`d4d.data.schema`; depth is stored as float16.
    """
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
    frames = np.asarray(frames, dtype=np.uint8)
    sample: dict[str, bytes | str] = {"__key__": key}
    if frame_format == "mp4":
        sample["frames.mp4"] = encode_mp4(frames, fps=fps)
    elif frame_format == "npy":
        sample["frames.npy"] = _npy(frames)
    elif frame_format == "jpg":
        if frames.shape[0] != 1:
            raise ValueError(f"frame_format 'jpg' holds one image, got {frames.shape[0]} frames")
        sample["image.jpg"] = _jpg(frames[0])
    else:
        raise ValueError(f"frame_format must be mp4, npy or jpg, got {frame_format!r}")
    if c2w is not None:
        sample["c2w.npy"] = _npy(np.asarray(c2w, dtype=np.float32))
    if K is not None:
        sample["intrinsics.npy"] = _npy(np.asarray(K, dtype=np.float32))
    if depth is not None:
        sample["depth.npy"] = _npy(np.asarray(depth, dtype=np.float16))
    if mask is not None:
        sample["mask.npy"] = _npy(np.asarray(mask, dtype=np.uint8))
    sample["meta.json"] = json.dumps(meta, sort_keys=True).encode()
    return sample


class ShardWriter:
    """Writes encoded samples to ``<folder>/<prefix>-NNNNNN.tar``, starting a new shard every
    ``max_count`` samples or ``max_bytes`` bytes. Shards appear under their final name only when
    complete. Use as a context manager; :attr:`shards` lists the completed shard paths.
    """

    def __init__(self, folder: str | os.PathLike, prefix: str = "shard", max_count: int = 100,
                 max_bytes: int = 1 << 30, start_index: int = 0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix, self.max_count, self.max_bytes = prefix, max_count, max_bytes
        self.index = start_index
        self.shards: list[Path] = []
        self._tar: wds.TarWriter | None = None
        self._tmp: Path | None = None
        self._count = 0
        self._bytes = 0

    def _open(self) -> None:
        final = self.folder / f"{self.prefix}-{self.index:06d}.tar"
        self._tmp = final.with_name(final.name + ".tmp")
        self._tar = wds.TarWriter(str(self._tmp), encoder=False)
        self._count = self._bytes = 0

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        final = self._tmp.with_name(self._tmp.name[: -len(".tmp")])
        os.replace(self._tmp, final)
        self.shards.append(final)
        self._tar, self._tmp = None, None
        self.index += 1

    def write(self, sample: dict[str, bytes | str]) -> None:
        if self._tar is None:
            self._open()
        self._tar.write(sample)
        self._count += 1
        self._bytes += sum(len(v) for k, v in sample.items() if not k.startswith("__"))
        if self._count >= self.max_count or self._bytes >= self.max_bytes:
            self._close()

    def close(self) -> None:
        self._close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._close()
        elif self._tar is not None:  # leave no half-written shard behind
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None
