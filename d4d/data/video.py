"""Encoding and decoding of the ``frames.mp4`` field.

Encoding uses PyAV (libx264 ships inside its wheels; decord only decodes). Decoding uses decord
where it imports (the ``video`` extra: decord has no aarch64 Linux or macOS arm64 wheel) and PyAV
otherwise; both read from memory without a temporary file and give the same frames.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np


class VideoDecodeError(ValueError):
    """The bytes or file are not a decodable video (message: the decoder's first line)."""


def encode_mp4(frames: np.ndarray, fps: float = 8.0, qp: int = 12) -> bytes:
    """uint8 ``(T, H, W, 3)`` RGB -> H.264 mp4 bytes (yuv420p; H and W must be even).

    ``qp`` 12 is visually lossless for the small synthetic frames; raise it for smaller files.
    The same frames always give the same bytes.
    """
    import av  # local import: only writers need it

    frames = np.ascontiguousarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    T, H, W, _ = frames.shape
    if H % 2 or W % 2:
        raise ValueError(f"H.264 with yuv420p needs even frame sizes, got {H}x{W}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=max(1, round(fps)))
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        # Constant QP on one thread: x264's CRF rate control gave run-to-run different bytes here,
        # and shards must be reproducible (same command, same shards).
        stream.options = {"qp": str(qp), "preset": "veryfast"}
        stream.codec_context.thread_count = 1
        stream.codec_context.thread_type = "NONE"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def decord_available() -> bool:
    """Whether decord imports (it is the ``video`` extra; it has no aarch64 Linux or macOS arm64 wheel)."""
    return _decord() is not None


def _decord():
    try:
        import decord
    except ImportError:
        return None
    return decord


def decode_mp4(data: bytes | str | os.PathLike, indices: Sequence[int] | None = None) -> np.ndarray:
    """mp4 bytes (or a file path) -> uint8 ``(T, H, W, 3)`` RGB (all frames, or the given indices).

    decord is the decoder where it imports (``pip install 'd4d[video]'``), PyAV otherwise; both give
    the same frames. decord 0.6 cannot copy frames of some widths (8, 12, 16, 24, 48, 72 px were
    seen to fail with "DECORDArrayCopyFromTo: The size must exactly match"); those videos are
    decoded with PyAV too. PyAV stops after the last frame in ``indices``, so ``[0]`` decodes one
    frame, not the clip.

    Raises:
        IndexError: an index is outside the video.
        VideoDecodeError: the bytes are not a decodable video.
    """
    return _decode(data, indices)[0]


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """A video file -> (uint8 ``(T, H, W, 3)`` RGB, every frame; average fps); decoders as :func:`decode_mp4`."""
    return _decode(Path(path), None)


def _decode(source, indices) -> tuple[np.ndarray, float]:
    indices = None if indices is None else [int(i) for i in indices]
    decord = _decord()
    if decord is not None:
        try:
            return _decode_decord(decord, source, indices)
        except decord.DECORDError as exc:
            if "size must exactly match" not in str(exc):
                raise VideoDecodeError(_first_line(exc)) from None
        except RuntimeError as exc:  # decord raises plain RuntimeErrors for some broken files
            raise VideoDecodeError(_first_line(exc)) from None
    return _decode_pyav(source, indices)


def _decode_decord(decord, source, indices) -> tuple[np.ndarray, float]:
    src = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else str(source)
    reader = decord.VideoReader(src, num_threads=1)
    n = len(reader)
    if indices is None:
        indices = list(range(n))
    _check_indices(indices, n)
    return reader.get_batch(indices).asnumpy(), float(reader.get_avg_fps())


def _check_indices(indices: list[int], n: int) -> None:
    bad = [i for i in indices if not -n <= i < n]
    if bad:
        raise IndexError(f"frame index {bad[0]} out of range: the video has {n} frames")


def _pyav_frames(container) -> Iterator:
    """The decoded frames of the first video stream, in presentation order (one at a time)."""
    yield from container.decode(video=0)


def _decode_pyav(source, indices) -> tuple[np.ndarray, float]:
    import av

    src = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else str(source)
    # negative indices need the frame count, which only a full decode gives reliably
    last = None if indices is None or any(i < 0 for i in indices) else max(indices, default=-1)
    wanted = None if indices is None or last is None else set(indices)
    kept: dict[int, np.ndarray] = {}
    n = 0
    try:
        with av.open(src, mode="r") as container:
            if not container.streams.video:
                raise VideoDecodeError("no video stream")
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1  # as decord's num_threads=1: loader workers parallelise clips
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            if last is not None and last < 0:  # indices == []
                return np.zeros((0, stream.height, stream.width, 3), np.uint8), fps
            for frame in _pyav_frames(container):
                if wanted is None or n in wanted:
                    kept[n] = frame.to_ndarray(format="rgb24")
                n += 1
                if last is not None and n > last:
                    break  # the last needed frame is decoded: leave the rest of the clip alone
    except av.error.FFmpegError as exc:  # "[Errno N] why: '<none>'" -> "why"
        raise VideoDecodeError(getattr(exc, "strerror", None) or _first_line(exc)) from None
    if indices is None:
        indices = list(range(n))
    else:
        _check_indices(indices, n)
        indices = [i % n for i in indices]
    if not indices:
        raise VideoDecodeError("the video has no frames")
    return np.stack([kept[i] for i in indices]), fps


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
