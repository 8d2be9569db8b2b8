"""Table 1 (runs x metrics, best per column in bold, arrows for direction) and Table 2 (each
module alone, with the 4D generator, and the delta row) as Markdown and HTML."""
from __future__ import annotations

import dataclasses
import fnmatch
import html
import math

from d4d.evaluation.scoring import DIRECTIONS
from d4d.reporting.sources import RunData

FOURD_SUFFIX = "+4d"
DEFAULT_TRAINING_PATTERNS = ("val/*", "test/*")
MAX_AUTO_COLUMNS = 8
_LABELS = {"mpsnr": "mPSNR", "mssim": "mSSIM (DyCheck)", "mssim_strict": "mSSIM (strict)", "mlpips": "mLPIPS",
           "flicker": "flicker", "rot_err": "RotErr", "trans_err": "TransErr", "cam_mc": "CamMC",
           "fourd_rot_err": "4D RotErr", "fourd_trans_err": "4D TransErr", "fourd_cam_mc": "4D CamMC",
           "covisible": "covisible"}


def direction(key: str, runs: list[RunData] = (), overrides: dict[str, int] | None = None) -> int:
    """+1 when higher is better, -1 when lower is: user overrides, the runs' own, the evaluation
    table, then the name (loss / err / lpips / flicker / time / mc: lower)."""
    if overrides and key in overrides:
        return overrides[key]
    for r in runs:
        if key in r.directions:
            return r.directions[key]
    if key in DIRECTIONS:
        return DIRECTIONS[key]
    low = key.lower()
    lower_words = ("loss", "err", "lpips", "flicker", "time", "_mc", "mse", "fid", "fvd")
    return -1 if any(w in low for w in lower_words) else 1


def label(key: str) -> str:
    return _LABELS.get(key, key)


ORACLE_PROTOCOLS = ("real-frames",)  # reference rows: shown in italics, never "best"


@dataclasses.dataclass
class Row:
    label: str
    values: dict[str, float]
    kind: str = ""  # "evaluation" | "wandb" | "baseline" | "oracle"
    dataset: str = ""  # the evaluated shards: rows are only compared within one dataset


def table1_rows(runs: list[RunData]) -> list[Row]:
    rows = []
    for run in runs:
        for protocol, vals in run.metrics.items():
            name = run.name if not protocol else f"{run.name} / {protocol}"
            kind = "oracle" if protocol in ORACLE_PROTOCOLS else run.kind
            rows.append(Row(name, vals, kind, str(run.config.get("shards") or "")))
    return rows


def group_by_dataset(rows: list[Row]) -> dict[str, list[Row]]:
    """Rows per evaluated dataset, in order of appearance; baseline rows (published numbers, no
    dataset) join every group."""
    groups: dict[str, list[Row]] = {}
    for r in rows:
        if r.kind != "baseline":
            groups.setdefault(r.dataset, []).append(r)
    extra = [r for r in rows if r.kind == "baseline"]
    if not groups:
        return {"": extra}
    return {k: v + extra for k, v in groups.items()}


def choose_columns(rows: list[Row], requested: list[str] | None = None) -> list[str]:
    """``requested`` (names or globs, in order), else the evaluation metrics present, else the
    numeric ``val/*`` and ``test/*`` keys (at most :data:`MAX_AUTO_COLUMNS`)."""
    present = list(dict.fromkeys(k for r in rows for k in r.values))
    if requested:
        cols = []
        for pat in requested:
            cols += [k for k in present if fnmatch.fnmatchcase(k, pat) and k not in cols]
        return cols
    cols = [k for k in DIRECTIONS if k in present]
    if cols:
        return cols
    cols = sorted(k for k in present if any(fnmatch.fnmatchcase(k, p) for p in DEFAULT_TRAINING_PATTERNS))
    return cols[:MAX_AUTO_COLUMNS]


def best_values(rows: list[Row], cols: list[str], dirs: dict[str, int]) -> dict[str, float]:
    out = {}
    for c in cols:
        vals = [r.values[c] for r in rows
                if r.kind != "oracle" and c in r.values and math.isfinite(r.values[c])]
        if vals:
            out[c] = max(vals) if dirs[c] > 0 else min(vals)
    return out


def fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.2f}" if abs(v) >= 10 else f"{v:.4f}"


def _arrow(d: int) -> str:
    return "↑" if d > 0 else "↓"


def table1(rows: list[Row], cols: list[str], dirs: dict[str, int]) -> tuple[str, str]:
    """(markdown, html) of Table 1."""
    best = best_values(rows, cols, dirs)
    head = ["run"] + [f"{label(c)} {_arrow(dirs[c])}" for c in cols]
    md = ["| " + " | ".join(head) + " |", "|" + "|".join([" --- "] + [" ---: "] * len(cols)) + "|"]
    hrows = []
    for r in rows:
        cells_md, cells_html = [], []
        for c in cols:
            v = r.values.get(c)
            text = fmt(v)
            is_best = r.kind != "oracle" and v is not None and c in best and math.isfinite(v) and v == best[c]
            cells_md.append(f"**{text}**" if is_best else text)
            cells_html.append(f"<td><b>{text}</b></td>" if is_best else f"<td>{text}</td>")
        name = r.label + {"baseline": " *(published)*", "oracle": " *(oracle)*"}.get(r.kind, "")
        md.append("| " + " | ".join([name] + cells_md) + " |")
        tag = {"baseline": " <i>(published)</i>", "oracle": " <i>(oracle)</i>"}.get(r.kind, "")
        hrows.append(f"<tr><th>{html.escape(r.label)}{tag}</th>" + "".join(cells_html) + "</tr>")
    hhead = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
    return "\n".join(md), f"<table>\n{hhead}\n" + "\n".join(hrows) + "\n</table>"


def table2_blocks(runs: list[RunData]) -> list[tuple[str, str, str]]:
    """``(run name, module protocol, 4d protocol)`` for each run holding both ``X`` and ``X+4d``."""
    out = []
    for run in runs:
        for p in run.metrics:
            if p and not p.endswith(FOURD_SUFFIX) and p + FOURD_SUFFIX in run.metrics:
                out.append((run.name, p, p + FOURD_SUFFIX))
    return out


def table2(runs: list[RunData], cols: list[str], dirs: dict[str, int]) -> tuple[str, str] | None:
    """(markdown, html) of Table 2: per module its row alone, with the 4D generator, and
    ``delta = with - alone`` marked better/worse by each metric's direction. None without pairs."""
    blocks = table2_blocks(runs)
    if not blocks:
        return None
    by_name = {r.name: r for r in runs}
    head = ["run", "setting"] + [f"{label(c)} {_arrow(dirs[c])}" for c in cols]
    md = ["| " + " | ".join(head) + " |", "|" + "|".join([" --- ", " --- "] + [" ---: "] * len(cols)) + "|"]
    hrows = []
    for name, alone, with4d in blocks:
        a, b = by_name[name].metrics[alone], by_name[name].metrics[with4d]
        for setting, vals in ((alone, a), (with4d, b)):
            md.append("| " + " | ".join([name, setting] + [fmt(vals.get(c)) for c in cols]) + " |")
            hrows.append(f"<tr><th>{html.escape(name)}</th><td>{html.escape(setting)}</td>"
                         + "".join(f"<td>{fmt(vals.get(c))}</td>" for c in cols) + "</tr>")
        cells_md, cells_html = [], []
        for c in cols:
            if c in a and c in b and math.isfinite(a[c]) and math.isfinite(b[c]):
                d = b[c] - a[c]
                good = d * dirs[c] > 0
                mark = "" if d == 0 else (" ✓" if good else " ✗")
                text = f"{d:+.4f}" if abs(d) < 10 else f"{d:+.2f}"
                cells_md.append(f"{text}{mark}")
                colour = "" if d == 0 else (' style="color:#1a7f37"' if good else ' style="color:#cf222e"')
                cells_html.append(f"<td{colour}>{text}{mark}</td>")
            else:
                cells_md.append("-")
                cells_html.append("<td>-</td>")
        md.append("| " + " | ".join([name, f"Δ ({with4d} − {alone})"] + cells_md) + " |")
        hrows.append(f"<tr class='delta'><th>{html.escape(name)}</th><td>Δ</td>"
                     + "".join(cells_html) + "</tr>")
    hhead = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
    return "\n".join(md), f"<table>\n{hhead}\n" + "\n".join(hrows) + "\n</table>"
