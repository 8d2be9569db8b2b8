"""Host memory to load the dynamic stage's backbone: float32 (before) against the compute dtype.

    python -m benchmarks.wan_loading [--dim 1024] [--layers 8] [--keep DIR]

No Wan 14B weights fit this machine, so a random Wan-I2V-shaped backbone of the same classes
(:func:`d4d.models.dynamic.backbone.build_tiny_wan` at ``--dim``/``--layers``) is written once in the
diffusers layout (float32 safetensors, as the published Wan 2.1 transformer is), then each load runs
in a fresh process that reads every weight once (as the copy to the GPU does) and reports its peak
resident memory above the level it had after importing diffusers/transformers, split into private
memory (``RssAnon``: each rank pays it) and file pages (``RssFile``: the page cache of the mmap'd
safetensors, shared by every rank of a node and reclaimable):

* ``float32``: what ``load_wan`` did before (every part read in float32), the baseline;
* ``bfloat16``: ``DynamicVideoModule(frozen_dtype="bfloat16")``: transformer, UMT5 and CLIP in
  bfloat16, the VAE in float32, ``low_cpu_mem_usage``.

A float32 load of float32 files copies nothing (the tensors map the file), but 91 GB of float32
frozen weights do not fit an 80 GB GPU when Lightning moves the module there; bfloat16 does, at the
price of a private converted copy when loaded on the host. ``load_device: auto`` (the recipe's
default) reads each tensor straight onto the rank's GPU (``device_map``), so the host keeps neither:
that path needs CUDA and is not measured here.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
from pathlib import Path

from benchmarks.rss import PeakRss

FULL_FROZEN = 16.4e9 + 5.7e9 + 0.6e9  # Wan 2.1 I2V 14B transformer + UMT5-XXL + CLIP-H (memory_plan counts)


def _load(path: str, dtype_name: str, queue) -> None:
    import torch
    import diffusers  # noqa: F401  (imports are not the model's memory)
    import transformers  # noqa: F401

    from d4d.models.dynamic.backbone import load_wan, parse_dtype

    torch.set_num_threads(1)
    sampler = PeakRss()
    parts = load_wan(path, parse_dtype(dtype_name, "dtype"), "cpu")
    modules = (parts.transformer, parts.vae, parts.text_encoder, parts.image_encoder)
    checksum = sum(float(p.detach().float().sum()) for m in modules for p in m.parameters())  # touch every weight
    peak = sampler.stop()
    private, shared = peak["anon"], peak["file"]
    nbytes = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    queue.put((private, shared, nbytes, str(parts.transformer.blocks[0].attn1.to_q.weight.dtype), checksum))


def measure(path: str, dtype_name: str):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_load, args=(path, dtype_name, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=1024, help="transformer width (Wan 14B: 5120)")
    p.add_argument("--layers", type=int, default=8, help="transformer blocks (Wan 14B: 40)")
    p.add_argument("--keep", default=None, help="write the random backbone here (default: a temporary dir)")
    args = p.parse_args(argv)
    from d4d.models.dynamic.backbone import build_tiny_wan, save_wan

    tiny = {"dim": args.dim, "heads": args.dim // 128 or 1, "layers": args.layers, "ffn_dim": args.dim * 27 // 10,
            "text_dim": args.dim, "image_dim": args.dim // 4 * 2, "z_dim": 16, "vae_base_dim": 32}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.keep or tmp) / "wan"
        if not (path / "transformer").is_dir():
            print(f"writing a random Wan-shaped backbone (dim {args.dim}, {args.layers} blocks) to {path} ...", flush=True)
            save_wan(build_tiny_wan(tiny), path)
        rows = {name: measure(str(path), name) for name in ("float32", "bfloat16")}
    print(f"{'load dtype':10s} {'weights MB':>10s} {'private MB':>10s} {'page cache MB':>13s} "
          f"{'private/weights':>15s}  transformer")
    for name, (private, shared, nbytes, dtype, _) in rows.items():
        print(f"{name:10s} {nbytes / 1e6:10.1f} {private / 1e6:10.1f} {shared / 1e6:13.1f} {private / nbytes:15.2f}  {dtype}")
    f32, b16 = rows["float32"], rows["bfloat16"]
    print(f"bfloat16 / float32 weights: {b16[2] / f32[2]:.2f}; private memory: float32 {f32[0] / 1e6:.0f} MB, "
          f"bfloat16 {b16[0] / 1e6:.0f} MB (the float32 load maps the file and copies nothing)")
    print(f"full model ({FULL_FROZEN / 1e9:.1f}B frozen parameters in float32 files): float32 weights "
          f"{FULL_FROZEN * 4 / 1e9:.0f} GB per rank (more than an 80 GB GPU holds before DeepSpeed casts them), "
          f"bfloat16 {FULL_FROZEN * 2 / 1e9:.0f} GB; loaded on the host that is "
          f"{FULL_FROZEN * 2 * b16[0] / b16[2] / 1e9:.0f} GB private per rank, "
          f"{8 * FULL_FROZEN * 2 * b16[0] / b16[2] / 1e12:.2f} TB per 8-GPU node; with load_device auto on a GPU "
          f"node each tensor goes straight to the rank's GPU (not measurable on this CPU machine)")

if __name__ == "__main__":
    main()
