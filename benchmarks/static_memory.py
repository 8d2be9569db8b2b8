"""Memory and time of one training step of the static module at 8, 16 and 21 views, with and without
activation (gradient) checkpointing, and a per-view-attention baseline (no 3D attention) measured
in the same run.

Each configuration runs in a fresh subprocess (peak memory is per process): the module of
``recipes/debug/static.yaml`` (or the ``--image-size`` / ``--attention-3d`` given), one warm-up step,
then a second, timed step (forward + backward + AdamW). Peak memory is measured on the first step: the
rise of the process's peak resident set (``ru_maxrss``) over the resident set before it on CPU (so it
includes the AdamW state, the same in every configuration of a model), or
``torch.cuda.max_memory_allocated`` over the allocated memory before it on a GPU.

    python -m benchmarks.static_memory [--views 8 16 21] [--image-size 32] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT_BLOCKS = ["MultiViewTransformerBlock", "PluckerFiLMResBlock"]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def one(views: int, checkpointing: bool, attention_3d: list[str] | None, image_size: int, device: str) -> dict:
    """Build the module, run a warm-up and a timed training step; return the figures."""
    import torch
    import yaml

    from d4d.modules.static import StaticVideoModule
    from d4d.utils.activation_checkpointing import apply_activation_checkpointing

    recipe = yaml.safe_load((REPO / "recipes/debug/static.yaml").read_text())
    args = dict(recipe["model"]["init_args"])
    args.pop("optimizer")
    args.update(image_size=[image_size, image_size])
    if attention_3d is not None:
        args["attention_3d"] = attention_3d
    torch.manual_seed(0)
    module = StaticVideoModule(**args).to(device)
    if checkpointing:  # as d4d.fit's top-level activation_checkpointing key applies it
        apply_activation_checkpointing(module, CHECKPOINT_BLOCKS)
    module.train()
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    c2w = torch.eye(4).repeat(1, views, 1, 1)
    c2w[..., 0, 3] = torch.linspace(0, 1, views)
    K = torch.tensor([[image_size, 0, image_size / 2], [0, image_size, image_size / 2], [0, 0, 1.0]])
    batch = {"frames": torch.rand(1, views, 3, image_size, image_size, device=device), "c2w": c2w.to(device),
             "Ks": K.expand(1, views, 3, 3).to(device)}
    given = torch.zeros(1, views, dtype=torch.bool, device=device)
    given[:, 0] = True

    def step():
        loss = module.diffusion_loss(batch, given, drop_context=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # Memory of the first step (it also allocates the AdamW state, as every real first step does):
    # later steps reuse memory the allocator keeps, which the process's peak RSS cannot see.
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    before = _rss_mb()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    t0 = time.perf_counter()
    step()  # timed: a step after the warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"views": views, "checkpointing": checkpointing, "attention": "per-view" if attention_3d == [] else "3D",
            "step_s": round(seconds, 3), "peak_mb": round(max(peak, 0.0), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--views", type=int, nargs="+", default=[8, 16, 21])
    p.add_argument("--image-size", type=int, default=64, help="64: 32x32 latents, 1024 tokens per view")
    p.add_argument("--attention-3d", nargs="*", default=None,
                   help="3D-attention block globs (default: the debug recipe's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-baseline", action="store_true", help="skip the per-view-attention baseline")
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._one:
        cfg = json.loads(args._one)
        print("RESULT " + json.dumps(one(**cfg)), flush=True)
        return
    configs = []
    for views in args.views:
        if not args.no_baseline:
            configs.append({"views": views, "checkpointing": False, "attention_3d": []})
        configs += [{"views": views, "checkpointing": c, "attention_3d": args.attention_3d} for c in (False, True)]
    rows = []
    for i, cfg in enumerate(configs):
        cfg = {**cfg, "image_size": args.image_size, "device": args.device}
        print(f"[{i + 1}/{len(configs)}] {cfg}", flush=True)
        out = subprocess.run([sys.executable, "-m", "benchmarks.static_memory", "--_one", json.dumps(cfg)],
                             cwd=REPO, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode != 0 or not line:
            print(out.stderr[-2000:])
            raise SystemExit(f"configuration {cfg} failed")
        rows.append(json.loads(line[0][7:]))
    print(f"\nimage {args.image_size}x{args.image_size}, batch 1, device {args.device} "
          "(2 shared CPU cores: times under load)")
    print(f"{'views':>5} {'attention':>9} {'checkpointing':>13} {'step s':>8} {'peak MB':>9}")
    for r in rows:
        print(f"{r['views']:>5} {r['attention']:>9} {str(r['checkpointing']):>13} {r['step_s']:>8.2f} {r['peak_mb']:>9.1f}")


if __name__ == "__main__":
    main()
