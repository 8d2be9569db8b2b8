"""Memory, FLOPs and GPU-hours of every recipe, from its modules built on the meta device (no weights).

    python -m benchmarks.memory_plan                       # recipes/*.yaml (full size, ~2 min on 2 cores)
    python -m benchmarks.memory_plan recipes/debug/*.yaml  # the debug recipes (seconds)
    python -m benchmarks.memory_plan --mfu 0.4 --peak-flops 989e12 --auto-devices 8 --json plan.json

Each recipe's LightningModule is built as ``d4d.fit`` builds it, the pretrained networks from their
published configs (:mod:`d4d.models.published`), under ``torch.device("meta")``; its training step is
run on meta tensors at the recipe's batch and image size (:mod:`benchmarks.memory_stages`) and
measured (:mod:`benchmarks.meta_measure`). Printed: parameters, the per-GPU memory of DDP and ZeRO-1/2/3
on the recipe's GPUs (``trainer.devices x trainer.num_nodes``; ``devices: auto`` = ``--auto-devices``),
host memory to load, FLOPs per sample and the GPU-hours of the recipe's schedule.

Memory model, per GPU, ``N`` GPUs, ``P`` all parameters, ``T`` trainable ones. The optimizer's state and
the temporaries of its step are measured: the recipe's optimizer (``foreach``, as on CUDA) steps once
on meta float32 copies of the trainable parameters (AdamW: 8 bytes of state and 4 of temporaries per
element). The step runs after the backward has freed the activations, so a total counts the larger
of the two.

* **DDP** (Lightning; ``bf16-mixed`` = autocast): every parameter in the dtype it is built/loaded in
  (trainable: float32; frozen: what the module loads, e.g. ``model.frozen_dtype`` of the dynamic
  stage, float32 for the VAE and for the static/4D stages' encoders); gradients and optimizer states
  of the float32 trainable parameters; DDP's reducer buckets, one more copy of the gradients
  (Lightning leaves ``gradient_as_bucket_view`` off; none on one GPU); under ``bf16-mixed`` the bf16
  copies autocast caches of the float32 trainable weights (2 bytes x T, held through the forward).
* **ZeRO-s** (DeepSpeed, ``bf16-mixed``: the engine casts *every* parameter, frozen ones included, to
  bf16 (2 bytes, ``w``; 4 under 32-true) and runs without autocast): weights ``w P`` (ZeRO-3: ``w P / N``
  for tensors above ``stage3_param_persistence_threshold``, the smaller ones whole, plus the working
  set: the largest module's own parameters and ``stage3_prefetch_bucket_size`` elements); gradients
  ``w T`` (ZeRO-1) or ``w T / N`` (ZeRO-2, 3); optimizer: float32 master + states of ``T / N``;
  step: the float32 gradient partition DeepSpeed hands the optimizer + its temporaries, ``/ N``;
  communication buckets ``reduce_bucket_size`` elements x ``w`` (twice with ``overlap_comm``), from
  ``configs/deepspeed/zeroN.json``. Setup: DeepSpeed moves the whole cast model to the GPU before
  ZeRO-3 partitions it (``d4d`` builds models in ``__init__``, not under ``zero.Init``): ``setup``.
* **Activations** (measured, not modelled): the live peak over one micro-batch's inputs, frozen
  encoders, forward and backward on meta tensors with the kernels an H100 runs (flash /
  memory-efficient attention), bf16 under ``bf16-mixed`` (the DeepSpeed case; DDP's autocast differs
  in the dtypes of norms and casts), with and without the recipe's activation checkpointing.
  The dynamic stage is measured on its dense epipolar path with a dense ``(B, L, L)`` mask; on CUDA
  the recipe's ``epipolar_backend: auto`` runs flex attention, which keeps neither the mask nor the
  bias tensors: the figure is an upper bound.
* Not included: the CUDA context, NCCL buffers, allocator fragmentation (``--reserve-gb`` is kept free
  for them when deciding whether a recipe fits ``--gpu-gb``), frozen helpers outside the module tree
  (the 4D stages' Depth Anything, built on first use).

Host memory to load: every parameter in the dtype it is built in, except those ``load_wan`` reads
straight onto the GPU (``model.load_device``, dynamic stage); per node x the GPUs of a node.
``from_pretrained`` builds the module empty and copies the (mmap'd) safetensors in once
(``low_cpu_mem_usage``), so there is no second, randomly initialised copy.

FLOPs: ``FlopCounterMode`` per micro-batch, divided by its samples (with several ``image_sizes``, one
drawn per batch, the mean over them; memory is for the largest). ``model`` counts attention's
backward as 2x its forward (the usual MFU convention; FlopCounterMode counts the kernel's 5 matmuls);
``+recompute`` adds what activation checkpointing recomputes. GPU-hours = samples of the schedule
(``max_steps x accumulate_grad_batches x GPUs x batch``, or ``max_epochs x data.epoch_length x GPUs``)
x (model + frozen-encoder FLOPs per sample) / (MFU x peak FLOP/s) / 3600.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib
import inspect
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.memory_stages import REPO, build_stage, image_sizes, read_recipe
from benchmarks.meta_measure import LiveBytes, StepMeasure, measure_step, summary

GB = 1e9
STRATEGIES = ("DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3")


@dataclasses.dataclass
class Params:
    total: int
    trainable: int
    bytes_all: int  # as built / loaded
    bytes_trainable: int
    host: int  # bytes in host memory while loading (one rank)
    on_gpu_load: int  # bytes read straight onto the GPU
    small: int  # elements of tensors <= the ZeRO-3 persistence threshold (kept whole)
    largest_module: int  # elements of the module with the most parameters of its own


def param_stats(stage, persistence: int) -> Params:
    params = list(stage.module.parameters())
    trainable = [p for p in params if p.requires_grad]
    on_gpu = [p for p in params if stage.checkpoint_on_gpu and id(p) in stage.from_checkpoint]
    own = (sum(p.numel() for p in m.parameters(recurse=False)) for m in stage.module.modules())

    def nbytes(ps):
        return sum(p.numel() * p.element_size() for p in ps)

    return Params(sum(p.numel() for p in params), sum(p.numel() for p in trainable), nbytes(params),
                  nbytes(trainable), nbytes(params) - nbytes(on_gpu), nbytes(on_gpu),
                  sum(p.numel() for p in params if p.numel() <= persistence), max(own, default=0))


@dataclasses.dataclass
class OptimizerBytes:
    state: float  # bytes of optimizer state per trainable float32 element (Adam/AdamW: 8)
    temporary: float  # bytes of temporaries of one step per element (foreach Adam: 4)


def optimizer_bytes(recipe: dict[str, Any], trainable: list[torch.nn.Parameter]) -> OptimizerBytes:
    """Run the recipe's optimizer (``foreach`` as on CUDA) for one step on meta float32 copies of the
    trainable parameters and measure its states and the temporaries of the step."""
    spec = recipe["model"]["init_args"].get("optimizer") or {"class_path": "torch.optim.AdamW"}
    path, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(path), name)
    kwargs = dict(spec.get("init_args") or {})
    if "foreach" in inspect.signature(cls.__init__).parameters:
        kwargs["foreach"] = True
    params = [torch.nn.Parameter(torch.empty(p.shape, device="meta")) for p in trainable]
    for p in params:
        p.grad = torch.empty_like(p)
    opt = cls(params, **kwargs)
    with LiveBytes() as live:
        opt.step()
    elements = max(1, sum(p.numel() for p in params))
    return OptimizerBytes(live.current / elements, (live.peak - live.current) / elements)


def ds_config(stage: int) -> dict[str, Any]:
    return json.loads((REPO / "configs" / "deepspeed" / f"zero{stage}.json").read_text())["zero_optimization"]


def world(recipe: dict[str, Any], auto_devices: int) -> tuple[int, int, str]:
    """(GPUs in all, GPUs per node, how devices was read)."""
    trainer = recipe["trainer"]
    dev = trainer.get("devices", "auto")
    per_node = auto_devices if dev in ("auto", -1, "-1") else len(dev) if isinstance(dev, list) else int(dev)
    nodes = int(trainer.get("num_nodes", 1))
    return per_node * nodes, per_node, f"{per_node}{' (auto)' if dev in ('auto', -1, '-1') else ''} x {nodes}"


def recipe_strategy(recipe: dict[str, Any], gpus: int) -> str:
    ds = str(recipe.get("deepspeed") or "none")
    if ds not in ("none", "null"):
        return f"ZeRO-{ds_config(int(ds[4]))['stage']}" if re.fullmatch(r"zero[123]", ds) else f"DeepSpeed {ds}"
    return "DDP" if gpus > 1 else "single"


def per_gpu(p: Params, strategy: str, n: int, precision: str, opt: OptimizerBytes, act: int) -> dict[str, int]:
    """Bytes per GPU by part (module docstring); ``total`` counts the larger of the activations and
    the optimizer step's transients (the step runs after the backward freed the activations)."""
    low = precision.startswith(("bf16", "16"))
    if strategy in ("DDP", "single"):
        parts = {"weights": p.bytes_all, "grads": p.bytes_trainable, "optim": int(opt.state * p.trainable),
                 "buffers": p.bytes_trainable if n > 1 else 0, "autocast": 2 * p.trainable if low else 0}
        step = int(opt.temporary * p.trainable)
        setup = p.bytes_all
    else:
        s = int(strategy[-1])
        cfg = ds_config(s)
        w = 2 if low else 4
        if s < 3:
            weights = w * p.total
        else:
            weights = w * ((p.total - p.small) // n + p.small + p.largest_module
                           + int(cfg.get("stage3_prefetch_bucket_size", 5e7)))
        grads = w * p.trainable // (1 if s == 1 else n)
        buckets = w * int(cfg.get("reduce_bucket_size", 5e8)) * (2 if cfg.get("overlap_comm") else 1)
        parts = {"weights": weights, "grads": grads, "optim": int((4 + opt.state) * p.trainable / n),
                 "buffers": buckets, "autocast": 0}
        step = int((4 + opt.temporary) * p.trainable / n)  # + the float32 gradient partition of the step
        setup = max(w * p.total, p.on_gpu_load)
    parts["total"] = sum(parts.values()) + max(act, step)
    parts.update(activations=act, step=step, setup=setup)
    return parts


def schedule_samples(recipe: dict[str, Any], micro: int, gpus: int) -> tuple[int, str]:
    trainer, data = recipe["trainer"], recipe["data"]["init_args"]
    accum = int(trainer.get("accumulate_grad_batches", 1))
    steps = int(trainer.get("max_steps", -1) or -1)
    if steps > 0:
        return steps * accum * gpus * micro, f"{steps} steps x {accum} x {gpus} x {micro}"
    epochs = int(trainer["max_epochs"])
    if data.get("epoch_length"):  # samples per epoch per rank
        per_rank = int(data["epoch_length"])
    else:  # the classifier: episodes (one micro-batch each) per epoch
        per_rank = int(data.get("episodes_per_epoch", 1)) * micro
    return epochs * per_rank * gpus, f"{epochs} epochs x {per_rank} x {gpus}"


def plan_recipe(path: str, args) -> dict[str, Any]:
    """Build, measure and model one recipe."""
    start = time.perf_counter()
    recipe = read_recipe(path)
    precision = str(recipe["trainer"].get("precision", "32-true"))
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision.split("-")[0])  # None: float32
    targets = list(recipe.get("activation_checkpointing") or [])
    stage = build_stage(path, "meta", frozen_dtype=args.frozen_dtype)
    persistence = int(ds_config(3).get("stage3_param_persistence_threshold", 1e5))
    params = param_stats(stage, persistence)
    opt = optimizer_bytes(recipe, [p for p in stage.module.parameters() if p.requires_grad])
    m = measure_step(stage, targets, dtype, args.sdpa)
    gpus, per_node, devices = world(recipe, args.auto_devices)
    act_ac = m.peak_ac if targets else m.peak
    memory = {}
    for strategy in STRATEGIES:
        with_ac = per_gpu(params, strategy, gpus, precision, opt, act_ac)
        without = per_gpu(params, strategy, gpus, precision, opt, m.peak)
        memory[strategy] = {**with_ac, "act_no_ac": m.peak, "total_no_ac": without["total"]}
    own = recipe_strategy(recipe, gpus)
    chosen = memory["DDP" if own == "single" else own]["total"] if own in STRATEGIES + ("single",) else None
    # FLOPs per sample, averaged over the image sizes the recipe draws from (one per batch)
    flops = [m]  # memory: the largest size; FLOPs: every size, once each
    for size in [s for s in image_sizes(recipe) if s != stage.size]:
        extra = build_stage(path, "meta", size=size, frozen_dtype=args.frozen_dtype)
        flops.append(measure_step(extra, targets, dtype, args.sdpa, memory=False))
    b = stage.batch

    def mean(attr):
        return sum(getattr(x, attr) for x in flops) / len(flops) / b

    per_sample = {"encode": mean("flops_encode"), "fwd": mean("flops_fwd"), "bwd": mean("flops_bwd"),
                  "counted": mean("flops_step"), "model": mean("flops_model"), "recompute": mean("flops_recompute")}
    samples, how = schedule_samples(recipe, b, gpus)
    work = per_sample["model"] + per_sample["encode"]
    gpu_hours = samples * work / (args.mfu * args.peak_flops) / 3600
    out = {"recipe": path, "stage": type(stage.module).__name__, "params": dataclasses.asdict(params),
           "gpus": gpus, "per_node": per_node, "devices": devices, "precision": precision,
           "checkpointing": targets, "optimizer": dataclasses.asdict(opt), "strategy": own, "memory": memory,
           "fits": chosen is not None and chosen <= (args.gpu_gb - args.reserve_gb) * GB,
           "host_rank": params.host, "host_node": params.host * per_node, "measure": summary(m),
           "micro_batch": b, "size": list(stage.size or ()), "flops_per_sample": per_sample, "samples": samples,
           "samples_how": how, "gpu_hours": gpu_hours}
    if recipe["model"]["init_args"].get("epipolar_blocks", "none") != "none":
        out["epipolar"] = _epipolar_share(path, recipe, m, targets, dtype, args)
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def _epipolar_share(path, recipe, m: StepMeasure, targets, dtype, args) -> dict[str, Any]:
    """The epipolar branches' FLOPs: the step's minus the same step built without them; their
    attention part (fused attention FLOPs, with minus without) as the block-sparse path would
    compute it: only ``fraction`` of it (needs ``--sdpa gpu``)."""
    import yaml

    tmp = Path(args.tmp) / f"{Path(path).stem}_no_epipolar.yaml"
    recipe = json.loads(json.dumps(recipe))
    recipe["model"]["init_args"]["epipolar_blocks"] = "none"
    tmp.write_text(yaml.safe_dump(recipe))
    base = measure_step(build_stage(tmp, "meta", frozen_dtype=args.frozen_dtype), targets, dtype, args.sdpa,
                        memory=False, checkpointed_run=False)
    branch = m.flops_model - base.flops_model
    attention = m.flops_attention_model - base.flops_attention_model  # the branches' attention
    rows = {"dense": {"fraction": 1.0, "share": branch / m.flops_model, "model": m.flops_model}}
    for f in args.tile_fractions:
        cut = int(attention * (1 - f))
        rows[f"tiles {f:g}"] = {"fraction": f, "share": (branch - cut) / (m.flops_model - cut),
                                "model": m.flops_model - cut}
    return {"branch": branch, "attention": attention, "rows": rows}


def _gb(x: float) -> str:
    return f"{x / GB:.1f}"


def _p(x: float) -> str:
    """FLOPs: G below a tera, T below a peta, P above."""
    return f"{x / 1e9:.2f}G" if x < 1e12 else f"{x / 1e12:,.1f}T" if x < 1e15 else f"{x / 1e15:.2f}P"


def _table(header: list[str], rows: list[list[str]]) -> None:
    """Columns sized to fit; the first left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for r in [header] + rows:
        print(" ".join(f"{c:{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(map(str, r), widths))))


def print_tables(plans: list[dict[str, Any]], args) -> None:
    def name(p):
        return Path(p["recipe"]).stem

    print(f"Per-GPU memory (GB, 1e9 B) with each recipe's activation checkpointing; fits = the recipe's "
          f"strategy within {args.gpu_gb:g} GB - {args.reserve_gb:g} GB reserve\n")
    _table(["recipe", "params", "trainable", "GPUs", "AC", *STRATEGIES, "strategy", "fits", "host/rank",
            "host/node"],
           [[name(p), f"{p['params']['total'] / 1e9:.2f}B", f"{p['params']['trainable'] / 1e9:.3f}B", p["devices"],
             "yes" if p["checkpointing"] else "no", *(_gb(p["memory"][s]["total"]) for s in STRATEGIES),
             p["strategy"], "yes" if p["fits"] else "NO", _gb(p["host_rank"]), _gb(p["host_node"])] for p in plans])
    print("\nBreakdown per GPU (GB): weights, gradients, optimizer states, buffers (DDP buckets / ZeRO comm. "
          "buckets + autocast copies), optimizer-step transients, activations with / without checkpointing "
          "(a total has the larger of step and activations), setup peak")
    rows = []
    for p in plans:
        for s in STRATEGIES:
            r, ac = p["memory"][s], bool(p["checkpointing"])
            rows.append([name(p), s, _gb(r["weights"]), _gb(r["grads"]), _gb(r["optim"]),
                         _gb(r["buffers"] + r["autocast"]), _gb(r["step"]), _gb(r["activations"]) if ac else "-",
                         _gb(r["act_no_ac"]), _gb(r["total"]) if ac else "-", _gb(r["total_no_ac"]),
                         _gb(r["setup"])])
    _table(["recipe", "strategy", "weights", "grads", "optim", "buffers", "step", "act AC", "act no", "total AC",
            "total no", "setup"], rows)
    print("\nActivations of one micro-batch (GB, measured on meta): saved for backward without / with "
          "checkpointing, live peak without / with (inputs, frozen encoders, transients included)")
    _table(["recipe", "micro-batch", "saved", "saved AC", "peak", "peak AC", "encoders", "blocks"],
           [[name(p), f"{p['micro_batch']} @ {'x'.join(map(str, p['size']))}", _gb(p["measure"]["saved"]),
             _gb(p["measure"]["saved_ac"]), _gb(p["measure"]["peak"]),
             _gb(p["measure"]["peak_ac"]) if p["measure"]["blocks"] else "-", _gb(p["measure"]["encode_peak"]),
             p["measure"]["blocks"]] for p in plans])
    print(f"\nFLOPs per sample (FlopCounterMode; model = attention backward 2x forward) and GPU-hours at "
          f"MFU {args.mfu:g} of {args.peak_flops / 1e12:g} TFLOP/s")
    _table(["recipe", "encoders", "fwd", "bwd", "counted", "model", "+recomp.", "samples", "GPU-h", "wall h"],
           [[name(p), *(_p(p["flops_per_sample"][k]) for k in ("encode", "fwd", "bwd", "counted", "model")),
             _p(p["flops_per_sample"]["model"] + p["flops_per_sample"]["recompute"]), f"{p['samples']:,}",
             f"{p['gpu_hours']:,.0f}", f"{p['gpu_hours'] / p['gpus']:,.1f}"] for p in plans])
    for p in [p for p in plans if "epipolar" in p]:
        e, b, f = p["epipolar"], p["micro_batch"], p["flops_per_sample"]
        print(f"\n{name(p)}: epipolar branches {_p(e['branch'] / b)} of {_p(p['measure']['flops_model'] / b)} "
              f"model FLOPs per sample, their attention {_p(e['attention'] / b)}; block-sparse (flex) computes "
              "only the non-empty 128x128 tiles:")
        for label, r in e["rows"].items():
            hours = p["gpu_hours"] * (r["model"] / b + f["encode"]) / (f["model"] + f["encode"])
            print(f"  {label:>10}: epipolar share {100 * r['share']:4.1f}%, model FLOPs per sample "
                  f"{_p(r['model'] / b)}, GPU-h {hours:,.0f}")
    print("\nhost/rank: parameters in host memory while loading (low_cpu_mem_usage: no second copy); host/node: "
          "x GPUs per node. setup: GPU memory before ZeRO-3 partitions (DeepSpeed moves the cast model first).")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipes", nargs="*", help="recipe YAMLs (default: recipes/*.yaml)")
    p.add_argument("--auto-devices", type=int, default=8, help="GPUs per node for trainer.devices: auto (8)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (0.4)")
    p.add_argument("--peak-flops", type=float, default=989e12,
                   help="assumed peak FLOP/s (989e12: H100 SXM bf16 dense)")
    p.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory (80 GB)")
    p.add_argument("--reserve-gb", type=float, default=4.0,
                   help="kept free for the CUDA context, NCCL and fragmentation (4 GB)")
    p.add_argument("--tile-fractions", type=float, nargs="*", default=[0.24, 0.95],
                   help="non-empty tile fractions of the epipolar masks (filed by benchmarks/epipolar.py: "
                        "~0.24 orbit/turn, 0.95 zoom)")
    p.add_argument("--frozen-dtype", default=None, help="override the dynamic stage's model.frozen_dtype")
    p.add_argument("--sdpa", default="gpu", choices=["gpu", "math"],
                   help="attention kernels (gpu: as on an H100)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    paths = args.recipes or sorted(glob.glob(str(REPO / "recipes" / "*.yaml")))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        plans = []
        for path in paths:
            print(f"[{len(plans) + 1}/{len(paths)}] {path}", file=sys.stderr, flush=True)
            plans.append(plan_recipe(path, args))
    print_tables(plans, args)
    if args.json:
        Path(args.json).write_text(json.dumps(plans, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
