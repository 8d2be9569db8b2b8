"""``python -m d4d.report --out DIR [--eval JSON] [--wandb-dir DIR] [--wandb-project E/P] [--baselines CSV]``

Compares runs as a Markdown and an HTML report (``DIR/report.md``, ``DIR/report.html``, pictures in
``DIR/images``): Table 1 (one row per run and protocol, best per column in bold, arrows for the
direction of each metric), Table 2 (each module alone, with the 4D generator, and the delta row)
when protocols ``X`` and ``X+4d`` are present, bar charts of the metrics and training curves.

Runs come from evaluation files (``aggregate.json`` of ``python -m d4d.evaluate``), local wandb run
files (an offline or synced run folder, or a ``d4d.fit`` run directory; no network), the wandb API
(``--wandb-project ENTITY/PROJECT`` with ``--run-id``, ``--tag`` or ``--group``) and published
numbers of other methods (``--baselines CSV``). ``--publish ENTITY/PROJECT`` also creates a W&B
report (online, with ``wandb-workspaces`` installed). Give a source a display name with
``PATH=NAME`` (e.g. ``--eval runs/eval/a=baseline``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from d4d.utils.cli_args import OneLineParser
from d4d.utils.errors import UserError, exit_with_error
from d4d.utils.paths import check_output_dir

PROG = "d4d.report"


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m d4d.report", description=__doc__.splitlines()[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter, error_prog=PROG)
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--title", default="d4d run comparison")
    p.add_argument("--eval", action="append", default=[], metavar="PATH[=NAME]",
                   help="aggregate.json of python -m d4d.evaluate (or its folder)")
    p.add_argument("--wandb-dir", action="append", default=[], metavar="PATH[=NAME]",
                   help="local wandb run: .wandb file, run folder, or a folder above them (d4d.fit run_dir)")
    p.add_argument("--wandb-project", default=None, metavar="ENTITY/PROJECT",
                   help="read runs from the wandb API")
    p.add_argument("--run-id", action="append", default=[], help="with --wandb-project: a run id")
    p.add_argument("--tag", action="append", default=[], help="with --wandb-project: runs with this tag")
    p.add_argument("--group", action="append", default=[], help="with --wandb-project: runs of this group")
    p.add_argument("--baselines", action="append", default=[],
                   help="CSV of external numbers: name[,protocol],metric...")
    p.add_argument("--metrics", default=None, help="comma list of Table 1 columns (names or globs)")
    p.add_argument("--curves", default=None,
                   help="comma list of history keys/globs to plot (default: losses, val/acc)")
    p.add_argument("--lower", action="append", default=[], help="a metric where lower is better (overrides)")
    p.add_argument("--higher", action="append", default=[],
                   help="a metric where higher is better (overrides)")
    p.add_argument("--publish", default=None, metavar="ENTITY/PROJECT",
                   help="also publish a W&B report (online)")
    return p


def _split(spec: str) -> tuple[str, str | None]:
    path, sep, name = spec.partition("=")
    return path, (name or None) if sep else None


def collect_runs(args):
    from d4d.reporting.sources import load_baselines, load_evaluation, load_wandb_api, load_wandb_offline

    runs = []
    for spec in args.eval:
        runs.append(load_evaluation(*_split(spec)))
    for spec in args.wandb_dir:
        runs += load_wandb_offline(*_split(spec))
    if args.wandb_project:
        runs += load_wandb_api(args.wandb_project, args.run_id, args.tag, args.group)
    elif args.run_id or args.tag or args.group:
        raise UserError("--run-id / --tag / --group select runs of --wandb-project ENTITY/PROJECT, "
                        "which is missing")
    for path in args.baselines:
        runs += load_baselines(path)
    if not runs:
        raise UserError("no runs to compare: give --eval, --wandb-dir, --wandb-project and/or --baselines")
    names = [r.name for r in runs]
    for r in runs:  # make labels unique (two runs may share a wandb name)
        if names.count(r.name) > 1:
            r.name = f"{r.name} ({Path(r.source).parent.name[-8:] if r.kind != 'baseline' else 'csv'})"
    return runs


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        check_output_dir(args.out, "--out")
        from d4d.reporting.document import write_report

        runs = collect_runs(args)
        split = (lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None)
        paths = write_report(runs, args.out, args.title, split(args.metrics), split(args.curves),
                             args.lower, args.higher)
        print(f"report: {paths['markdown']} and {paths['html']} ({len(runs)} runs)")
        if args.publish:
            from d4d.reporting.figures import curve_keys
            from d4d.reporting.publish import publish_wandb_report

            wandb_runs = [r.name for r in runs if r.kind == "wandb"]
            url = publish_wandb_report(args.publish, args.title, paths["markdown"], wandb_runs,
                                       curve_keys(runs, split(args.curves)))
            print(f"W&B report: {url}")
    except UserError as exc:
        exit_with_error(str(exc), PROG)


if __name__ == "__main__":
    main()
