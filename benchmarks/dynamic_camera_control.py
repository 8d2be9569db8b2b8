"""Does the dynamic module learn camera control? A debug-size model on the synthetic shards.

    python -m benchmarks.dynamic_camera_control [--data data/synthetic] [--minutes 5] [--size 64]

1. Encode the windows once (``data_prep.precompute_latents``: tiny random Wan backbone; one random
   9-frame window per training clip, the first 9 frames of each validation clip).
2. Train :class:`d4d.modules.dynamic.DynamicVideoModule` (camera branch + epipolar attention with
   occlusion masks, camera/text/image dropout 0.1) for ``--minutes`` on those latents.
3. For every validation clip, sample a video from its first frame and its *true* camera path, once
   with the camera input and once with it dropped (the same weights: the base-model path).
4. Recognise the motion of each video with a small CNN motion recogniser trained on real training
   windows (frames 0, 2, 4, 6, 8 stacked), and report how often the recognised motion equals the
   requested one: real val clips (the recogniser's ceiling), camera on, camera off; plus the pixel MSE
   of the generated videos to the real clips.
Figures are printed and drawn to ``docs/dynamic_camera_control.png``. CPU, under shared load.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from d4d.data.clip_datamodule import ClipDataModule, PrecomputedClipDataModule
from d4d.geometry.motions import MOTIONS
from d4d.modules.dynamic import DynamicVideoModule
from d4d.utils.logging import get_logger

log = get_logger("benchmarks.dynamic_camera_control")


class Recogniser(torch.nn.Module):
    """Motion of a ``(F, 3, H, W)`` clip from frames 0, 2, 4, ... stacked on channels (plus differences)."""

    def __init__(self, frames: int):
        super().__init__()
        self.picks = list(range(0, frames, 2))
        c = 3 * (2 * len(self.picks) - 1)
        layers, width = [], 32
        for i in range(4):
            layers += [torch.nn.Conv2d(c if i == 0 else width, width, 3, 2, 1), torch.nn.GroupNorm(8, width), torch.nn.SiLU()]
        self.net = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(width, len(MOTIONS)))

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        x = clips[:, self.picks]
        diffs = x[:, 1:] - x[:, :1]
        return self.net(torch.cat([x, diffs], 1).flatten(1, 2) * 2 - 1)


def train_recogniser(clips: list[dict], frames: int, steps: int) -> Recogniser:
    model = Recogniser(frames)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    x = torch.stack([c["frames"] for c in clips])
    y = torch.tensor([MOTIONS.index(c["motion"]) for c in clips])
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def collect(loader, limit: int | None = None) -> list[dict]:
    out = []
    for batch in loader:
        for i in range(batch["frames"].shape[0]):
            out.append({k: (v[i] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()})
        if limit and len(out) >= limit:
            break
    return out[:limit] if limit else out


def precompute(data: str, split: str, out: Path, frames: int, size: int, tiny: dict, eval_windows: bool) -> Path:
    import json as _json
    import sys

    from data_prep import precompute_latents as pl

    target = out / split
    manifest = target / "manifest.json"
    if manifest.is_file() and _json.loads(manifest.read_text()).get("tiny") == tiny:
        return target
    argv = ["--shards", f"{data}/{split}", "--out", str(target), "--tiny", _json.dumps(tiny), "--frames", str(frames),
            "--size", str(size), str(size), "--stride-min", "1", "--stride-max", "1", "--batch", "8"]
    argv += ["--eval-windows", "--keep-frames"] if eval_windows else ["--windows-per-clip", "1"]
    pl.run(pl._parser().parse_args(argv))
    return target


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="data/synthetic")
    p.add_argument("--cache", default="runs/benchmarks/dynamic_camera_control", help="precomputed latents")
    p.add_argument("--minutes", type=float, default=5.0, help="training wall-clock budget")
    p.add_argument("--train-steps", type=int, default=2000, help="training step budget (whichever ends first)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="sampling steps")
    p.add_argument("--recogniser-steps", type=int, default=300)
    p.add_argument("--out", default="docs/dynamic_camera_control.png")
    args = p.parse_args()
    torch.manual_seed(0)
    tiny = {"dim": 64, "heads": 4, "layers": 3, "ffn_dim": 128}
    t0 = time.perf_counter()
    train_dir = precompute(args.data, "train", Path(args.cache), args.frames, args.size, tiny, False)
    val_dir = precompute(args.data, "val", Path(args.cache), args.frames, args.size, tiny, True)
    log.info("latents ready in %.0fs", time.perf_counter() - t0)
    dm = PrecomputedClipDataModule(str(train_dir), str(val_dir), batch_size=args.batch, num_workers=0,
                                   steps_per_epoch=1_000_000)
    dm.setup("fit")
    module = DynamicVideoModule(backbone=None, tiny=tiny, camera_hidden=64, text_drop=0.1, image_drop=0.1,
                                camera_drop=0.1, val_samples=0)
    params = module.model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    log.info("trainable parameters: %d", sum(p.numel() for p in params))
    start, step, losses = time.perf_counter(), 0, []
    module.train()
    for batch in dm.train_dataloader():
        loss = module.flow_loss(batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 25 == 0:
            log.info("step %d loss (mean of last 25) %.4f %.0fs", step, np.mean(losses[-25:]), time.perf_counter() - start)
        if time.perf_counter() - start > args.minutes * 60 or step >= args.train_steps:
            break
    train_s = time.perf_counter() - start
    module.eval()

    raw = ClipDataModule(f"{args.data}/train", f"{args.data}/val", num_frames=args.frames, image_size=(args.size, args.size),
                         stride_min=1, stride_max=1, batch_size=32, num_workers=0, shuffle=64, epoch_length=10_000)
    raw.setup("fit")
    recog = train_recogniser(collect(raw.train_dataloader(), 512), args.frames, args.recogniser_steps)
    val = [c for c in collect(dm.val_dataloader()) if c["motion"]]
    wanted = np.array([c["motion"] for c in val])
    results = {"real": [], "camera": [], "no_camera": []}
    mse = {"camera": [], "no_camera": []}
    examples = {}

    def recognise(videos: torch.Tensor) -> list[str]:
        with torch.no_grad():
            return [MOTIONS[i] for i in recog(videos.float()).argmax(-1).tolist()]

    for i in range(0, len(val), 16):
        chunk = val[i:i + 16]
        real = torch.stack([c["frames"] for c in chunk])
        c2w = torch.stack([c["c2w"] for c in chunk])
        K = torch.stack([c["K"] for c in chunk])
        prompts = [c["caption"] for c in chunk]
        results["real"] += recognise(real)
        for name, use in (("camera", True), ("no_camera", False)):
            video = module.sample(real[:, 0], c2w, K, prompts, num_steps=args.steps, text_cfg=1.0, camera_cfg=1.0,
                                  seed=0, use_camera=use)
            results[name] += recognise(video)
            mse[name] += ((video - real) ** 2).flatten(1).mean(1).tolist()
            if i == 0:
                examples[name] = video[:4]
        if i == 0:
            examples["real"] = real[:4]
            examples["motions"] = [c["motion"] for c in chunk[:4]]
    print(f"trained {step} steps in {train_s:.0f}s (batch {args.batch}, {args.frames} frames, {args.size}px, "
          f"{sum(p.numel() for p in params)} trainable parameters); "
          f"loss first 50 {np.mean(losses[:50]):.4f} -> last 50 {np.mean(losses[-50:]):.4f}")
    print(f"validation clips: {len(val)}; motion recognised == requested motion:")
    acc = {}
    for name in ("real", "camera", "no_camera"):
        acc[name] = float((np.array(results[name]) == wanted).mean())
        print(f"  {name:10s} {acc[name]:.3f}")
    for name in ("camera", "no_camera"):
        print(f"  pixel MSE to the real clip, {name:10s} {np.mean(mse[name]):.4f}")
    per_class = {m: (float((np.array(results['camera'])[wanted == m] == m).mean()),
                     float((np.array(results['no_camera'])[wanted == m] == m).mean())) for m in MOTIONS if (wanted == m).any()}
    for m, (a, b) in per_class.items():
        print(f"  {m:11s} n={int((wanted == m).sum()):2d} camera {a:.2f}  no camera {b:.2f}")
    _figure(examples, acc, per_class, Path(args.out))


def _figure(examples, acc, per_class, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(examples["motions"])
    fig, axes = plt.subplots(rows, 4, figsize=(9, 2.2 * rows + 2.5))
    for r in range(rows):
        for c, name in enumerate(("real", "camera", "no_camera")):
            v = examples[name][r]
            strip = torch.cat([v[0], v[v.shape[0] // 2], v[-1]], -1).permute(1, 2, 0).clamp(0, 1).numpy()
            axes[r, c].imshow(strip)
            axes[r, c].set_title(f"{name} ({examples['motions'][r]})" if r == 0 or c == 0 else name, fontsize=7)
            axes[r, c].axis("off")
        axes[r, 3].axis("off")
    ax = fig.add_axes([0.76, 0.1, 0.22, 0.8])
    names = list(per_class)
    y = np.arange(len(names))
    ax.barh(y - 0.2, [per_class[n][0] for n in names], 0.4, label=f"camera ({acc['camera']:.2f})")
    ax.barh(y + 0.2, [per_class[n][1] for n in names], 0.4, label=f"no camera ({acc['no_camera']:.2f})")
    ax.set_yticks(y, names, fontsize=7)
    ax.set_xlabel("recognised == requested", fontsize=7)
    ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(f"frames 0 / mid / last; real clips recognised {acc['real']:.2f}", fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
