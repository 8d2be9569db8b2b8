"""A folder of (synthetic / AIGC) images -> image shards, with optional prompts and motion labels.

    python -m data_prep.images --images DIR [--prompts prompts.jsonl] --out OUT [--size 256]
        [--shard-size 64] [--workers N] [--array-index I --array-count N]

Two layouts, detected from ``DIR``:

* flat: image files (``.jpg .jpeg .png .webp``) directly in ``DIR``; ``--prompts`` is a JSON-lines
  file of ``{"file": name relative to DIR, "prompt": str, "motion": optional label}``; a prompt
  line naming a missing file is rejected (in the manifest), an image without a line has no prompt.
* folder per class (``DIR`` = ``<split>/`` with ``<split>/<motion>/*.jpg``, as the official
  classifier code stores its data): used when ``DIR`` holds sub-folders and no images; every
  sub-folder name must name a motion (:data:`d4d.geometry.MOTIONS`, or an alias that
  :func:`d4d.geometry.resolve_motion` maps to one with sign +1), else the run stops naming it.

Each image becomes ``image.jpg`` resized so its short side is ``--size`` and centre-cropped to
``size x size`` (``--size 0`` keeps it as is), key ``img_<index:07d>`` in sorted path order, with
meta ``dataset=images``, ``file``, ``original_size`` [H, W], ``caption`` (the prompt), ``motion``.
Unreadable images are rejected with the reason in the manifest.
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from d4d.data.writer import encode_sample
from d4d.geometry import MOTIONS, resolve_motion
from d4d.utils.errors import exit_with_error

from d4d.utils.cli_args import nonneg_int
from data_prep.common import ItemResult, Parser, add_common_args, check_common, need_dir, run_prep

PROG = "python -m data_prep.images"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def load_image(path: Path, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Read an RGB image; resize (bicubic) so the short side is ``size``, centre-crop ``size x size``.

    Returns (uint8 ``(H, W, 3)``, original ``(H, W)``). ``size == 0`` keeps the image.
    Raises OSError / ValueError (from PIL) for unreadable files.
    """
    with Image.open(path) as im:
        im.load()
        rgb = im.convert("RGB")
    w, h = rgb.size
    if size:
        scale = size / min(w, h)
        rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
        rgb = rgb.resize((rw, rh), Image.BICUBIC)
        left, top = (rw - size) // 2, (rh - size) // 2
        rgb = rgb.crop((left, top, left + size, top + size))
    return np.asarray(rgb), (h, w)


def motion_label(name: str) -> str:
    """A folder or prompt label -> a label of MOTIONS; ValueError (one line) otherwise."""
    if name in MOTIONS:
        return name
    label, sign = resolve_motion(name)
    if sign < 0:
        raise ValueError(f"motion {name!r} is the reverse of {label!r}, not one of {', '.join(MOTIONS)}")
    return label


def still_image_sample(path: Path, item_id: str, key: str, size: int, meta: dict[str, Any]) -> ItemResult:
    """One image file -> an ItemResult holding one ``image.jpg`` sample (``meta`` gains the file's
    ``original_size`` [H, W]), or a rejection with its reason (missing or unreadable file)."""
    res = ItemResult(item_id=item_id)
    if not path.is_file():
        res.rejected = "missing file"
        return res
    try:
        image, (h, w) = load_image(path, size)
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError... for broken files
        res.rejected = f"unreadable image: {exc}"
        return res
    meta = {**meta, "original_size": [h, w]}
    res.samples = {"": [encode_sample(key, image[None], meta, frame_format="jpg")]}
    res.labels = [meta.get("motion")]
    return res


def process_image(item: tuple[int, str, dict[str, Any]], root: str, size: int) -> ItemResult:
    index, rel, extra = item
    meta = {"dataset": "images", "file": rel, **extra}
    return still_image_sample(Path(root) / rel, rel, f"img_{index:07d}", size, meta)


def read_prompts(path: Path) -> dict[str, dict[str, Any]]:
    """prompts.jsonl -> file -> {"caption", "motion"?}; exits naming path:line on a bad line."""
    if not path.is_file():
        exit_with_error(f"{path}: prompts file does not exist", PROG)
    prompts = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("file"), str):
                raise ValueError('each line must be an object with a "file" string')
            entry: dict[str, Any] = {"caption": str(row.get("prompt", ""))}
            if row.get("motion") is not None:
                entry["motion"] = motion_label(str(row["motion"]))
        except ValueError as exc:  # JSONDecodeError is a ValueError
            exit_with_error(f"{path}:{n}: {exc}", PROG)
        prompts[row["file"]] = entry
    return prompts


def list_items(root: Path, prompts_file: Path | None) -> list[tuple[int, str, dict[str, Any]]]:
    """(index, path relative to root, meta extras) for every input, in sorted order."""
    images = sorted(f.name for f in root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    folders = sorted(f for f in root.iterdir() if f.is_dir() and not f.name.startswith("."))
    if not images and folders and prompts_file is None:  # folder-per-class layout
        rows = []
        for folder in folders:
            try:
                label = motion_label(folder.name)
            except ValueError as exc:
                exit_with_error(f"{folder}: class folder does not name a motion ({exc})", PROG)
            for f in sorted(folder.iterdir()):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    rows.append((f"{folder.name}/{f.name}", {"motion": label, "split": root.name}))
    else:
        prompts = read_prompts(prompts_file) if prompts_file else {}
        names = sorted(set(images) | set(prompts))
        rows = [(name, prompts.get(name, {})) for name in names]
    if not rows:
        exit_with_error(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) and no class folders with images", PROG)
    return [(i, rel, extra) for i, (rel, extra) in enumerate(rows)]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the CLI; returns the manifest (or the array task's summary)."""
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, type=Path, help="image folder, or <split>/ of <motion>/ folders")
    p.add_argument("--prompts", type=Path, help='JSON lines {"file", "prompt", "motion"?}')
    p.add_argument("--size", type=nonneg_int, default=256, help="short side, then square centre crop (0 = keep)")
    add_common_args(p)
    args = p.parse_args(argv)
    check_common(args, PROG)
    if args.size < 0:
        exit_with_error(f"--size must be >= 0, got {args.size}", PROG)
    root = need_dir(args.images, "images", PROG)
    items = list_items(root, args.prompts)
    return run_prep("images", items, partial(process_image, root=str(root), size=args.size), args, PROG,
                    unit="image")


if __name__ == "__main__":
    main()
