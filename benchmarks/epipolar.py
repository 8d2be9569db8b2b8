"""Epipolar mask construction: time and peak memory, blockwise against the direct all-pairs build.

    python -m benchmarks.epipolar [--max-reference-gb 4]

For each setting (token frames T, token grid h x w, token footprint in pixels) three constructions
of the bool ``(T h w) x (T h w)`` CamI2V mask of an orbit path are timed, each in a fresh process whose
peak resident memory above its level before the construction is sampled every 2 ms (``/proc/self/statm``):

* ``reference``: :func:`d4d.geometry.epipolar.epipolar_mask_reference` (all ``T^2 N^2`` distances at once);
* ``blockwise``: :func:`d4d.models.dynamic.epipolar_attention.clip_epipolar_mask` (4 query frames per block,
  the full mask assembled, as the dynamic module holds it per clip);
* ``streamed``: :func:`d4d.geometry.epipolar.iter_epipolar_mask_blocks` consumed block by block without
  assembling (what a clip too long to hold its mask would use).

Settings: 16 and 49 frames on a 16 x 16 grid (CamI2V-sized), 49 video frames of Wan 480p
(13 latent frames of 30 x 52 tokens) and 49 latent frames of 30 x 52 tokens. The reference is skipped
where its estimated peak exceeds ``--max-reference-gb``. CPU only, timings under shared load.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import threading
import time

SETTINGS = [  # (label, T, (h, w), token px)
    ("16 frames, 16x16 tokens", 16, (16, 16), 16),
    ("49 frames, 16x16 tokens", 49, (16, 16), 16),
    ("49 video frames Wan 480p (13 x 30x52)", 13, (30, 52), 16),
    ("49 latent frames Wan 480p (49 x 30x52)", 49, (30, 52), 16),
]


def _run(mode: str, frames: int, grid: tuple[int, int], px: int, queue) -> None:
    import torch

    from d4d.geometry.epipolar import epipolar_mask_reference, iter_epipolar_mask_blocks
    from d4d.geometry.motions import motion_path
    from d4d.models.dynamic.epipolar_attention import clip_epipolar_mask

    torch.set_num_threads(2)
    hw = (grid[0] * px, grid[1] * px)
    K = torch.tensor([[hw[1] * 0.8, 0, hw[1] / 2], [0, hw[1] * 0.8, hw[0] / 2], [0, 0, 1.0]])
    c2w = motion_path("orbit", frames).double()
    sampler = _RssSampler()
    sampler.start()
    start = time.perf_counter()
    allowed = 0
    if mode == "reference":
        allowed = int(epipolar_mask_reference(c2w, K, grid, px).sum())
    elif mode == "blockwise":
        allowed = int(clip_epipolar_mask(c2w, K, hw, grid, px, block_frames=4).sum())
    elif mode == "streamed":
        for _, block in iter_epipolar_mask_blocks(c2w, K, grid, px, block_frames=4):
            allowed += int(block.sum())
    seconds = time.perf_counter() - start
    queue.put((seconds, sampler.stop() / 2**10, allowed))  # KiB -> MiB


class _RssSampler(threading.Thread):
    """Peak resident memory above the level at start, sampled every 2 ms from /proc/self/statm (KiB)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.page_kib = os.sysconf("SC_PAGE_SIZE") / 1024
        self.base = self.peak = self._rss()
        self.running = True

    def _rss(self) -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page_kib

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def stop(self) -> float:
        self.running = False
        self.join()
        self.peak = max(self.peak, self._rss())
        return self.peak - self.base


def measure(mode: str, frames: int, grid: tuple[int, int], px: int):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run, args=(mode, frames, grid, px, queue))
    proc.start()
    proc.join()
    return queue.get() if proc.exitcode == 0 else None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--max-reference-gb", type=float, default=4.0)
    args = p.parse_args()
    print(f"{'setting':42s} {'tokens':>7s} {'mode':>10s} {'seconds':>8s} {'peak GiB':>9s} {'mask GiB':>9s} {'allowed %':>9s}")
    for label, frames, grid, px in SETTINGS:
        tokens = frames * grid[0] * grid[1]
        mask_gib = tokens * tokens / 2**30
        # reference: T^2 N^2 float32 distances + the bool mask + its permuted copy
        ref_gib = tokens * tokens * (4 + 2) / 2**30
        for mode in ("reference", "blockwise", "streamed"):
            if mode == "reference" and ref_gib > args.max_reference_gb:
                print(f"{label:42s} {tokens:7d} {mode:>10s}  skipped: needs ~{ref_gib:.1f} GiB")
                continue
            if mode == "blockwise" and mask_gib > args.max_reference_gb:
                print(f"{label:42s} {tokens:7d} {mode:>10s}  skipped: the mask alone is {mask_gib:.1f} GiB")
                continue
            result = measure(mode, frames, grid, px)
            if result is None:
                print(f"{label:42s} {tokens:7d} {mode:>10s}  failed (out of memory?)")
                continue
            seconds, peak_mib, allowed = result
            print(f"{label:42s} {tokens:7d} {mode:>10s} {seconds:8.2f} {peak_mib / 1024:9.2f} {mask_gib:9.2f} "
                  f"{100 * allowed / tokens ** 2:9.2f}", flush=True)


if __name__ == "__main__":
    main()
