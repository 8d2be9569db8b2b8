"""``python -m d4d.select IMAGE --checkpoint CKPT``: choose the camera motion for an image.

Prints the chosen motion and the probability of each of the eight motions (``--json`` for a
machine-readable line). The checkpoint is one written by the classifier stage
(``python -m d4d.fit recipes/classifier.yaml``).
"""
from __future__ import annotations

import json
from pathlib import Path

from d4d.utils.cli_args import OneLineParser
from d4d.utils.errors import UserError, exit_with_error


def read_image(path: str | Path):
    """An image file -> uint8 ``(H, W, 3)`` RGB tensor; UserError naming the file if unreadable."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy())
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"cannot read image {path}: {exc.__class__.__name__}") from None


def motion_probabilities(image, checkpoint: str | Path) -> dict[str, float]:
    """uint8 ``(H, W, 3)`` image + classifier checkpoint -> {motion: probability}, MOTIONS order."""
    import torch

    from d4d.data.episodes import to_model_input
    from d4d.modules.classifier import load_classifier

    model, meta = load_classifier(checkpoint)
    x = to_model_input(image, meta["image_size"], meta["mean"], meta["std"])[None]
    with torch.inference_mode():
        probs = model(x).softmax(-1)[0]
    return {label: float(p) for label, p in zip(meta["labels"], probs)}


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="python -m d4d.select", description=__doc__.splitlines()[0], error_prog="d4d.select")
    parser.add_argument("image", help="input image (any format PIL reads)")
    parser.add_argument("--checkpoint", required=True, help="classifier checkpoint (.ckpt)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    try:
        probs = motion_probabilities(read_image(args.image), args.checkpoint)
    except UserError as exc:
        exit_with_error(str(exc), "d4d.select")
    best = max(probs, key=probs.get)
    if args.json:
        print(json.dumps({"image": args.image, "motion": best, "probabilities": probs}))
        return
    print(f"motion: {best}")
    for label, p in sorted(probs.items(), key=lambda kv: -kv[1]):
        print(f"  {label:<11s} {p:6.3f} {'#' * round(40 * p)}")


if __name__ == "__main__":
    main()
