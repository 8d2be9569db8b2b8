"""Report pictures (matplotlib, Agg): training curves of the compared runs and one bar chart per
Table 1 metric."""
from __future__ import annotations

import fnmatch
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from d4d.reporting.sources import RunData  # noqa: E402
from d4d.reporting.tables import Row, fmt, label  # noqa: E402

DEFAULT_CURVES = ("*loss", "val/acc", "val/*loss*", "train/*acc*")
STEP_KEYS = ("trainer/global_step", "_step")


def curve_keys(runs: list[RunData], patterns: list[str] | None = None, limit: int = 6) -> list[str]:
    """History keys (numeric in at least two rows of some run) matching ``patterns``, in pattern order."""
    counts: dict[str, int] = {}
    for run in runs:
        for row in run.history:
            for k, v in row.items():
                numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
                if numeric and not k.startswith("_") and k not in STEP_KEYS:
                    counts[k] = counts.get(k, 0) + 1
    keys = [k for k, n in counts.items() if n >= 2]
    out: list[str] = []
    for pat in patterns or DEFAULT_CURVES:
        out += sorted(k for k in keys if fnmatch.fnmatchcase(k, pat) and k not in out)
    return out[:limit]


def _series(run: RunData, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, row in enumerate(run.history):
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            step = next((row[s] for s in STEP_KEYS if isinstance(row.get(s), (int, float))), i)
            xs.append(float(step))
            ys.append(float(v))
    return xs, ys


def curves_figure(runs: list[RunData], keys: list[str], path: Path) -> Path | None:
    """One panel per key, one line per run; None when there is nothing to draw."""
    runs = [r for r in runs if r.history]
    if not keys or not runs:
        return None
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for i, run in enumerate(runs):
            xs, ys = _series(run, key)
            if xs:
                ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=run.name, color=f"C{i % 10}")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    # one legend for the figure: a run may appear only in some panels
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.tight_layout(rect=(0, 0, 1, 0.92 if rows == 1 else 0.95))
    fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=min(len(handles), 5), fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bars_figure(rows: list[Row], cols: list[str], dirs: dict[str, int], path: Path) -> Path | None:
    """One bar chart per metric (rows as bars; the best of each dataset outlined, oracles excluded)."""
    if not rows or not cols:
        return None
    n = len(cols)
    per_row = min(4, n)
    grid_rows = math.ceil(n / per_row)
    fig, axes = plt.subplots(grid_rows, per_row, squeeze=False,
                             figsize=(3.4 * per_row, 0.35 * len(rows) + 2.2 * grid_rows))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, col in zip(axes.flat, cols):
        vals = [r.values.get(col, math.nan) for r in rows]
        best: dict[str, float] = {}  # per dataset, oracle rows excluded (as in the tables)
        for r, v in zip(rows, vals):
            if r.kind != "oracle" and math.isfinite(v):
                old = best.get(r.dataset)
                best[r.dataset] = v if old is None else (max(old, v) if dirs[col] > 0 else min(old, v))
        bars = ax.barh(range(len(rows)), [v if math.isfinite(v) else 0 for v in vals],
                       color=[colours[i % len(colours)] for i in range(len(rows))])
        for bar, r, v in zip(bars, rows, vals):
            if r.kind != "oracle" and best.get(r.dataset) == v:
                bar.set_edgecolor("black")
                bar.set_linewidth(2)
        ax.bar_label(bars, labels=[fmt(v) for v in vals], fontsize=7, padding=2)
        ax.margins(x=0.25)
        ax.set_yticks(range(len(rows)), [r.label for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{label(col)} {'↑' if dirs[col] > 0 else '↓'}", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
