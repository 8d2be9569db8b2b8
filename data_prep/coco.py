"""COCO images + captions (+ instances) -> image shards with all captions and category names.

    python -m data_prep.coco --images COCO/val2017 --captions COCO/annotations/captions_val2017.json
        [--instances COCO/annotations/instances_val2017.json] --out data/coco/val [--size 256]
        [--shard-size 64] [--workers N] [--array-index I --array-count N]

Every image listed in the captions file (sorted by image id) becomes one sample ``coco_<id:012d>``:
``image.jpg`` resized so its short side is ``--size`` and centre-cropped to ``size x size``
(``--size 0`` keeps the original; see :func:`data_prep.images.load_image`) and meta
``dataset=coco``, ``image_id``, ``file``, ``original_size`` [H, W], ``captions`` (all, in annotation
id order), ``caption`` (the first), ``categories`` (sorted names from ``--instances``, if given),
``split`` (from ``captions_<split>.json``). Missing or unreadable images are rejected with the reason
in the manifest. A captions or instances file that is not COCO JSON, or files of two different
splits, stop the run with one line naming the file.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any, Sequence

from d4d.utils.errors import exit_with_error
from d4d.utils.names import path_inside

from d4d.utils.cli_args import nonneg_int
from data_prep.common import ItemResult, Parser, add_common_args, check_common, need_dir, run_prep
from data_prep.images import still_image_sample

PROG = "python -m data_prep.coco"


def _load_coco(path: Path, kind: str, needs: tuple[str, ...]) -> dict[str, Any]:
    if not path.is_file():
        exit_with_error(f"{path}: {kind} file does not exist", PROG)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        exit_with_error(f"{path}: {kind} file is not JSON", PROG)
    if not isinstance(data, dict) or any(not isinstance(data.get(k), list) for k in needs):
        exit_with_error(f"{path}: not a COCO {kind} file (needs lists {', '.join(needs)})", PROG)
    return data


def split_of(path: Path) -> str | None:
    """``captions_val2017.json`` -> ``val2017``."""
    m = re.fullmatch(r"(?:captions|instances)_(.+)\.json", path.name)
    return m.group(1) if m else None


def read_annotations(captions_file: Path, instances_file: Path | None) -> list[tuple[int, str, dict[str, Any]]]:
    """-> (image id, file name, meta extras) per image of the captions file, sorted by id."""
    caps = _load_coco(captions_file, "captions", ("images", "annotations"))
    split = split_of(captions_file)
    try:
        images = {int(im["id"]): str(im["file_name"]) for im in caps["images"]}
        by_image = defaultdict(list)
        for a in sorted(caps["annotations"], key=lambda a: int(a.get("id", 0))):
            by_image[int(a["image_id"])].append(str(a["caption"]).strip())
    except (KeyError, TypeError, ValueError) as exc:
        exit_with_error(f"{captions_file}: not a COCO captions file (entry without {exc})", PROG)
    names = defaultdict(set)
    if instances_file is not None:
        inst = _load_coco(instances_file, "instances", ("annotations", "categories"))
        if split_of(instances_file) != split:
            exit_with_error(f"{instances_file}: split {split_of(instances_file)!r} does not match "
                            f"{captions_file.name} ({split!r})", PROG)
        try:
            cats = {int(c["id"]): str(c["name"]) for c in inst["categories"]}
            for a in inst["annotations"]:
                names[int(a["image_id"])].add(cats[int(a["category_id"])])
        except (KeyError, TypeError, ValueError) as exc:
            exit_with_error(f"{instances_file}: not a COCO instances file (bad entry: {exc})", PROG)
    items = []
    for image_id in sorted(images):
        extra: dict[str, Any] = {"captions": by_image.get(image_id, []), "split": split}
        extra["caption"] = extra["captions"][0] if extra["captions"] else ""
        if instances_file is not None:
            extra["categories"] = sorted(names.get(image_id, ()))
        items.append((image_id, images[image_id], extra))
    return items


def process_coco_image(item: tuple[int, str, dict[str, Any]], root: str, size: int) -> ItemResult:
    image_id, name, extra = item
    meta = {"dataset": "coco", "image_id": image_id, "file": name, **extra}
    path = path_inside(root, name)  # file_name comes from the annotation file: never outside --images
    if path is None:
        return ItemResult(item_id=name, rejected="file_name leaves the image folder")
    result = still_image_sample(path, name, f"coco_{image_id:012d}", size, meta)
    result.labels = []  # COCO images carry no motion label
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the CLI; returns the manifest (or the array task's summary)."""
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, type=Path, help="COCO image folder, e.g. val2017/")
    p.add_argument("--captions", required=True, type=Path, help="captions_<split>.json")
    p.add_argument("--instances", type=Path, help="instances_<split>.json (category names)")
    p.add_argument("--size", type=nonneg_int, default=256, help="short side, then square centre crop (0 = keep)")
    add_common_args(p)
    args = p.parse_args(argv)
    check_common(args, PROG)
    if args.size < 0:
        exit_with_error(f"--size must be >= 0, got {args.size}", PROG)
    root = need_dir(args.images, "COCO images", PROG)
    items = read_annotations(args.captions, args.instances)
    if not items:
        exit_with_error(f"{args.captions}: lists no images", PROG)
    return run_prep("coco", items, partial(process_coco_image, root=str(root), size=args.size), args, PROG,
                    unit="image")


if __name__ == "__main__":
    main()
