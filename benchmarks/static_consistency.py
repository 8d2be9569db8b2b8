"""Does view attention make the static module's views consistent? Train the debug-size model on
synthetic static scenes for a fixed number of CPU steps, twice from the same seed and data:

* ``full``: 3D attention in the middle block (16x16 tokens per view) + 1D view-axis attention in every block;
* ``no_view_attn``: the same model with the view-axis attention removed (no 3D, no 1D attention:
  every view is generated on its own from its Plücker map and the CLIP token).

Then, on held-out static scenes, give view 0 and generate views 1..V-1 (Euler, CFG), and measure
the **reprojection error** of the generated views: each view warped into its neighbour with the
true depth and poses (:mod:`d4d.models.static.consistency`), mean |RGB| difference over
non-occluded pixels (lower = more consistent). The ground-truth frames give the floor measured in
the same run. Pixel space (``vae: null``): a random tiny VAE would make the images meaningless.

    python -m benchmarks.static_consistency [--data DIR] [--steps 250] [--save CKPT] [--figure docs/static_consistency.png]

Builds all-static synthetic shards (8 frames, 32x32; resized to ``--size``, 16 by default, to keep the
CPU time to minutes) in a temporary folder when ``--data`` is not given.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"full": {"attention_3d": ["mid_block.*"]}, "no_view_attn": {"attention_3d": [], "view_attention": False}}


def build_module(overrides: dict, size: int):
    from d4d.modules.static import StaticVideoModule

    recipe = yaml.safe_load((REPO / "recipes/debug/static.yaml").read_text())
    args = dict(recipe["model"]["init_args"])
    args.pop("optimizer")
    args["unet"] = {**args["unet"], "in_channels": 3, "out_channels": 3}
    args.update(vae=None, image_size=[size, size], **overrides)
    return StaticVideoModule(**args)


def loader(shards: str, batch_size: int, train: bool, size: int, epoch_length: int = 1 << 20):
    from d4d.data.clip_datamodule import ClipDataModule

    dm = ClipDataModule(shards, num_frames=8, image_size=(size, size), static_only=True, batch_size=batch_size,
                        epoch_length=epoch_length if train else None, num_workers=0, shuffle=64, seed=0)
    dm.setup("fit")
    return dm._loader("train", train)


def train(module, shards: str, steps: int, batch_size: int, lr: float, label: str, size: int) -> list[float]:
    from tqdm import tqdm

    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    module.train()
    losses, it = [], iter(loader(shards, batch_size, True, size))
    bar = tqdm(range(steps), desc=f"train {label}", file=sys.stdout, mininterval=10)
    for _ in bar:
        batch = next(it)
        given = module._given_mask(*batch["frames"].shape[:2])
        loss = module.diffusion_loss(batch, given)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
    return losses


def save_checkpoint(module, path: str) -> None:
    """A checkpoint :meth:`StaticVideoModule.from_checkpoint` reads (as Lightning would write it)."""
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 0}
    module.on_save_checkpoint(ckpt)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)


def evaluate(module, scenes: list[dict], steps: int, cfg: float) -> tuple[float, list[torch.Tensor]]:
    from d4d.models.static.consistency import reprojection_error

    module.eval()
    errs, outs = [], []
    for i, s in enumerate(scenes):
        given = torch.zeros(s["frames"].shape[0], dtype=torch.bool)
        given[0] = True
        out = module.sample_views(s["frames"], s["c2w"], s["Ks"], given, steps, cfg, min(1.2, cfg), seed=i)
        errs.append(reprojection_error(out, s["depth"], s["Ks"], s["c2w"]).item())
        outs.append(out)
    return sum(errs) / len(errs), outs


def figure(path: Path, scenes, outs: dict, errs: dict, floor: float, losses: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("ground truth", scenes[0]["frames"])] + [(k, v[0]) for k, v in outs.items()]
    v = scenes[0]["frames"].shape[0]
    fig = plt.figure(figsize=(1.3 * v + 4, 1.4 * len(rows) + 0.5))
    grid = fig.add_gridspec(len(rows), v + 3)
    for r, (name, frames) in enumerate(rows):
        for c in range(v):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(frames[c].permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            if r == 0:
                ax.set_title("given" if c == 0 else f"view {c}", fontsize=8)
    ax = fig.add_subplot(grid[: len(rows) // 2 + 1, v + 1:])
    names = ["ground truth"] + list(errs)
    ax.bar(names, [floor] + list(errs.values()), color=["grey", "tab:green", "tab:red", "tab:blue"][: len(names)])
    ax.set_title("reprojection error (lower = consistent)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax = fig.add_subplot(grid[len(rows) // 2 + 1:, v + 1:])
    for name, ls in losses.items():
        k = 10
        ax.plot([sum(ls[max(0, i - k):i + 1]) / len(ls[max(0, i - k):i + 1]) for i in range(len(ls))], label=name)
    ax.set_title("training loss", fontsize=8)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_variant(name: str, overrides: dict, args: dict, data: str, scenes: list[dict]):
    """Train one variant and evaluate it: (losses, error, generated views, untrained error, train seconds)."""
    torch.set_num_threads(1 if args["jobs"] > 1 else torch.get_num_threads())
    torch.manual_seed(0)
    module = build_module(overrides, args["size"])
    untrained = evaluate(module, scenes, args["sample_steps"], args["cfg"])[0] if args["untrained"] else float("nan")
    t0 = time.perf_counter()
    losses = train(module, str(Path(data) / "train"), args["steps"], args["batch_size"], args["lr"], name, args["size"])
    t_train = time.perf_counter() - t0
    err, outs = evaluate(module, scenes, args["sample_steps"], args["cfg"])
    if args["save"] and name == "full":
        save_checkpoint(module, args["save"])
    return losses, err, outs, untrained, t_train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="folder with train/ and val/ synthetic shards (static scenes)")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--size", type=int, default=16, help="image side the clips are resized to (pixel space)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-scenes", type=int, default=4)
    p.add_argument("--sample-steps", type=int, default=15)
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--figure", default="docs/static_consistency.png")
    p.add_argument("--jobs", type=int, default=2, help="variants trained in parallel processes")
    p.add_argument("--untrained", action="store_true", help="also evaluate each model before training")
    p.add_argument("--save", default=None, help="write the trained full model here (a from_checkpoint file)")
    args = p.parse_args()
    start = time.perf_counter()
    tmp = None
    data = args.data
    if data is None:
        tmp = tempfile.TemporaryDirectory()
        data = tmp.name
        subprocess.run([sys.executable, "-m", "data_prep.synthetic", "--out", data, "--clips", "256", "--val-clips",
                        "16", "--test-clips", "8", "--frames", "8", "--size", "32", "--seed", "0", "--shard-size",
                        "32", "--static-fraction", "1.0"], check=True, cwd=REPO)
    scenes = []
    for batch in loader(str(Path(data) / "val"), 1, False, args.size):
        scenes.append({k: batch[k][0] for k in ("frames", "c2w", "Ks", "depth")})
        if len(scenes) == args.eval_scenes:
            break
    from d4d.models.static.consistency import reprojection_error

    floor = sum(reprojection_error(s["frames"], s["depth"], s["Ks"], s["c2w"]).item() for s in scenes) / len(scenes)
    jobs = [(name, overrides, vars(args), data, scenes) for name, overrides in VARIANTS.items()]
    if args.jobs > 1:  # the variants are independent: train them side by side
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(args.jobs, len(jobs))) as pool:
            results = pool.starmap(run_variant, jobs)
    else:
        results = [run_variant(*job) for job in jobs]
    errs, outs, losses = {}, {}, {}
    for name, (ls, err, out, untrained, t_train) in zip(VARIANTS, results):
        errs[name], outs[name], losses[name] = err, out, ls
        print(f"{name:>14}: train {args.steps} steps in {t_train:.0f} s, final loss "
              f"{sum(ls[-10:]) / len(ls[-10:]):.4f}, reprojection error {err:.4f} (untrained: {untrained:.4f})",
              flush=True)
    print(f"{'ground truth':>14}: reprojection error {floor:.4f} (floor: rendering/occlusion residue)")
    print(f"full vs no_view_attn: {errs['full']:.4f} vs {errs['no_view_attn']:.4f} "
          f"({'better' if errs['full'] < errs['no_view_attn'] else 'NOT better'})")
    if args.figure:
        figure(REPO / args.figure, scenes, outs, errs, floor, losses)
        print(f"figure: {args.figure}")
    print(f"total {time.perf_counter() - start:.0f} s (2 shared CPU cores, timings under load)")


if __name__ == "__main__":
    main()
