"""A stand-in for the pretrained Depth Anything V2 weights, which cannot be downloaded here.

Builds a small ``DepthAnythingForDepthEstimation`` (transformers; DINOv2 backbone, patch 14,
:func:`d4d.fourd.init.tiny_depth_anything_config`), trains it for a fixed number of steps as a
monocular *relative* depth estimator on single frames of the synthetic **training** shards, and
``save_pretrained``s it to a directory that :class:`d4d.fourd.init.DepthEstimator` (``init_depth``,
``--depth-model``) loads like the real weights.

Target and loss: Depth Anything's relative models output an affine-invariant disparity; our
:class:`~d4d.fourd.init.DepthEstimator` reads it as ``depth = 1 / disparity`` (shift ignored), so the
network is trained on the scale-invariant log loss (Eigen et al., lambda = 1) between
``1 / disparity`` and the ground-truth z-depth over pixels with depth (the sky has none), plus a
small term holding the mean log disparity near 0 (without it the output scale drifts to 0 and the
head's final ReLU stops all gradients). Frames go
through :meth:`DepthEstimator.preprocess` exactly as at inference (``input_size`` short side).

    python -m benchmarks.fourd_depth_prior --out runs/bench/depth_prior [--steps 250] [--size 32]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from d4d.fourd.init import DepthEstimator, tiny_depth_anything_config

LABEL = "Depth Anything architecture, trained here on synthetic frames for {steps} steps, standing in for the pretrained weights"


def silog(disparity: torch.Tensor, depth: torch.Tensor, anchor: float = 0.0) -> torch.Tensor:
    """Scale-invariant log loss between ``1 / disparity`` and ``depth`` (both ``(N, H, W)``) over
    ``depth > 0``: per image ``mean(e^2) - mean(e)^2`` with ``e = log(1/disparity) - log(depth)``;
    plus ``anchor * mean(log disparity)^2``, which keeps the (free) scale of the output near 1 so that
    the head's final ReLU does not collapse it to 0."""
    valid = depth > 0
    n = valid.flatten(1).sum(1).clamp_min(1)
    log_disp = torch.log(disparity.clamp_min(1e-4))
    e = (-log_disp - torch.log(depth.clamp_min(1e-6))) * valid
    mean = e.flatten(1).sum(1) / n
    loss = ((e.pow(2).flatten(1).sum(1) / n) - mean.pow(2)).mean()
    if anchor > 0:
        loss = loss + anchor * ((log_disp * valid).flatten(1).sum(1) / n).pow(2).mean()
    return loss


def load_frames(data: str, size: int, max_clips: int | None = None, frames_per_clip: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ``16 / frames_per_clip``-th frame of the ``{data}/train`` clips, resized to ``size x size``
    (area for RGB, nearest for depth): ``frames (N, 3, size, size)``, ``depth (N, size, size)``."""
    import torch.nn.functional as F

    from d4d.data.shards import build_clip_pipeline

    rgb, depth = [], []
    for k, clip in enumerate(build_clip_pipeline(f"{data}/train")):
        if max_clips is not None and k >= max_clips:
            break
        if clip.depth is None:
            continue
        idx = torch.linspace(0, clip.num_frames - 1, frames_per_clip).round().long()
        rgb.append(F.interpolate(clip.frames_float()[idx].float(), size=(size, size), mode="area"))
        depth.append(F.interpolate(clip.depth[idx][:, None].float(), size=(size, size), mode="nearest")[:, 0])
    return torch.cat(rgb), torch.cat(depth)


def train_depth_prior(data: str, out: Path, steps: int = 250, size: int = 32, input_size: int = 56,
                      hidden: int = 48, layers: int = 4, batch_size: int = 16, lr: float = 3e-4,
                      seed: int = 0, log_every: int = 25) -> Path:
    """Train the stand-in (module docstring) on frames of ``{data}/train`` resized to ``size x size``
    (random horizontal flips) and save it to ``out`` (``save_pretrained``); returns ``out``."""
    torch.manual_seed(seed)
    model = DepthEstimator(None, {"hidden": hidden, "layers": layers}, input_size=input_size)
    net = model.net.train().requires_grad_(True)
    with torch.no_grad():  # start the disparity positive: the head ends in a ReLU (a 0 start gets no gradient)
        net.head.conv3.bias.fill_(1.0)
    t0 = time.time()
    frames, depth = load_frames(data, size)
    print(f"depth prior: {len(frames)} training frames from {data}/train ({time.time() - t0:.0f} s)", flush=True)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    running = []
    for step in range(1, steps + 1):
        pick = torch.randint(0, len(frames), (batch_size,), generator=gen)
        x, d = frames[pick], depth[pick]
        if torch.rand((), generator=gen) < 0.5:
            x, d = x.flip(-1), d.flip(-1)
        pred = net(pixel_values=model.preprocess(x)).predicted_depth[:, None]
        pred = torch.nn.functional.interpolate(pred, size=d.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        loss = silog(pred, d, anchor=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running.append(loss.item())
        if step % log_every == 0 or step == steps:
            print(f"depth prior: step {step}/{steps} silog {sum(running) / len(running):.4f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
            running = []
    net.eval()
    out.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(out)
    (out / "README.txt").write_text(LABEL.format(steps=steps) + f"\n(data {data}/train, {size}x{size} frames, "
                                    f"input {input_size}, hidden {hidden}, {layers} layers, batch {batch_size}, seed {seed})\n")
    print(f"depth prior: {LABEL.format(steps=steps)}; {time.time() - t0:.0f} s -> {out}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/synthetic")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--size", type=int, default=32)
    args = p.parse_args()
    train_depth_prior(args.data, args.out, args.steps, args.size)


if __name__ == "__main__":
    main()
