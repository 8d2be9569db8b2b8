"""Parity of our AlexNet LPIPS (``d4d.metrics.lpips.LPIPSAlex``) with the ``lpips`` package.

    python -m benchmarks.lpips_parity [--device cuda] [--size 256] [--pairs 8] [--tolerance 1e-4]

Needs the ``lpips`` package (``pip install lpips``; it imports torchvision, so a GPU install where
torchvision matches torch) and torchvision's ``alexnet-owt-7be5be79.pth`` in the torch hub cache
(``lpips.LPIPS(net="alex")`` downloads it there on first use; ours reads the same file). Prints, per
case, the LPIPS value of both implementations and the largest difference of their spatial maps,
then "parity: ok" or exits 1. Without ``lpips`` it says so and exits 0 (nothing to compare).

Cases: independent random images, an image against itself plus Gaussian noise (sigma 0.02, 0.1,
0.3), a masked pair (mLPIPS: both images multiplied by the mask, map averaged over it), and, when
``data/re10k/test`` exists, consecutive real RealEstate10K frames.
"""
from __future__ import annotations

import argparse
import sys

import torch


def cases(size: int, pairs: int, seed: int = 0) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """``(name, a, b, mask)`` with images ``(N, 3, size, size)`` in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(pairs, 3, size, size, generator=g)
    out = [("random pairs", a, torch.rand(pairs, 3, size, size, generator=g), None)]
    smooth = torch.nn.functional.avg_pool2d(a, 9, 1, 4)  # image-like: spatially correlated
    for sigma in (0.02, 0.1, 0.3):
        noisy = (smooth + sigma * torch.randn(smooth.shape, generator=g)).clamp(0, 1)
        out.append((f"noise sigma {sigma}", smooth, noisy, None))
    mask = torch.zeros(pairs, size, size)
    mask[:, size // 4: 3 * size // 4, : size // 2] = 1
    out.append(("masked pair", smooth, out[2][2], mask))
    try:
        from d4d.evaluation.clips import iter_test_clips

        clip = next(iter(iter_test_clips("data/re10k/test", 1, None, (size, size))))
        out.append(("RealEstate10K frames t, t+1", clip.frames[:-1], clip.frames[1:], None))
    except Exception:  # noqa: BLE001 - the real clips are optional
        pass
    return out


def compare(device: str = "cpu", size: int = 64, pairs: int = 4) -> list[dict]:
    """Per case: ``{"case", "ours", "lpips", "max_map_diff"}`` (mLPIPS means over the pairs)."""
    import lpips  # noqa: PLC0415 - optional

    from d4d.metrics.lpips import LPIPSAlex, masked_lpips

    ours = LPIPSAlex().to(device)
    ref = lpips.LPIPS(net="alex", spatial=True, verbose=False).eval().requires_grad_(False).to(device)
    rows = []
    for name, a, b, mask in cases(size, pairs):
        a, b = a.to(device), b.to(device)
        m = None if mask is None else mask.to(device)
        with torch.no_grad():
            am, bm = (a, b) if m is None else (a * m[:, None], b * m[:, None])
            diff = (ours(am, bm) - ref(am, bm, normalize=True)).abs().max().item()
            v_ours = masked_lpips(ours, a, b, m).mean().item()
            v_ref = masked_lpips(lambda x, y: ref(x, y, normalize=True), a, b, m).mean().item()
        rows.append({"case": name, "ours": v_ours, "lpips": v_ref, "max_map_diff": diff})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lpips_parity", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed spatial-map difference")
    args = p.parse_args(argv)
    try:
        import lpips  # noqa: F401, PLC0415
    except ImportError as exc:
        print(f"lpips package not importable ({exc}): nothing to compare (pip install lpips on a "
              "machine whose torchvision matches torch)")
        return
    rows = compare(args.device, args.size, args.pairs)
    print(f"{'case':32s} {'ours':>10s} {'lpips':>10s} {'max map diff':>14s}")
    for r in rows:
        print(f"{r['case']:32s} {r['ours']:10.6f} {r['lpips']:10.6f} {r['max_map_diff']:14.3e}")
    worst = max(r["max_map_diff"] for r in rows)
    if worst > args.tolerance:
        print(f"parity: FAILED (max map difference {worst:.3e} > {args.tolerance:g})")
        sys.exit(1)
    print(f"parity: ok (max map difference {worst:.3e} <= {args.tolerance:g})")


if __name__ == "__main__":
    main()
