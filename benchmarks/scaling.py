"""Step time of a debug model: Lightning (d4d.fit's trainer) against a plain PyTorch loop on the
same model and batch, on 1 process and on 2 processes (DDP, gloo, CPU), all in one run.

Model: the 4D generator's debug recipe (``recipes/debug/4dgen_224_linear.yaml``) when it exists,
else the classifier's; the batch is the first training batch of the recipe's data module (run
``make data`` first), reused every step so that only compute, communication and framework
overhead are timed. Each process uses ``--threads`` torch threads (default 1, so two processes do
not fight over threads). Step time: median over ``--steps`` steps after ``--warmup`` steps, wall
clock from one step's start to the next. Each setting runs in its own subprocess(es).

    python -m benchmarks.scaling [--recipe R] [--steps 10] [--warmup 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FOURDGEN = REPO / "recipes" / "debug" / "4dgen_224_linear.yaml"
CLASSIFIER = REPO / "recipes" / "debug" / "classifier.yaml"


def _model_and_batch(recipe: str, run_dir: str):
    from d4d.fit import build_cli

    cli = build_cli(recipe, ["--run_dir", run_dir, "--data.init_args.num_workers", "0",
                             "--trainer.logger", "false", "--checkpoint_every_n_steps", "null"])
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    return cli.model, batch


def _plain(args, rank: int, world: int) -> list[float]:
    import torch

    model, batch = _model_and_batch(args.recipe, tempfile.mkdtemp())
    model.configure_model()
    module = model
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=world)
        module = torch.nn.parallel.DistributedDataParallel(_StepModule(model))
    optimizer = model.optimizer_factory([p for p in model.parameters() if p.requires_grad])
    times, last = [], None
    for step in range(args.warmup + args.steps):
        now = time.perf_counter()
        if last is not None and step > args.warmup:
            times.append(now - last)
        last = now
        loss = model.training_step(batch, step) if world == 1 else module(batch, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - last)
    return times


class _StepModule(torch.nn.Module):
    """What Lightning's DDP wraps: a module whose forward is the LightningModule's training_step,
    so DDP's gradient all-reduce hooks see the whole step."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, batch, step):
        return self.module.training_step(batch, step)


def _lightning(args, world: int) -> list[float]:
    import lightning as L
    import torch

    model, batch = _model_and_batch(args.recipe, tempfile.mkdtemp())
    times: list[float] = []

    class Timer(L.Callback):
        last = None

        def on_train_batch_start(self, trainer, pl_module, b, batch_idx):
            now = time.perf_counter()
            if self.last is not None and batch_idx > args.warmup:
                times.append(now - self.last)
            self.last = now

        def on_train_end(self, trainer, pl_module):
            times.append(time.perf_counter() - self.last)

    class Repeat(torch.utils.data.IterableDataset):
        def __iter__(self):
            for _ in range(args.warmup + args.steps):
                yield batch

    loader = torch.utils.data.DataLoader(Repeat(), batch_size=None)
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto",
                        max_steps=args.warmup + args.steps, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[Timer()])
    trainer.fit(model, train_dataloaders=loader)
    return times if trainer.global_rank == 0 else []


def _worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    times = _plain(args, rank, world) if args.mode == "plain" else _lightning(args, args.world)
    if rank == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0 and times:
        print("RESULT " + json.dumps({"median_s": statistics.median(times), "steps": len(times)}), flush=True)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, mode: str, world: int) -> float:
    base = [sys.executable, "-m", "benchmarks.scaling", "--worker", "--mode", mode, "--world", str(world),
            "--recipe", args.recipe, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--threads", str(args.threads)]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_port()), "WANDB_MODE": "disabled"}
    if mode == "plain" and world > 1:
        procs = [subprocess.Popen(base, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**env, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r)})
                 for r in range(world)]
        outs = [p.communicate() for p in procs]
    else:  # Lightning starts the other ranks itself
        p = subprocess.Popen(base, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        outs = [p.communicate()]
        procs = [p]
    for p, (out, err) in zip(procs, outs):
        if p.returncode:
            raise SystemExit(f"{mode} x{world} failed:\n{err[-3000:]}")
    line = next(ln for out, _ in outs for ln in out.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[7:])["median_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(FOURDGEN if FOURDGEN.is_file() else CLASSIFIER))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["plain", "lightning"], help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args)
    print(f"model: {Path(args.recipe).name}; {args.steps} timed steps after {args.warmup}; "
          f"{args.threads} torch thread(s) per process; {os.cpu_count()} CPUs", flush=True)
    rows = []
    for world in (1, 2):
        plain = _run(args, "plain", world)
        lightning = _run(args, "lightning", world)
        rows.append((world, plain, lightning))
        print(f"{world} process(es): plain PyTorch {plain * 1e3:8.1f} ms/step   Lightning {lightning * 1e3:8.1f} "
              f"ms/step   Lightning overhead {100 * (lightning / plain - 1):+6.1f} %", flush=True)
    (w1, p1, l1), (w2, p2, l2) = rows
    print(f"2 vs 1 process (same per-process batch, so 2x the samples/step): plain {p2 / p1:.2f}x step time, "
          f"Lightning {l2 / l1:.2f}x step time -> throughput {2 * p1 / p2:.2f}x / {2 * l1 / l2:.2f}x")


if __name__ == "__main__":
    main()
