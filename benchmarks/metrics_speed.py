"""Speed of the evaluation metrics on CPU, per frame, with a baseline measured in the same run.

    python -m benchmarks.metrics_speed [--size 256] [--frames 8] [--repeats 3]

Prints milliseconds per frame for: mPSNR, DyCheck's partial-convolution mSSIM (ours) against
torchmetrics' plain Gaussian SSIM (the baseline: same window, no masking), mLPIPS with a random
AlexNet (the timing does not depend on the weights), one DIS flow pair + consistency check
(the unit of covisibility and flicker), and a COLMAP pose recovery of a whole clip.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.metrics_speed", description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-sfm", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    from torchmetrics.functional.image import structural_similarity_index_measure

    from d4d.data.procedural import render_clip
    from d4d.metrics.flow import FlowEstimator, occlusion_brox
    from d4d.metrics.image import masked_psnr, masked_ssim
    from d4d.metrics.lpips import LPIPSAlex, masked_lpips

    clip = render_clip("orbit", np.random.default_rng(3), args.frames, args.size, static=True)
    real = torch.from_numpy(clip.frames).permute(0, 3, 1, 2).float() / 255
    fake = (real + 0.05 * torch.randn_like(real)).clamp(0, 1)
    mask = torch.rand(real.shape[0], args.size, args.size) > 0.3
    n = real.shape[0]
    state = {}
    for i, (co, ci, k) in {0: (64, 3, 11), 3: (192, 64, 5), 6: (384, 192, 3), 8: (256, 384, 3), 10: (256, 256, 3)}.items():
        state[f"features.{i}.weight"] = torch.randn(co, ci, k, k) * 0.05
        state[f"features.{i}.bias"] = torch.zeros(co)
    lpips = LPIPSAlex(_state_dict=state)
    flow = FlowEstimator()
    results = {
        "mPSNR": _time(lambda: masked_psnr(real, fake, mask), args.repeats),
        "mSSIM (DyCheck partial conv, float64, both variants)": _time(lambda: masked_ssim(real, fake, mask), args.repeats),
        "baseline: torchmetrics SSIM (no mask, float32)": _time(
            lambda: structural_similarity_index_measure(real, fake, gaussian_kernel=True, sigma=1.5, kernel_size=11,
                                                        data_range=1.0), args.repeats),
        "mLPIPS (AlexNet, ours)": _time(lambda: masked_lpips(lpips, real, fake, mask), args.repeats),
    }

    def flow_pair():
        for i in range(n - 1):
            occlusion_brox(flow(real[i], real[i + 1]), flow(real[i + 1], real[i]))

    results["DIS flow pair + Brox check"] = _time(flow_pair, args.repeats) * n / max(n - 1, 1)
    print(f"{n} frames of {args.size}x{args.size}, {torch.get_num_threads()} torch threads; best of {args.repeats}")
    for name, seconds in results.items():
        print(f"  {name:<55s} {1000 * seconds / n:8.2f} ms/frame")
    if not args.skip_sfm:
        from d4d.metrics.sfm import recover_poses

        start = time.perf_counter()
        c2w = recover_poses(real, torch.from_numpy(clip.K[0]))
        sec = time.perf_counter() - start
        print(f"  {'COLMAP pose recovery (1 trial, whole clip)':<55s} {1000 * sec / n:8.2f} ms/frame "
              f"({int(torch.isfinite(c2w[:, 0, 0]).sum())}/{n} frames registered)")


if __name__ == "__main__":
    main()
