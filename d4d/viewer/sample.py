"""``python -m d4d.viewer.sample OUT``: write a synthetic 4D output to try the viewer without training.

A procedural scene (:mod:`d4d.data.procedural`) rendered along one of the eight motions, exported
in the section-7 layout with its exact depth, the true cameras, and a stand-in confidence
``1 + 4 exp(-|grad depth| / (0.02 depth))`` (low at depth edges, where a network is least sure).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from d4d.geometry.motions import MOTIONS
from d4d.view_layout import write_frame


def edge_confidence(depth: np.ndarray) -> np.ndarray:
    """(H, W) z-depth -> confidence in [1, 5], 5 on smooth surfaces, near 1 across depth edges."""
    gy, gx = np.gradient(depth)
    rel = np.hypot(gx, gy) / np.maximum(0.02 * depth, 1e-6)
    return (1.0 + 4.0 * np.exp(-rel)).astype(np.float32)


def write_sample(out_dir: str | Path, motion: str = "orbit", num_frames: int = 8, size: int = 96,
                 seed: int = 0) -> Path:
    """Render and export ``num_frames`` square frames of ``size``; returns ``out_dir``."""
    from d4d.data.procedural import render_clip

    clip = render_clip(motion, np.random.default_rng(seed), num_frames, size)
    for i in range(num_frames):
        write_frame(out_dir, i, clip.depth[i], edge_confidence(clip.depth[i]), clip.frames[i], clip.c2w[i],
                    clip.K[i])
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    from d4d.utils.cli_args import OneLineParser, int_at_least, nonneg_int, positive_int
    from d4d.utils.errors import UserError, exit_with_error
    from d4d.utils.paths import check_output_dir

    prog = "d4d.viewer.sample"
    parser = OneLineParser(prog=f"python -m {prog}", description=__doc__.splitlines()[0], error_prog=prog)
    parser.add_argument("out", help="output folder")
    parser.add_argument("--motion", choices=MOTIONS, default="orbit")
    parser.add_argument("--frames", type=positive_int, default=8)
    parser.add_argument("--size", type=int_at_least(8), default=96, help="square frame size in pixels (>= 8)")
    parser.add_argument("--seed", type=nonneg_int, default=0)
    args = parser.parse_args(argv)
    try:
        check_output_dir(args.out, "OUT")
    except UserError as exc:
        exit_with_error(str(exc), prog)
    out = write_sample(args.out, args.motion, args.frames, args.size, args.seed)
    print(f"wrote {args.frames} frames to {out}; view with: python -m d4d.view {out}")


if __name__ == "__main__":
    main()
