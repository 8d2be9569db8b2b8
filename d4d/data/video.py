"""Encoding and decoding of the ``frames.mp4`` field.

Encoding uses PyAV (libx264 ships inside its wheels; decord only decodes); decoding uses decord,
which reads from memory without a temporary file.
"""
from __future__ import annotations

import io

import numpy as np


def encode_mp4(frames: np.ndarray, fps: float = 8.0, crf: int = 12) -> bytes:
    """uint8 ``(T, H, W, 3)`` RGB -> H.264 mp4 bytes (yuv420p; H and W must be even).

    ``crf`` 12 is visually lossless for the small synthetic frames; raise it for smaller files.
    """
    import av  # local import: only writers need it

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    T, H, W, _ = frames.shape
    if H % 2 or W % 2:
        raise ValueError(f"H.264 with yuv420p needs even frame sizes, got {H}x{W}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=max(1, round(fps)))
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        stream.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def decode_mp4(data: bytes, indices: list[int] | None = None) -> np.ndarray:
    """mp4 bytes -> uint8 ``(T, H, W, 3)`` RGB with decord (all frames, or the given indices)."""
    import decord

    reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
    if indices is None:
        indices = list(range(len(reader)))
    return reader.get_batch(indices).asnumpy()
