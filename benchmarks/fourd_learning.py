"""Does the 4D generator's network learn? Held-out synthetic depth after a few CPU minutes.

Trains ``recipes/debug/4dgen_224_linear.yaml`` (``python -m d4d.fit``, ``--epochs`` epochs) on the
synthetic train shards, then on the held-out test shards (windows of 4 frames, 32x32) compares
scale-aligned depth AbsRel / delta<1.25 (one median scale per clip, :func:`d4d.fourd.losses.depth_metrics`) of

* the trained network (its own-camera z),
* the temporal-structure initialisation (Depth Anything V2 + DIS flow + scale alignment,
  back-projected). The pretrained Depth Anything weights cannot be downloaded here, so without
  ``--depth-model`` a stand-in is made first (:mod:`benchmarks.fourd_depth_prior`): the Depth Anything
  architecture trained on single frames of the synthetic *training* shards for ``--depth-steps``
  steps; the same model is the 4D network's ``init_depth`` (its supervision for clips without depth),
* a constant-depth baseline (every pixel the same depth).

    python -m benchmarks.fourd_learning [--epochs 12] [--depth-model DIR_OR_ID] [--depth-steps 250] [--checkpoint CKPT]
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


def train(epochs: int, run_dir: Path, data: str, depth_model: str | None, extra: list[str]) -> Path:
    recipe = REPO / "recipes" / "debug" / "4dgen_224_linear.yaml"
    cmd = [sys.executable, "-m", "d4d.fit", str(recipe), "--trainer.max_epochs", str(epochs),
           "--run_dir", str(run_dir), *(["--model.init_args.init_depth", depth_model] if depth_model else []),
           *extra, "--data.init_args.train_shards", f"{data}/train",
           "--data.init_args.val_shards", f"{data}/val", "--data.init_args.test_shards", f"{data}/test"]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    print(f"training: {epochs} epochs in {time.time() - t0:.0f} s (wall, machine shared)")
    return run_dir / "checkpoints" / "last.ckpt"


def evaluate(ckpt: Path, data: str, depth_model: str | None, max_batches: int) -> dict[str, float]:
    net, _ = load_network(ckpt)
    depth_net = DepthEstimator(depth_model, input_size=56)
    dm = FourDDataModule(train_shards=f"{data}/train", test_shards=f"{data}/test", num_frames=4,
                         image_sizes=[(32, 32)], batch_size=8, num_workers=0)
    dm.setup("test")
    scores: dict[str, list[torch.Tensor]] = {k: [] for k in ("net_abs_rel", "net_delta1", "init_abs_rel",
                                                              "init_delta1", "const_abs_rel", "const_delta1")}
    with torch.no_grad():
        for i, batch in enumerate(dm.test_dataloader()):
            if i >= max_batches:
                break
            gt = batch["depth"]
            pred = net(batch["frames"], batch["c2w"], batch["K"])
            m = depth_metrics(pred["local"][..., 2], gt)
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--data", default="data/synthetic", help="synthetic shard root (make data)")
    p.add_argument("--run-dir", type=Path, default=REPO / "runs" / "bench" / "fourd_learning")
    p.add_argument("--checkpoint", type=Path, help="skip training, evaluate this checkpoint")
    p.add_argument("--depth-model", default=None, help="Depth Anything V2 dir / hub id for the initialisation "
                   "(default: train the stand-in, module docstring)")
    p.add_argument("--depth-steps", type=int, default=250, help="training steps of the stand-in depth model")
    p.add_argument("--fit-args", nargs="*", default=[], help="extra d4d.fit overrides, e.g. --trainer.max_epochs=8")
    p.add_argument("--max-batches", type=int, default=8)
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
    ckpt = args.checkpoint or train(args.epochs, args.run_dir, args.data, depth_model, args.fit_args)
    r = evaluate(ckpt, args.data, depth_model, args.max_batches)
    print(f"held-out synthetic clips: {r['clips']} (4 frames, 32x32)")
    print(f"{'':28s} {'AbsRel':>8s} {'delta<1.25':>10s}")
    for name, key in (("trained network", "net"), ("initialisation (DA + align)", "init"), ("constant depth", "const")):
        print(f"{name:28s} {r[key + '_abs_rel']:8.4f} {r[key + '_delta1']:10.4f}")
    print(f"network vs initialisation: {100 * (1 - r['net_abs_rel'] / r['init_abs_rel']):.1f}% lower AbsRel; "
          f"vs constant: {100 * (1 - r['net_abs_rel'] / r['const_abs_rel']):.1f}% lower")


if __name__ == "__main__":
    main()
