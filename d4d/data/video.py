"""Encoding and decoding of the ``frames.mp4`` field.

Encoding uses PyAV (libx264 ships inside its wheels; decord only decodes); decoding uses decord,
which reads from memory without a temporary file.
"""
from __future__ import annotations

import io

import numpy as np


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


def decode_mp4(data: bytes, indices: list[int] | None = None) -> np.ndarray:
    """mp4 bytes -> uint8 ``(T, H, W, 3)`` RGB (all frames, or the given indices).

    decord is the decoder. decord 0.6 cannot copy frames of some widths (8, 12, 16, 24, 48, 72 px
    were seen to fail with "DECORDArrayCopyFromTo: The size must exactly match"); those videos
    are decoded with PyAV instead, which gives the same frames.
    """
    import decord

    try:
        reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
        if indices is None:
            indices = list(range(len(reader)))
        return reader.get_batch(indices).asnumpy()
    except decord.DECORDError as exc:
        if "size must exactly match" not in str(exc):
            raise
    return _decode_mp4_pyav(data, indices)


def _decode_mp4_pyav(data: bytes, indices: list[int] | None) -> np.ndarray:
    import av

    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if indices is not None:
        frames = [frames[i] for i in indices]
    return np.stack(frames)
