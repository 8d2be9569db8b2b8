"""Does the 4D generator's network learn? Held-out synthetic depth after a few CPU minutes.

Trains ``recipes/debug/4dgen_224_linear.yaml`` as it is (``python -m d4d.fit``: 7 epochs of 3200
windows, ~3.5 min on 2 cores; ``--epochs`` / ``--seed`` change it) on the synthetic train shards, then on the held-out test shards (windows of 4 frames, 32x32) compares
scale-aligned depth AbsRel / delta<1.25 (one median scale per clip, :func:`d4d.fourd.losses.depth_metrics`) of

* the trained network (its own-camera z),
* the temporal-structure initialisation (Depth Anything V2 + DIS flow + scale alignment,
  back-projected). The pretrained Depth Anything weights cannot be downloaded here, so without
  ``--depth-model`` a stand-in is made first (:mod:`benchmarks.fourd_depth_prior`): the Depth Anything
  architecture trained on single frames of the synthetic *training* shards for ``--depth-steps``
  steps; the same model is the 4D network's ``init_depth`` (its supervision for clips without depth),
* a constant-depth baseline (every pixel the same depth).

    python -m benchmarks.fourd_learning [--epochs N] [--seed S] [--depth-model DIR_OR_ID] [--depth-steps 250] [--checkpoint CKPT]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from d4d.data.fourd_datamodule import FourDDataModule
from d4d.fourd.init import DepthEstimator, initialise
from d4d.fourd.losses import depth_metrics
from d4d.modules.fourdgen import load_network

REPO = Path(__file__).resolve().parents[1]


def train(epochs: int | None, run_dir: Path, data: str, depth_model: str | None, extra: list[str],
          seed: int | None = None) -> Path:
    recipe = REPO / "recipes" / "debug" / "4dgen_224_linear.yaml"
    cmd = [sys.executable, "-m", "d4d.fit", str(recipe), *(["--trainer.max_epochs", str(epochs)] if epochs else []),
           *(["--seed_everything", str(seed)] if seed is not None else []), "--run_dir", str(run_dir), *(["--model.init_args.init_depth", depth_model] if depth_model else []),
           *extra, "--data.init_args.train_shards", f"{data}/train",
           "--data.init_args.val_shards", f"{data}/val", "--data.init_args.test_shards", f"{data}/test"]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    what = f"{epochs} epochs" if epochs else "the recipe's epochs"
    print(f"training: {what} in {time.time() - t0:.0f} s wall")
    return run_dir / "checkpoints" / "last.ckpt"


def evaluate(ckpt: Path | None, data: str, depth_model: str | None, max_batches: int,
             split: str = "test") -> dict[str, float]:
    """Scores on the first ``max_batches`` batches of 8 windows of ``split`` (``test`` or ``val``, the
    recipe's validation windows); without ``ckpt`` the network's entries are NaN."""
    net = load_network(ckpt)[0] if ckpt else None
    depth_net = DepthEstimator(depth_model, input_size=56)
    dm = FourDDataModule(train_shards=f"{data}/train", val_shards=f"{data}/val", test_shards=f"{data}/test",
                         num_frames=4, image_sizes=[(32, 32)], batch_size=8, num_workers=0)
    dm.setup("fit" if split == "val" else "test")
    loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
    scores: dict[str, list[torch.Tensor]] = {k: [] for k in ("net_abs_rel", "net_delta1", "init_abs_rel",
                                                              "init_delta1", "const_abs_rel", "const_delta1")}
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            gt = batch["depth"]
            pred = net(batch["frames"], batch["c2w"], batch["K"])["local"][..., 2] if net else torch.full_like(gt, float("nan"))
            m = depth_metrics(pred, gt)
            scores["net_abs_rel"].append(m["abs_rel"])
            scores["net_delta1"].append(m["delta1"])
            init = torch.stack([initialise(batch["frames"][b], batch["c2w"][b], batch["K"][b], depth_net).depth
                                for b in range(gt.shape[0])])
            m = depth_metrics(init, gt)
            scores["init_abs_rel"].append(m["abs_rel"])
            scores["init_delta1"].append(m["delta1"])
            m = depth_metrics(torch.ones_like(gt), gt)
            scores["const_abs_rel"].append(m["abs_rel"])
            scores["const_delta1"].append(m["delta1"])
    return {k: float(torch.cat(v).nanmean()) for k, v in scores.items()} | {"clips": len(torch.cat(scores["net_abs_rel"]))}


def plot(run_dir: Path, r: dict[str, float], val: dict[str, float], path: Path) -> Path:
    """Validation AbsRel per epoch against training time (from the run's offline wandb history), with
    the initialisation and constant depth on the same validation windows, and the held-out figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from d4d.fourd.viz import save_figure
    from d4d.reporting.sources import load_wandb_offline

    runs = load_wandb_offline(run_dir / "wandb")
    rows = [row for row in (runs[-1].history if runs else []) if isinstance(row.get("val/abs_rel"), float)]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    a.plot([row["_runtime"] / 60 for row in rows], [row["val/abs_rel"] for row in rows], "o-", label="network (per epoch)")
    a.axhline(val["init_abs_rel"], color="C1", ls="--", label="initialisation")
    a.axhline(0.7 * val["init_abs_rel"], color="C1", ls=":", label="30% below initialisation")
    a.axhline(val["const_abs_rel"], color="C7", ls="--", label="constant depth")
    a.set(xlabel="training time (min, wall)", ylabel="scale-aligned AbsRel", title=f"validation windows ({val['clips']})")
    a.legend(fontsize=8, loc="center right")
    names = ["network", "initialisation", "constant"]
    vals = [r["net_abs_rel"], r["init_abs_rel"], r["const_abs_rel"]]
    b.bar(names, vals, color=["C0", "C1", "C7"])
    for x, v in enumerate(vals):
        b.text(x, v, f"{v:.3f}", ha="center", va="bottom")
    b.set(ylabel="scale-aligned AbsRel", title=f"held-out test clips ({r['clips']})")
    fig.suptitle("4D generator, debug recipe: depth of the trained network vs its initialisation")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's (7 epochs of 3200 windows)")
    p.add_argument("--seed", type=int, default=None, help="default: the recipe's seed_everything (0)")
    p.add_argument("--data", default="data/synthetic", help="synthetic shard root (make data)")
    p.add_argument("--run-dir", type=Path, default=REPO / "runs" / "bench" / "fourd_learning")
    p.add_argument("--checkpoint", type=Path, help="skip training, evaluate this checkpoint")
    p.add_argument("--depth-model", default=None, help="Depth Anything V2 dir / hub id for the initialisation "
                   "(default: train the stand-in, module docstring)")
    p.add_argument("--depth-steps", type=int, default=250, help="training steps of the stand-in depth model")
    p.add_argument("--fit-args", action="append", default=[], metavar="OVERRIDE",
                   help="one extra d4d.fit override, repeatable: --fit-args=--data.init_args.num_workers=0")
    p.add_argument("--max-batches", type=int, default=8)
    p.add_argument("--plot", type=Path, help="write the learning-curve picture here (e.g. docs/fourd_learning.png)")
    args = p.parse_args()
    torch.manual_seed(0)
    depth_model = args.depth_model
    if not depth_model:
        from benchmarks.fourd_depth_prior import LABEL, train_depth_prior

        out = args.run_dir.parent / f"depth_prior_{args.depth_steps}"
        if not (out / "config.json").is_file():
            train_depth_prior(args.data, out, args.depth_steps)
        depth_model = str(out)
        print(f"initialisation depth model: {LABEL.format(steps=args.depth_steps)} ({out})")
    elif (Path(depth_model) / "README.txt").is_file():  # a stand-in made earlier: say what it is
        print(f"initialisation depth model: {(Path(depth_model) / 'README.txt').read_text().strip()} ({depth_model})")
    ckpt = args.checkpoint or train(args.epochs, args.run_dir, args.data, depth_model, args.fit_args, args.seed)
    r = evaluate(ckpt, args.data, depth_model, args.max_batches)
    print(f"held-out synthetic clips: {r['clips']} (4 frames, 32x32)")
    print(f"{'':28s} {'AbsRel':>8s} {'delta<1.25':>10s}")
    for name, key in (("trained network", "net"), ("initialisation (DA + align)", "init"), ("constant depth", "const")):
        print(f"{name:28s} {r[key + '_abs_rel']:8.4f} {r[key + '_delta1']:10.4f}")
    vs_init, vs_const = 1 - r["net_abs_rel"] / r["init_abs_rel"], 1 - r["net_abs_rel"] / r["const_abs_rel"]
    print(f"network vs initialisation: {100 * vs_init:.1f}% lower AbsRel; vs constant: {100 * vs_const:.1f}% lower")
    print(f"criterion (>= 30% below the initialisation and below constant depth): "
          f"{'met' if vs_init >= 0.3 and vs_const > 0 else 'NOT met'}")
    if args.plot:
        run_dir = args.checkpoint.parent.parent if args.checkpoint else args.run_dir
        val = evaluate(None, args.data, depth_model, 4, split="val")
        print(f"plot: {plot(run_dir, r, val, args.plot)}")


if __name__ == "__main__":
    main()
