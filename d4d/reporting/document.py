"""Assemble the Markdown and HTML report from the runs: Table 1, Table 2, curves, bar charts."""
from __future__ import annotations

import datetime
import html
from pathlib import Path

from d4d.evaluation.scoring import DIRECTIONS
from d4d.reporting.figures import bars_figure, curve_keys, curves_figure
from d4d.reporting.sources import RunData
from d4d.reporting.tables import choose_columns, direction, group_by_dataset, table1, table1_rows, table2

_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th:first-child{text-align:left}
tr.delta{background:#f6f8fa}img{max-width:100%}code{background:#f3f3f3;padding:1px 3px}"""


def sample_figures(runs: list[RunData], images: Path) -> list[tuple[str, Path]]:
    """``(run name, png)`` of each evaluation run with sample videos next to its aggregate.json."""
    from d4d.reporting.samples import samples_figure

    out = []
    for i, r in enumerate(runs):
        if r.kind != "evaluation":
            continue
        slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in r.name)
        png = samples_figure(Path(r.source).parent / "samples", images / f"samples_{i}_{slug}.png", r.name)
        if png is not None:
            out.append((r.name, png))
    return out


def evaluation_settings(runs: list[RunData]) -> list[tuple[str, str]]:
    """``(run name, one line)`` of how each evaluation run was made (shards, clips, frames, size,
    covisibility masks, sampling steps, the 4D generator's per-scene optimisation): numbers are only
    comparable between rows made the same way."""
    out = []
    for r in runs:
        c = r.config or {}
        if r.kind != "evaluation" or not c:
            continue
        parts = [f"shards `{c.get('shards')}`"]
        if r.complete is False:
            parts.append("**partial: the evaluation was interrupted or is still running**")
        for key, text in (("max_clips", "at most {} clips"), ("frames", "first {} frames"), ("size", "size {}"),
                          ("covisibility", "covisibility `{}`"), ("steps", "{} sampling steps"),
                          ("lpips", "LPIPS `{}`"), ("camera_trials", "{} COLMAP trials")):
            if c.get(key) not in (None, 0):
                parts.append(text.format(c[key]))
        fourd = c.get("fourd_settings")
        if isinstance(fourd, dict):
            opt = fourd.get("optimisation") or {}
            src = fourd.get("source") or {}
            origin = ", ".join(f"{k} from {v}" for k, v in src.items()) or "defaults"
            parts.append(f"+4d: {opt.get('pose_steps')} pose + {opt.get('steps')} joint steps ({origin}), "
                         f"{fourd.get('max_points')} points, depth model {'yes' if fourd.get('depth_model') else 'no'}")
        out.append((r.name, "; ".join(parts)))
    return out


def write_report(runs: list[RunData], out_dir: Path, title: str = "d4d run comparison",
                 metrics: list[str] | None = None, curves: list[str] | None = None,
                 lower: list[str] = (), higher: list[str] = ()) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``images/*.png`` to ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    overrides = {**{k: -1 for k in lower}, **{k: 1 for k in higher}}
    all_rows = table1_rows(runs)
    # evaluation rows (video metrics) and training rows (final val/test values) get separate tables
    eval_rows = [r for r in all_rows if any(k in DIRECTIONS for k in r.values)]
    train_rows = [r for r in all_rows if r not in eval_rows]
    rows = eval_rows or train_rows
    cols = choose_columns(rows, metrics)
    rows = [r for r in rows if any(c in r.values for c in cols)]
    dirs = {c: direction(c, runs, overrides) for c in cols}
    none = ("*(no metric in common)*", "<p>(no metric in common)</p>")
    groups = group_by_dataset(rows) if eval_rows else {"": rows}
    tables1 = [(dataset, table1(g, cols, dirs) if cols else none) for dataset, g in groups.items()]
    t2 = table2(runs, cols, dirs) if cols else None
    extra = None
    if eval_rows and train_rows:
        tcols = choose_columns(train_rows, None if metrics is None else metrics)
        train_rows = [r for r in train_rows if any(c in r.values for c in tcols)]
        tdirs = {c: direction(c, runs, overrides) for c in tcols}
        extra = table1(train_rows, tcols, tdirs) if tcols and train_rows else None
    images = out_dir / "images"
    keys = curve_keys(runs, curves)
    paths = {"curves": curves_figure(runs, keys, images / "curves.png"),
             "bars": bars_figure(rows, cols, dirs, images / "bars.png")}
    sources = [f"- **{r.name}** ({r.kind}): `{r.source}`" + (f", tags {', '.join(r.tags)}" if r.tags else "")
               + (f", group {r.group}" if r.group else "") for r in runs]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    md = [f"# {title}", "", f"Generated by `python -m d4d.report` on {stamp}. Arrows give each metric's "
          "direction (↑ higher is better); the best value of each column is in bold (among the rows "
          "evaluated on the same data; oracle rows excluded).", "", "## Table 1: metrics", ""]
    hb = [f"<h1>{html.escape(title)}</h1>", f"<p>Generated by <code>python -m d4d.report</code> on {stamp}. "
          "Arrows give each metric's direction (↑ higher is better); the best value of each column "
          "is in bold (among the rows evaluated on the same data; oracle rows excluded).</p>",
          "<h2>Table 1: metrics</h2>"]
    for dataset, (t_md, t_html) in tables1:
        if dataset:
            md += [f"Evaluated on `{dataset}`:", ""]
            hb += [f"<p>Evaluated on <code>{html.escape(dataset)}</code>:</p>"]
        md += [t_md, ""]
        hb += [t_html]
    if extra is not None:
        md += ["## Training runs (last logged values)", "", extra[0], ""]
        hb += ["<h2>Training runs (last logged values)</h2>", extra[1]]
    if t2 is not None:
        note = ("Each module alone and with the 4D generator (its video lifted to a 4D scene and rendered "
                "back from the requested cameras); Δ = with − alone, ✓ where it improves the metric.")
        md += ["## Table 2: with and without the 4D generator", "", note, "", t2[0], ""]
        hb += ["<h2>Table 2: with and without the 4D generator</h2>", f"<p>{note}</p>", t2[1]]
    if paths["bars"]:
        md += ["## Metrics by run", "", "![metrics by run](images/bars.png)", ""]
        hb += ["<h2>Metrics by run</h2>", "<img src='images/bars.png' alt='metrics by run'>"]
    samples = sample_figures(runs, images)
    if samples:
        md += ["## Samples", "", "Real frames on top, then each protocol's frames (the first sample clip every "
               "protocol has; videos in the evaluation's `samples/`).", ""]
        hb += ["<h2>Samples</h2>"]
        for name, png in samples:
            md += [f"![samples of {name}](images/{png.name})", ""]
            hb += [f"<img src='images/{html.escape(png.name)}' alt='samples of {html.escape(name)}'>"]
    if paths["curves"]:
        md += ["## Training curves", "", f"Keys: {', '.join(f'`{k}`' for k in keys)}.", "",
               "![training curves](images/curves.png)", ""]
        hb += ["<h2>Training curves</h2>", "<img src='images/curves.png' alt='training curves'>"]
    settings = evaluation_settings(runs)
    if settings:
        md += ["## Evaluation settings", "", *(f"- **{n}**: {t}" for n, t in settings), ""]
        hb += ["<h2>Evaluation settings</h2><ul>",
               *(f"<li><b>{html.escape(n)}</b>: {html.escape(t)}</li>" for n, t in settings), "</ul>"]
    md += ["## Sources", "", *sources, ""]
    hb += ["<h2>Sources</h2><ul>",
           *(f"<li><b>{html.escape(r.name)}</b> ({r.kind}): <code>{html.escape(r.source)}</code></li>"
             for r in runs), "</ul>"]
    (out_dir / "report.md").write_text("\n".join(md))
    head = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n")
    (out_dir / "report.html").write_text(head + "\n".join(hb) + "\n</body></html>\n")
    return {"markdown": out_dir / "report.md", "html": out_dir / "report.html",
            **{k: v for k, v in paths.items() if v is not None}}
