"""Epipolar attention at scale: mask construction and the two attention paths, dense against flex.

    python -m benchmarks.epipolar                          # CPU: 2-3 minutes on 2 cores
    python -m benchmarks.epipolar --grid 30 52 --dim 5120 --heads 40    # Wan 2.1 14B at 480p (a GPU)

Clips of 16, 49 and 81 video frames are 4, 13 and 21 Wan latent frames (``1 + (F - 1) / 4``) of
``h x w`` tokens of 16 px: 30 x 52 at 480x832. On a CPU the default grid is 15 x 26 (240x416) and the
branch width 128 (2 heads of 64), because the dense path at 20,280 tokens of width 5120 does not fit a
2-core machine's time; the output says which grid and width were measured. On CUDA the defaults are
the full grid and Wan 14B's width (5120, 40 heads) under bf16 autocast. Orbit cameras, occlusion
masks without depth (the recipe's setting for real videos).

Every measurement runs in a fresh process (``spawn``) after a warm-up call; the time is the fastest
of ``--repeat`` calls (default 2). Peak memory is the rise
over the level at the start of a call: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU resident
private resident memory (``RssAnon``, :mod:`benchmarks.rss`) sampled every 2 ms in a separate call preceded by glibc's
``malloc_trim(0)``, so that memory freed by earlier calls does not hide the call's allocations (the
timed calls run without it). Timings on CPU are under whatever else the machine runs; one
thread per process by default (``--threads``): on this shared 2-core machine two OpenMP threads made
the same call 10x slower and erratic whenever another process held a core.

1. Tiles: the fraction of 128 x 128 tiles of the ``(L, 4 + L)`` attention holding any allowed pair
   (:meth:`~d4d.models.dynamic.epipolar_mask.EpipolarMask.tiles`), per motion, at the benchmark grid and
   at Wan's 30 x 52 for 49 frames: what the flex path computes, the dense path computing all of it.
2. Mask construction, one clip: ``previous`` = point-line distances per block of 4 query frames
   thresholded into the dense ``(L, L)`` mask (the construction before spans, float32 distances, the
   baseline); ``spans->dense`` = the same mask from exact spans; ``dense->BlockMask`` = a BlockMask
   derived from a dense mask (tile reduction of ``L^2`` booleans, a lookup mask_mod: the alternative
   not taken); ``spans->BlockMask`` = what the flex path builds (spans, covisibility, exact tiles). The
   ``reference`` (all ``T^2 N^2`` float64 distances at once) runs where it fits ``--max-reference-gb``.
3. One epipolar branch, forward (no grad) and forward + backward, ``dense`` (chunked SDPA, 2 query
   frames per chunk as the recipe, mask rows from the spans) against ``flex`` (compiled flex_attention
   on the BlockMask; one warm-up call first, which compiles). torch 2.13 has no flex backward on CPU.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue as queue_module
import time

from benchmarks.rss import PeakRss

FRAMES = (16, 49, 81)
MOTIONS = ("orbit", "turn_left", "zoom_in")
REGISTERS, CHUNK_FRAMES, TOKEN_PX = 4, 2, 16


def _trim() -> None:
    """Hand memory glibc keeps after frees back to the system (so a later allocation shows in RSS)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: peaks may be under-reported
        pass


class _Meter:
    """Time and peak memory (MiB above the start) of one phase, on CPU or CUDA."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch

        if self.device.type != "cuda":
            _trim()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.sampler = PeakRss(0.002)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.start
            self.peak = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.seconds = time.perf_counter() - self.start
            self.peak = self.sampler.stop()["anon"] / 2**20


def _setup(frames: int, grid: tuple[int, int], device: str, motion: str = "orbit"):
    import torch

    from d4d.geometry.motions import motion_path

    hw = (grid[0] * TOKEN_PX, grid[1] * TOKEN_PX)
    K = torch.tensor([[hw[1] * 0.8, 0, hw[1] / 2], [0, hw[1] * 0.8, hw[0] / 2], [0, 0, 1.0]], device=device)
    c2w = motion_path(motion, 1 + (frames - 1) // 4).double().to(device)
    return c2w, K, hw


def _previous_dense(c2w, K, grid, block_frames=4):
    """The construction before spans: distances (float32, lines in float64) per block, thresholded."""
    import torch

    from d4d.geometry import epipolar as E

    fund, epipole = E._pair_geometry(c2w, K, 1e-6)
    centers = E.token_centers(grid, TOKEN_PX, device=c2w.device)
    threshold, num, n = E._threshold(TOKEN_PX, None), c2w.shape[0], grid[0] * grid[1]
    out = torch.empty(num * n, num * n, dtype=torch.bool, device=c2w.device)
    for s in range(0, num, block_frames):
        e = min(num, s + block_frames)
        dist = E._block_distances(fund[s:e], epipole[s:e], centers, torch.float32)
        out[s * n:e * n] = (dist < threshold).permute(0, 2, 1, 3).reshape((e - s) * n, num * n)
    return out


def _block_mask_from_dense(dense, registers: int, bs: int = 128):
    """A BlockMask from a dense ``(B, L, L)`` mask: tiles by reduction, mask_mod a lookup of it."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import BlockMask

    b, length, _ = dense.shape
    full = torch.cat([dense.new_ones(b, length, registers), dense], -1)
    kv = -(-(length + registers) // bs)
    full = F.pad(full, (0, kv * bs - length - registers, 0, -(-length // bs) * bs - length))
    tiles = full.reshape(b, -1, bs, kv, bs).any(4).any(2).to(torch.int32)
    order = torch.argsort(tiles, dim=-1, descending=True, stable=True).to(torch.int32)

    def lookup(bi, h, q, k):
        return (k < registers) | dense[bi, torch.clamp(q, 0, length - 1), torch.clamp(k - registers, 0, length - 1)]

    return BlockMask.from_kv_blocks(tiles.sum(-1, dtype=torch.int32)[:, None], order[:, None], BLOCK_SIZE=bs,
                                    mask_mod=lookup, seq_lengths=(length, length + registers))


def _run_mask(method: str, frames: int, grid: tuple[int, int], device: str, repeat: int, queue) -> None:
    import torch

    dev = torch.device(device)
    _build_mask(method, 5, grid, device)  # warm-up on a 2-latent-frame clip: lazy initialisation
    peak = _peak(lambda: _build_mask(method, frames, grid, device), dev)
    queue.put((_best_time(lambda: _build_mask(method, frames, grid, device), repeat, dev), peak))


def _build_mask(method: str, frames: int, grid: tuple[int, int], device: str):
    from d4d.geometry.epipolar import epipolar_mask_reference
    from d4d.models.dynamic.epipolar_mask import clip_epipolar_spans

    c2w, K, hw = _setup(frames, grid, device)
    if method == "reference":
        held = epipolar_mask_reference(c2w, K, grid, TOKEN_PX)
    elif method == "previous":
        held = _previous_dense(c2w, K, grid)
    elif method == "spans->dense":
        held = clip_epipolar_spans(c2w, K, hw, grid, TOKEN_PX, occlusion=True).dense()
    elif method == "dense->BlockMask":
        held = _block_mask_from_dense(clip_epipolar_spans(c2w, K, hw, grid, TOKEN_PX, occlusion=True).dense(),
                                      REGISTERS)
    else:  # spans->BlockMask
        held = clip_epipolar_spans(c2w, K, hw, grid, TOKEN_PX, occlusion=True)
        held.block_mask(REGISTERS)
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    return held


def _run_attention(path: str, frames: int, grid: tuple[int, int], device: str, dim: int, heads: int,
                   autocast: bool, repeat: int, queue) -> None:
    import types

    import torch
    from torch import nn

    from d4d.models.dynamic.epipolar_attention import EpipolarBranch
    from d4d.models.dynamic.epipolar_mask import clip_epipolar_spans

    c2w, K, hw = _setup(frames, grid, device)
    dev = torch.device(device)
    torch.manual_seed(0)
    attn = types.SimpleNamespace(to_q=nn.Linear(dim, dim), to_k=nn.Linear(dim, dim), to_v=nn.Linear(dim, dim), heads=heads)
    branch = EpipolarBranch(attn, REGISTERS, CHUNK_FRAMES, path).to(dev)
    nn.init.normal_(branch.to_out.weight, std=dim ** -0.5)
    mask = clip_epipolar_spans(c2w, K, hw, grid, TOKEN_PX, occlusion=True)
    mask.block_mask(REGISTERS)  # built once per training step, shared by every block: not timed here
    x = torch.randn(1, mask.length, dim, device=dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast)
    xg = x.clone().requires_grad_(True)

    def forward():
        with torch.no_grad(), amp:
            branch(x, mask, mask.tokens_per_frame)

    def forward_backward():
        with amp:
            out = branch(xg, mask, mask.tokens_per_frame)
        out.float().square().mean().backward()

    results = {"forward+backward": None}  # flex on CPU: no backward in torch
    stages = [("forward", forward)] + ([] if path == "flex" and dev.type == "cpu" else [("forward+backward", forward_backward)])
    for stage, fn in stages:
        fn()  # warm-up (compiles flex)
        results[stage] = (_best_time(fn, repeat, dev), _peak(fn, dev))
    queue.put(results)


def _best_time(fn, repeat: int, dev) -> float:
    """The fastest of ``repeat`` calls (the least disturbed by other load)."""
    import torch

    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def _peak(fn, dev) -> float:
    """Peak memory of one more call, on its own (the trim before it costs time: docstring)."""
    with _Meter(dev) as m:
        fn()
    return m.peak


def _run_tiles(frames: int, grid: tuple[int, int], device: str, queue) -> None:
    from d4d.models.dynamic.epipolar_mask import clip_epipolar_spans

    out = {}
    for motion in MOTIONS:
        c2w, K, hw = _setup(frames, grid, device, motion)
        mask = clip_epipolar_spans(c2w, K, hw, grid, TOKEN_PX, occlusion=True)
        out[motion] = (float(mask.tiles(REGISTERS).float().mean()), float(mask.dense().float().mean())
                       if mask.length <= 12_000 else None)
    queue.put(out)


def _spawn(target, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = None
    while result is None:
        try:
            result = queue.get(timeout=1.0)
        except queue_module.Empty:
            if not proc.is_alive():  # died (out of memory?) without an answer
                break
    proc.join()
    return result if proc.exitcode == 0 else None


def _fmt(cell) -> str:
    return f"{'n/a':>9s} {'':>9s}" if cell is None else f"{cell[0]:9.3f} {cell[1]:9.1f}"


def _ratio(base, cand) -> str:
    if base is None or cand is None:
        return f"{'n/a':>7s} {'':>7s}"
    mem = f"{base[1] / cand[1]:7.1f}" if cand[1] > 1 else f"{'-':>7s}"
    return f"{base[0] / cand[0]:7.2f} {mem}"


def main() -> None:
    import torch

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, nargs="+", default=list(FRAMES), help="video frames (1 + 4 k)")
    p.add_argument("--grid", type=int, nargs=2, default=[30, 52] if cuda else [15, 26], help="tokens per frame h w")
    p.add_argument("--dim", type=int, default=5120 if cuda else 128, help="branch width (Wan 14B: 5120)")
    p.add_argument("--heads", type=int, default=40 if cuda else 2)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--no-autocast", action="store_true", help="float32 on CUDA too (CPU runs float32)")
    p.add_argument("--max-reference-gb", type=float, default=2.0, help="skip the all-pairs reference above this")
    p.add_argument("--skip-full-grid-tiles", action="store_true", help="no tile fractions at Wan's 30x52")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process (OMP_NUM_THREADS)")
    p.add_argument("--repeat", type=int, default=2, help="timed calls per measurement (the fastest is shown)")
    p.add_argument("--sections", type=int, nargs="+", default=[1, 2, 3], help="which of 1 tiles, 2 masks, 3 attention")
    p.add_argument("--tile-fractions", action="store_true", help="only section 1 (= --sections 1)")
    args = p.parse_args()
    if args.tile_fractions:
        args.sections = [1]
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by torch in each spawned process
    grid, device = tuple(args.grid), args.device
    autocast = device == "cuda" and not args.no_autocast
    note = "" if grid == (30, 52) else f" (smaller than Wan 480p's 30x52 tokens, for this {os.cpu_count()}-core CPU)"
    print(f"device {device}, torch {torch.__version__}, token grid {grid[0]}x{grid[1]} of {TOKEN_PX} px{note}, "
          f"branch width {args.dim} ({args.heads} heads), {'bf16 autocast' if autocast else 'float32'}, "
          f"orbit cameras, occlusion masks, {REGISTERS} registers, {args.threads} CPU thread(s)")
    settings = [(f, 1 + (f - 1) // 4) for f in args.frames]

    if 1 in args.sections:
        _tiles_section(args, grid, device, settings)
    if 2 in args.sections:
        _mask_section(args, grid, device, settings)
    if 3 in args.sections:
        _attention_section(args, grid, device, settings, autocast)


def _tiles_section(args, grid, device, settings) -> None:
    print("\n1. non-empty 128x128 tiles of the (L, 4 + L) attention (and allowed pairs)")
    grids = [grid] + ([] if grid == (30, 52) or args.skip_full_grid_tiles else [(30, 52)])
    for g in grids:
        for frames, latent in settings if g == grid else [(49, 13)]:
            tiles = _spawn(_run_tiles, frames, g, device)
            cells = "  ".join(f"{m} {t * 100:5.1f}%" + (f" ({a * 100:.1f}%)" if a is not None else "")
                              for m, (t, a) in tiles.items()) if tiles else "failed"
            print(f"  {frames:3d} frames = {latent:2d} x {g[0]}x{g[1]} tokens: {cells}")


def _mask_section(args, grid, device, settings) -> None:
    print("\n2. mask construction, one clip (seconds, peak MiB above start; ratio = previous / method)")
    print(f"  {'frames':>6s} {'tokens':>7s} {'method':>17s} {'seconds':>9s} {'peak MiB':>9s} {'time x':>7s} {'mem x':>7s}")
    for frames, latent in settings:
        length = latent * grid[0] * grid[1]
        base = None
        for method in ("previous", "reference", "spans->dense", "dense->BlockMask", "spans->BlockMask"):
            if method == "reference" and length ** 2 * 10 / 2**30 > args.max_reference_gb:
                print(f"  {frames:6d} {length:7d} {method:>17s}  skipped: ~{length ** 2 * 10 / 2**30:.1f} GiB")
                continue
            cell = _spawn(_run_mask, method, frames, grid, device, args.repeat)
            base = cell if method == "previous" else base
            if cell is None:
                print(f"  {frames:6d} {length:7d} {method:>17s}  the process failed (out of memory?)")
                continue
            print(f"  {frames:6d} {length:7d} {method:>17s} {_fmt(cell)} {_ratio(base, cell)}", flush=True)


def _attention_section(args, grid, device, settings, autocast) -> None:
    print("\n3. one epipolar branch (seconds, peak MiB above start; ratio = dense / flex)")
    print(f"  {'frames':>6s} {'tokens':>7s} {'stage':>16s} {'dense s':>9s} {'dense MiB':>9s} "
          f"{'flex s':>9s} {'flex MiB':>9s} {'time x':>7s} {'mem x':>7s}")
    for frames, latent in settings:
        length = latent * grid[0] * grid[1]
        runs = {path: _spawn(_run_attention, path, frames, grid, device, args.dim, args.heads, autocast, args.repeat)
                for path in ("dense", "flex")}
        for path in (p for p, r in runs.items() if r is None):
            print(f"  {frames:6d} {length:7d} {path}: the process failed (out of memory?)")
        for stage in ("forward", "forward+backward"):
            dense, flex = ((runs[p] or {}).get(stage) for p in ("dense", "flex"))
            print(f"  {frames:6d} {length:7d} {stage:>16s} {_fmt(dense)} {_fmt(flex)} {_ratio(dense, flex)}", flush=True)
    if device == "cpu":
        print("  flex forward+backward: n/a, torch's flex_attention has no backward on CPU (training uses dense there)")


if __name__ == "__main__":
    main()
