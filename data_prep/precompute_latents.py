"""Encode clip windows once with the frozen Wan encoders, so dynamic-stage training skips them.

    python -m data_prep.precompute_latents --shards data/re10k/train --out data/re10k_latents/train \\
        --backbone Wan-AI/Wan2.1-I2V-14B-480P-Diffusers --frames 49 --size 480 832 --windows-per-clip 4
    python -m data_prep.precompute_latents --shards data/synthetic/train --out /tmp/lat/train --tiny '{}' \\
        --frames 9 --size 64 64

Each clip gives ``--windows-per-clip`` windows drawn as in training (:class:`d4d.data.clip_datamodule.ClipWindow`:
random conditioning frame and stride, poses relative to it; ``--eval-windows`` takes the first frame
and ``--stride-min`` instead). Per window it stores (float16 unless said): ``latents (z, T, h, w)`` and
``condition (t_f + z, T, h, w)`` (Wan's normalised VAE latents and I2V first-frame condition), ``text
(n, D)`` (the prompt's UMT5 tokens only; padded to 512 with zeros on load), ``image`` (CLIP
penultimate states), float32 ``c2w (F, 4, 4)``, ``K (3, 3)``, ``depth (F, H, W)`` and ``has_depth``,
``caption``, ``motion``, ``key`` and, with ``--keep-frames``, uint8 ``frames (F, H, W, 3)``.
Files: ``latents-000000.pt ...`` (``--per-file`` windows each, written atomically) and
``manifest.json`` (backbone, frames, size, counts), which
:class:`d4d.data.clip_datamodule.PrecomputedClipDataModule` checks against the model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from d4d.utils.cli_args import OneLineParser, float_in, nonneg_int, positive_int
from d4d.utils.errors import UserError, exit_with_error
from d4d.utils.paths import check_output_dir
from d4d.utils.logging import get_logger

PROG = "data_prep.precompute_latents"
log = get_logger(PROG)


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0], error_prog=PROG)
    p.add_argument("--shards", required=True, help="clip shards (directory, glob, brace pattern or URL: "
                                                    "https://..., pipe:CMD, file://)")
    p.add_argument("--out", required=True, help="output directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--backbone", help="Wan 2.1 I2V diffusers directory or hub id")
    src.add_argument("--tiny", help="JSON of a tiny random backbone (as model.tiny in the debug recipe)")
    p.add_argument("--tiny-seed", type=nonneg_int, default=0)
    p.add_argument("--frames", type=positive_int, default=49)
    p.add_argument("--size", type=positive_int, nargs=2, default=[480, 832], metavar=("H", "W"))
    p.add_argument("--stride-min", type=positive_int, default=1)
    p.add_argument("--stride-max", type=positive_int, default=4)
    p.add_argument("--windows-per-clip", type=positive_int, default=1)
    p.add_argument("--reverse-prob", type=float_in(0.0, 1.0), default=0.0,
                   help="chance that a training window runs backwards (its motion label is reversed too)")
    p.add_argument("--eval-windows", action="store_true", help="first frame, stride-min, one window per clip")
    p.add_argument("--keep-frames", action="store_true")
    p.add_argument("--batch", type=positive_int, default=4)
    p.add_argument("--per-file", type=positive_int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=nonneg_int, default=0)
    return p


def _flush(out: Path, index: int, items: list[dict]) -> None:
    path = out / f"latents-{index:06d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save(items, tmp)
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    from d4d.data.clip_datamodule import ClipWindow
    from d4d.data.shards import build_clip_pipeline, expand_urls
    from d4d.models.dynamic import DynamicWan, backbone_spec, build_tiny_wan, load_wan

    try:
        tiny = json.loads(args.tiny) if args.tiny is not None else None
    except json.JSONDecodeError as exc:
        raise UserError(f"--tiny: not JSON ({exc})") from None
    urls = expand_urls(args.shards)
    parts = load_wan(args.backbone) if args.backbone else build_tiny_wan(tiny, args.tiny_seed)
    model = DynamicWan(parts, "none", "none").to(args.device).eval()
    model.check_frames(args.frames, *args.size)
    if not 0.0 <= args.reverse_prob <= 1.0:
        raise UserError(f"--reverse-prob must be in [0, 1], got {args.reverse_prob}")
    window = ClipWindow(args.frames, tuple(args.size), (args.stride_min, args.stride_max), args.reverse_prob, None,
                        train=not args.eval_windows, seed=args.seed)
    repeats = 1 if args.eval_windows else args.windows_per_clip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pending, items, files, count = [], [], 0, 0

    def encode(batch: list[dict]) -> None:
        nonlocal items, files, count
        frames = torch.stack([b["frames"] for b in batch]).to(args.device)
        latents = model.encode_video(frames)
        condition = model.image_condition(frames[:, 0], frames.shape[1])
        tok = model.tokenizer([b["caption"] for b in batch], padding="max_length", max_length=512,
                              truncation=True, return_tensors="pt")
        text = model.encode_text([b["caption"] for b in batch])
        image = model.encode_image(frames[:, 0])
        for i, b in enumerate(batch):
            n = int(tok.attention_mask[i].sum())
            item = {"latents": latents[i].half().cpu(), "condition": condition[i].half().cpu(),
                    "text": text[i, :n].half().cpu(), "image": image[i].half().cpu(), "c2w": b["c2w"], "K": b["K"],
                    "depth": b["depth"].half(), "has_depth": b["has_depth"], "caption": b["caption"],
                    "motion": b["motion"], "reversed": b["reversed"], "key": b["key"]}
            if args.keep_frames:
                item["frames"] = (b["frames"] * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
            items.append(item)
            count += 1
            if len(items) >= args.per_file:
                _flush(out, files, items)
                files, items = files + 1, []

    stream = build_clip_pipeline(urls, shuffle=0, resampled=False, split_by_node=False, split_by_worker=False)
    bar = tqdm(desc="windows", unit="win")
    with torch.no_grad():
        for clip in stream:
            for _ in range(repeats):
                sample = window(clip)
                if sample is not None:
                    pending.append(sample)
            while len(pending) >= args.batch:
                encode(pending[: args.batch])
                pending = pending[args.batch:]
                bar.update(args.batch)
        if pending:
            encode(pending)
            bar.update(len(pending))
        if items:
            _flush(out, files, items)
            files += 1
    bar.close()
    manifest = {**backbone_spec(args.backbone, tiny, args.tiny_seed), "num_frames": args.frames,
                "image_size": list(args.size), "windows": count, "windows_per_clip": repeats,
                "reverse_prob": 0.0 if args.eval_windows else args.reverse_prob, "files": files, "shards": args.shards,
                "eval_windows": args.eval_windows, "stride": [args.stride_min, args.stride_max]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    log.info("wrote %d windows in %d files to %s", count, files, out)
    return manifest


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        check_output_dir(args.out, "--out")
        if args.stride_min > args.stride_max:
            raise UserError(f"--stride-min {args.stride_min} is above --stride-max {args.stride_max}")
        run(args)
    except UserError as exc:
        exit_with_error(str(exc), PROG)


if __name__ == "__main__":
    main(sys.argv[1:])
