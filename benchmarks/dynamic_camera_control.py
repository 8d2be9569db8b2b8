"""Does the dynamic module learn camera control? A debug-size model on the synthetic shards.

    python -m benchmarks.dynamic_camera_control [--data data/synthetic] [--base-minutes 4] [--minutes 4]

The product freezes a *pretrained* image-to-video base and trains only the camera branches. No
pretrained Wan fits this CPU, so the benchmark first makes a small base the same way one is made:

1. Encode windows once (``data_prep.precompute_latents``: tiny random Wan VAE and encoders; several
   random 9-frame windows per training clip, the first 9 frames of each validation clip).
2. Pre-train the base (``train_base=True``, no camera branches): image-to-video flow matching on
   those latents, camera never seen, for ``--base-minutes``.
3. Freeze that base, add the camera branch + epipolar attention (occlusion masks) and train only them
   (camera/text/image dropout 0.1) for ``--minutes``: what ``recipes/dynamic.yaml`` does at scale.
4. For every validation clip, sample from its first frame and its *true* camera path, once with the
   camera input and once with it dropped (same weights; equals the frozen base at step 0).
5. Recognise the motion of each sampled clip. The tiny VAE is random, so decoded pixels mean nothing;
   the recogniser is a small CNN trained on the *latents* of real training windows (the VAE's
   encoder is a fixed convolutional map, so camera motion shows in latent space as in pixels), and
   its accuracy on real validation latents is the ceiling. Reported: how often the recognised
   motion equals the requested one (real / camera on / camera off / the base alone), and the latent
   MSE of the samples to the real clips.
Figures are printed and drawn to ``docs/dynamic_camera_control.png``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from d4d.data.clip_datamodule import PrecomputedClipDataModule
from d4d.geometry.motions import MOTIONS
from d4d.modules.dynamic import DynamicVideoModule
from d4d.utils.logging import get_logger

log = get_logger("benchmarks.dynamic_camera_control")


class LatentRecogniser(torch.nn.Module):
    """Motion of a ``(B, z, T, h, w)`` latent clip: all latent frames and their differences to frame 0
    stacked on channels, then a small CNN. ``motion_only`` sees the differences alone (less of the
    scene's content, which in the synthetic data correlates with its natural motion)."""

    def __init__(self, z: int, frames: int, width: int = 64, motion_only: bool = False):
        super().__init__()
        self.motion_only = motion_only
        c = z * (frames - 1 if motion_only else 2 * frames - 1)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(c, width, 3, 1, 1), torch.nn.GroupNorm(8, width), torch.nn.SiLU(),
            torch.nn.Conv2d(width, width, 3, 2, 1), torch.nn.GroupNorm(8, width), torch.nn.SiLU(),
            torch.nn.Conv2d(width, width, 3, 2, 1), torch.nn.GroupNorm(8, width), torch.nn.SiLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Dropout(0.2), torch.nn.Linear(width, len(MOTIONS)))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = latents.float()
        diffs = x[:, :, 1:] - x[:, :, :1]
        return self.net((diffs if self.motion_only else torch.cat([x, diffs], 2)).flatten(1, 2))


def train_recogniser(x: torch.Tensor, y: torch.Tensor, steps: int, motion_only: bool = False) -> LatentRecogniser:
    model = LatentRecogniser(x.shape[1], x.shape[2], motion_only=motion_only)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        batch = x[idx] * (1 + 0.1 * torch.randn(len(idx), 1, 1, 1, 1, generator=g))  # mild gain jitter
        loss = torch.nn.functional.cross_entropy(model(batch), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def precompute(data: str, split: str, out: Path, frames: int, size: int, tiny: dict, windows: int,
               reverse_prob: float = 0.0) -> Path:
    from data_prep import precompute_latents as pl

    target = out / split
    manifest = target / "manifest.json"
    want = {"tiny": tiny, "num_frames": frames, "image_size": [size, size]}
    if manifest.is_file():
        have = json.loads(manifest.read_text())
        if all(have.get(k) == v for k, v in want.items()) and (
                split != "train" or (have.get("windows_per_clip"), have.get("reverse_prob")) == (windows, reverse_prob)):
            return target
    argv = ["--shards", f"{data}/{split}", "--out", str(target), "--tiny", json.dumps(tiny), "--frames", str(frames),
            "--size", str(size), str(size), "--stride-min", "1", "--stride-max", "1", "--batch", "8"]
    argv += ["--eval-windows"] if split != "train" else ["--windows-per-clip", str(windows), "--reverse-prob",
                                                           str(reverse_prob)]
    pl.run(pl._parser().parse_args(argv))
    return target


def all_batches(loader) -> dict:
    out: dict = {}
    for batch in loader:
        for k, v in batch.items():
            out.setdefault(k, []).append(v)
    return {k: (torch.cat(v) if isinstance(v[0], torch.Tensor) else sum(v, [])) for k, v in out.items()}


def train(module: DynamicVideoModule, loader, minutes: float, max_steps: int, lr: float, label: str) -> dict:
    params = module.model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    start, step, losses = time.perf_counter(), 0, []
    module.train()
    for batch in loader:
        loss = module.flow_loss(batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            log.info("%s step %d loss (mean of last 100) %.4f %.0fs", label, step, np.mean(losses[-100:]),
                     time.perf_counter() - start)
        if time.perf_counter() - start > minutes * 60 or step >= max_steps:
            break
    module.eval()
    return {"steps": step, "seconds": time.perf_counter() - start, "params": sum(p.numel() for p in params),
            "loss_first": float(np.mean(losses[:50])), "loss_last": float(np.mean(losses[-50:]))}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="data/synthetic")
    p.add_argument("--cache", default="runs/benchmarks/dynamic_camera_control", help="precomputed latents")
    p.add_argument("--base-minutes", type=float, default=4.0, help="base pre-training wall-clock budget")
    p.add_argument("--minutes", type=float, default=4.0, help="camera-branch training wall-clock budget")
    p.add_argument("--max-steps", type=int, default=100_000, help="step cap for each phase")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--windows", type=int, default=4, help="training windows per clip")
    p.add_argument("--reverse-prob", type=float, default=0.0,
                   help="training windows played backwards (relabelled): breaks the synthetic data's link "
                        "between a scene's look and its motion, so the camera input is needed")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="sampling steps")
    p.add_argument("--recogniser-steps", type=int, default=600)
    p.add_argument("--train-base", action="store_true",
                   help="phase 3 fine-tunes the base too (model.train_base) instead of freezing it")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--out", default="docs/dynamic_camera_control.png")
    p.add_argument("--variants", nargs="+", default=None, metavar="NAME=JSON",
                   help="compare camera-branch designs on one pre-trained base, each trained for the same "
                        "--max-steps: NAME=JSON of DynamicVideoModule arguments, e.g. "
                        "'plucker_only={\"epipolar_blocks\": \"none\"}'; prints accuracy against trainable "
                        "parameters and training FLOPs and draws --out")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tiny = {"dim": 64, "heads": 4, "layers": 3, "ffn_dim": 128}
    t0 = time.perf_counter()
    train_dir = precompute(args.data, "train", Path(args.cache), args.frames, args.size, tiny, args.windows, args.reverse_prob)
    val_dir = precompute(args.data, "val", Path(args.cache), args.frames, args.size, tiny, 1)
    log.info("latents ready in %.0fs", time.perf_counter() - t0)
    dm = PrecomputedClipDataModule(str(train_dir), str(val_dir), batch_size=args.batch, num_workers=0,
                                   steps_per_epoch=1_000_000)
    dm.setup("fit")
    common = dict(backbone=None, tiny=tiny, text_drop=0.1, image_drop=0.1, val_samples=0)

    # 1. the base: image-to-video without any camera input
    base = DynamicVideoModule(**common, camera_blocks="none", epipolar_blocks="none", camera_drop=1.0, train_base=True)
    base_fit = train(base, dm.train_dataloader(), args.base_minutes, args.max_steps, 1e-3, "base")
    if args.variants:
        return compare_variants(args, common, base, base_fit, dm, train_dir)
    # 2. camera branches on the frozen base
    module = DynamicVideoModule(**common, camera_hidden=64, camera_drop=0.1, train_base=args.train_base)
    module.model.load_base(base.model.transformer.state_dict())
    cam_fit = train(module, dm.train_dataloader(), args.minutes, args.max_steps, 1e-3, "camera")

    # 3. recogniser on real latents
    recog, recog_motion, xs = recognisers(train_dir, args.recogniser_steps)
    val, wanted = validation_clips(dm)

    def recognise(latents: torch.Tensor, model=recog) -> np.ndarray:
        return recognised(latents, model)

    def sample_all(model, use: bool, order: list[int]) -> torch.Tensor:
        return sample_paths(model, val, use, order, args.steps)

    # 4. sample from the stored conditions (first-frame latents, CLIP states, text) of each clip,
    #    with the clip's own path, and with the path of another clip whose motion differs
    n = len(wanted)
    own = list(range(n))
    other = [next(j % n for j in range(i + 1, i + n) if wanted[j % n] != wanted[i]) for i in own]
    samples = {"real": val["latents"].float()}
    swapped = {}
    for name, model, use in (("camera", module, True), ("no_camera", module, False), ("base", base, False)):
        samples[name] = sample_all(model, use, own)
        swapped[name] = sample_all(model, use, other)
    acc = {n: float((recognise(v) == wanted).mean()) for n, v in samples.items()}
    mse = {n: float(((v - samples["real"]) ** 2).mean()) for n, v in samples.items() if n != "real"}
    per_class = {m: {n: float((recognise(v)[wanted == m] == m).mean()) for n, v in samples.items()}
                 for m in MOTIONS if (wanted == m).any()}
    print(f"base pre-training: {base_fit['steps']} steps in {base_fit['seconds']:.0f}s, {base_fit['params']} trainable "
          f"parameters, loss {base_fit['loss_first']:.4f} -> {base_fit['loss_last']:.4f}")
    print(f"camera training (base {'fine-tuned' if args.train_base else 'frozen'}): {cam_fit['steps']} steps in {cam_fit['seconds']:.0f}s, {cam_fit['params']} "
          f"trainable parameters, loss {cam_fit['loss_first']:.4f} -> {cam_fit['loss_last']:.4f}")
    print(f"recogniser: {len(xs)} real training windows; {len(wanted)} validation clips, {args.steps} sampling steps")
    print("motion recognised == requested motion (chance 0.125):")
    for name, a in acc.items():
        extra = f"   latent MSE to the real clip {mse[name]:.4f}" if name in mse else "   (real latents: the ceiling)"
        print(f"  {name:10s} {a:.3f}{extra}")
    for m, row in per_class.items():
        print(f"  {m:11s} n={int((wanted == m).sum()):2d} " + "  ".join(f"{n} {v:.2f}" for n, v in row.items()))
    requested = wanted[other]
    ceiling = float((recognise(samples["real"], recog_motion) == wanted).mean())
    print(f"requested path swapped for another clip's (a different motion than the scene's own); recogniser on "
          f"latent differences only (real clips: {ceiling:.3f}):")
    follow = {}
    for name, v in swapped.items():
        got = recognise(v, recog_motion)
        follow[name] = (float((got == requested).mean()), float((got == wanted).mean()))
        print(f"  {name:10s} recognised == requested {follow[name][0]:.3f}   == the scene's own motion {follow[name][1]:.3f}")
    confusion = {name: _confusion(recognise(samples[name]), wanted) for name in ("camera", "no_camera")}
    _figure(acc, per_class, follow, confusion, Path(args.out), args.train_base)


def recognisers(train_dir: Path, steps: int):
    """Two motion recognisers trained on the real training windows' latents: on the frames and their
    differences, and on the differences only; and the training latents."""
    real_train = all_batches(_one_pass(train_dir))
    keep = [i for i, m in enumerate(real_train["motion"]) if m]
    xs = real_train["latents"][keep]
    ys = torch.tensor([MOTIONS.index(real_train["motion"][i]) for i in keep])
    return train_recogniser(xs, ys, steps), train_recogniser(xs, ys, steps, motion_only=True), xs


def validation_clips(dm) -> tuple[dict, np.ndarray]:
    """The validation windows that carry a motion label, and those labels."""
    val = all_batches(dm.val_dataloader())
    keep = [i for i, m in enumerate(val["motion"]) if m]
    val = {k: (v[keep] if isinstance(v, torch.Tensor) else [v[i] for i in keep]) for k, v in val.items()}
    return val, np.array(val["motion"])


def recognised(latents: torch.Tensor, model) -> np.ndarray:
    with torch.no_grad():
        return np.array([MOTIONS[i] for i in model(latents).argmax(-1).tolist()])


def sample_paths(model: DynamicVideoModule, val: dict, use: bool, order: list[int], steps: int) -> torch.Tensor:
    """Sample every validation clip from its own stored conditions with the camera path of clip
    ``order[i]``, camera on (``use``) or dropped, 16 clips at a time."""
    out = []
    for i in range(0, len(order), 16):
        idx = order[i:i + 16]
        camera, mask = model.model.camera_inputs(val["c2w"][idx], val["K"][idx], tuple(val["depth"].shape[-2:]))
        sl = slice(i, i + len(idx))
        out.append(model.denoise(val["condition"][sl], val["text"][sl], val["image"][sl], camera, mask,
                                 num_steps=steps, text_cfg=1.0, camera_cfg=1.0, seed=i, use_camera=use))
    return torch.cat(out)


def _parse_variants(specs: list[str]) -> dict[str, dict]:
    out = {}
    for spec in specs:
        name, sep, text = spec.partition("=")
        try:
            kwargs = json.loads(text) if sep else None
        except json.JSONDecodeError as exc:
            raise SystemExit(f"--variants: {spec!r}: not JSON ({exc.msg})") from None
        if not name or not isinstance(kwargs, dict):
            raise SystemExit(f"--variants: {spec!r}: expected NAME=JSON object")
        out[name] = kwargs
    return out


def count_flops(module: DynamicVideoModule, batch: dict, backward: bool) -> float:
    """Model FLOPs per sample of one training step (forward + backward, no dropout) or of the
    forward alone, counted by ``torch.utils.flop_counter`` on a real batch of one."""
    from torch.utils.flop_counter import FlopCounterMode

    one = {k: v[:1] for k, v in batch.items()}
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(backward):
        loss = module.flow_loss(one, dropout=False)
        if backward:
            loss.backward()
    module.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def compare_variants(args, common: dict, base: DynamicVideoModule, base_fit: dict, dm, train_dir: Path) -> None:
    """One base, several camera-branch designs trained for the same number of steps, each scored on
    the validation clips' own paths (camera on / dropped) and on swapped paths."""
    variants = _parse_variants(args.variants)
    recog, recog_motion, _ = recognisers(train_dir, args.recogniser_steps)
    val, wanted = validation_clips(dm)
    n = len(wanted)
    other = [next(j % n for j in range(i + 1, i + n) if wanted[j % n] != wanted[i]) for i in range(n)]
    probe = next(iter(dm.train_dataloader()))

    def sample_all(model, use: bool, order: list[int]) -> torch.Tensor:
        return sample_paths(model, val, use, order, args.steps)

    rows = {}
    base_forward = count_flops(base, probe, backward=False)
    for name, kwargs in variants.items():
        module = DynamicVideoModule(**{**common, "camera_hidden": 64, "camera_drop": 0.1, **kwargs})
        module.model.load_base(base.model.transformer.state_dict())
        fit = train(module, dm.train_dataloader(), args.minutes, args.max_steps, 1e-3, name)
        flops = count_flops(module, probe, backward=True)
        forward = count_flops(module, probe, backward=False)
        on, off = sample_all(module, True, list(range(n))), sample_all(module, False, list(range(n)))
        swapped = recognised(sample_all(module, True, other), recog_motion)
        rows[name] = {"params": fit["params"], "flops": flops, "extra_flops": forward / base_forward - 1, "steps": fit["steps"],
                      "seconds": fit["seconds"], "loss": fit["loss_last"],
                      "on": float((recognised(on, recog) == wanted).mean()),
                      "off": float((recognised(off, recog) == wanted).mean()),
                      "follow": float((swapped == wanted[other]).mean()),
                      "mse": float(((on - val["latents"].float()) ** 2).mean())}
    ceiling = float((recognised(val["latents"].float(), recog) == wanted).mean())
    print(f"base: {base_fit['steps']} steps, forward FLOPs per sample {base_forward / 1e9:.3f} GFLOP; {n} validation "
          f"clips, {args.steps} sampling steps, real-latent ceiling {ceiling:.3f}, chance 0.125")
    print(f"{'variant':22s} {'trainable':>10s} {'train GFLOP':>11s} {'fwd + base':>10s} {'steps':>6s} {'loss':>7s} "
          f"{'camera on':>9s} {'dropped':>8s} {'other path followed':>19s} {'MSE':>7s}")
    for name, r in rows.items():
        print(f"{name:22s} {r['params']:10d} {r['flops'] / 1e9:11.3f} {100 * r['extra_flops']:9.1f}% {r['steps']:6d} "
              f"{r['loss']:7.4f} {r['on']:9.3f} {r['off']:8.3f} {r['follow']:19.3f} {r['mse']:7.4f}")
    print(json.dumps(rows))
    _tradeoff_figure(rows, ceiling, Path(args.out))


def _tradeoff_figure(rows: dict, ceiling: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "params", "trainable parameters"), (axes[1], "extra_flops", "forward FLOPs added to the base")):
        for name, r in rows.items():
            x = r[key] * (100 if key == "extra_flops" else 1)
            ax.scatter([x], [r["on"]], s=40)
            ax.scatter([x], [r["follow"]], s=40, marker="x", color="k")
            ax.annotate(name, (x, r["on"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.axhline(ceiling, color="g", lw=0.6, ls="--", label=f"real clips ({ceiling:.2f})")
        ax.axhline(0.125, color="k", lw=0.5, ls=":", label="chance")
        ax.set_xlabel(label + (" (%)" if key == "extra_flops" else ""), fontsize=8)
        ax.set_ylabel("recognised == requested (dots: own path; x: another path)", fontsize=7)
        ax.legend(fontsize=7)
    fig.suptitle("Camera-branch designs on one frozen debug base, same steps", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


def _one_pass(folder: Path):
    """One pass over precomputed windows in file order (no resampling, no shuffling)."""
    dm = PrecomputedClipDataModule(str(folder), str(folder), batch_size=64, num_workers=0, shuffle=False)
    dm.setup("validate")
    return dm.val_dataloader()


def _confusion(got: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    m = np.zeros((len(MOTIONS), len(MOTIONS)))
    for g, w in zip(got, wanted):
        m[MOTIONS.index(w), MOTIONS.index(g)] += 1
    return m


def _figure(acc, per_class, follow, confusion, out: Path, train_base: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["real", "camera", "no_camera", "base"]
    fig = plt.figure(figsize=(12, 7.5))
    ax = fig.add_axes([0.06, 0.56, 0.6, 0.3])
    classes = list(per_class)
    x = np.arange(len(classes))
    for k, name in enumerate(names):
        ax.bar(x + (k - 1.5) * 0.2, [per_class[m][name] for m in classes], 0.2, label=f"{name} ({acc[name]:.2f})")
    ax.set_xticks(x, classes, fontsize=7)
    ax.set_ylabel("recognised == requested", fontsize=8)
    ax.axhline(1 / len(MOTIONS), color="k", lw=0.5, ls="--")
    ax.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    ax.set_title("each clip's own path", fontsize=9, pad=24)
    ax = fig.add_axes([0.74, 0.56, 0.22, 0.3])
    labels = list(follow)
    x = np.arange(len(labels))
    ax.bar(x - 0.2, [follow[n][0] for n in labels], 0.4, label="requested motion")
    ax.bar(x + 0.2, [follow[n][1] for n in labels], 0.4, label="scene's own motion")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("fraction of clips", fontsize=8)
    ax.legend(fontsize=7)
    ax.set_title("path of another motion requested", fontsize=9)
    for k, (name, m) in enumerate(confusion.items()):
        ax = fig.add_axes([0.08 + 0.45 * k, 0.05, 0.36, 0.42])
        ax.imshow(m, cmap="Blues")
        ax.set_xticks(range(len(MOTIONS)), MOTIONS, rotation=45, fontsize=6)
        ax.set_yticks(range(len(MOTIONS)), MOTIONS, fontsize=6)
        ax.set_xlabel("recognised", fontsize=7)
        ax.set_ylabel("requested", fontsize=7)
        ax.set_title(f"{name}: own path (accuracy {acc[name]:.2f})", fontsize=8)
        for i in range(len(MOTIONS)):
            for j in range(len(MOTIONS)):
                if m[i, j]:
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=6)
    how = "pre-trained base fine-tuned with" if train_base else "frozen pre-trained base +"
    fig.suptitle(f"Debug-size dynamic module on synthetic shards: {how} trained camera branches", fontsize=10, y=0.995)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
