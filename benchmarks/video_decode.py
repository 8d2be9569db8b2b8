"""Decoding speed of ``frames.mp4``: decord against PyAV, whole clips and a few frames.

    python -m benchmarks.video_decode                        # 49 frames of 480x832 (Wan2.1's clip), best of 5
    python -m benchmarks.video_decode --frames 16 --height 256 --width 384

Encodes one clip with :func:`d4d.data.video.encode_mp4` (a smooth pattern panning across the frame
plus fine texture and per-frame noise, so the bit rate is that of real footage, not of flat colour), then times
:func:`d4d.data.video.decode_mp4`'s two decoders on the same bytes: decord (when installed, the
``video`` extra), PyAV stopping after the last needed frame (what d4d uses without decord), and PyAV
decoding the whole clip before picking frames (the path before the early stop). Prints the best of
``--repeats`` runs in milliseconds and the ratios, and checks that all decoders return the same
frames.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np

from d4d.data import video


def make_clip(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width + 4 * frames].astype(np.float32)
    base = np.stack([128 + 80 * np.sin(x / 23 + y / 31), 128 + 80 * np.cos(y / 19 - x / 41),
                     128 + 60 * np.sin(x / 53)], -1)
    base += rng.normal(0, 12, base.shape).astype(np.float32)  # texture that moves with the pattern
    clip = np.stack([base[:, 4 * i:4 * i + width] for i in range(frames)])
    clip += rng.normal(0, 3, clip.shape).astype(np.float32)  # and sensor noise, new in every frame
    return clip.clip(0, 255).astype(np.uint8)


def best_of(fn, repeats: int) -> tuple[float, np.ndarray]:
    out = fn()  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best * 1000, out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.video_decode", description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    data = video.encode_mp4(make_clip(args.frames, args.height, args.width))
    print(f"clip: {args.frames}x{args.height}x{args.width}, {len(data) / 1e6:.1f} MB mp4 "
          f"(encoded in {time.perf_counter() - t0:.1f} s)")
    decord = video._decord()
    cases = {"whole clip": None, "first frame": [0], f"frames 0 and {args.frames // 2}": [0, args.frames // 2]}
    print(f"{'frames':<18} {'decord ms':>10} {'PyAV ms':>9} {'PyAV full ms':>13} {'PyAV/decord':>12} "
          f"{'full/PyAV':>10}")
    for label, indices in cases.items():
        ms_pyav, pyav = best_of(lambda: video._decode_pyav(data, indices)[0], args.repeats)

        def full_then_pick():
            frames = video._decode_pyav(data, None)[0]
            return frames if indices is None else frames[indices]

        ms_full, full = best_of(full_then_pick, args.repeats)
        assert np.array_equal(pyav, full)
        if decord is not None:
            ms_decord, by_decord = best_of(lambda: video._decode_decord(decord, data, indices)[0], args.repeats)
            assert np.array_equal(pyav, by_decord), "decord and PyAV frames differ"
            print(f"{label:<18} {ms_decord:>10.0f} {ms_pyav:>9.0f} {ms_full:>13.0f} {ms_pyav / ms_decord:>12.2f} "
                  f"{ms_full / ms_pyav:>10.1f}")
        else:
            print(f"{label:<18} {'-':>10} {ms_pyav:>9.0f} {ms_full:>13.0f} {'-':>12} {ms_full / ms_pyav:>10.1f}")
    print("frames identical across decoders: yes" + ("" if decord is not None else " (decord not installed)"))


if __name__ == "__main__":
    main()
