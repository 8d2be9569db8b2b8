"""Combine the group records of a (Slurm array) preparation run into the output's manifest.

    python -m data_prep.merge OUT

Reads ``OUT/parts/group-*.json`` written by ``data_prep.realestate10k``, ``data_prep.coco`` or
``data_prep.images`` and writes ``OUT/manifest.json`` (and ``OUT/<sub>/manifest.json`` for extra
output folders such as ``motion_images``). Exits with status 2 and one line when a group is
missing (an array task has not finished: rerun it, then merge again). See :mod:`data_prep.common`.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from d4d.utils.errors import UserError, exit_with_error
from d4d.utils.paths import check_output_dir
from data_prep.common import Parser, merge

PROG = "python -m data_prep.merge"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p: argparse.ArgumentParser = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the --out folder of the array tasks")
    out = p.parse_args(argv).out
    try:
        check_output_dir(out, "OUT")  # manifest.json files are written into it
    except UserError as exc:
        exit_with_error(str(exc), PROG)
    return merge(out, PROG)


if __name__ == "__main__":
    main()
