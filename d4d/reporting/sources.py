"""Where compared runs come from: evaluation JSON, local wandb run files, the wandb API, a CSV.

Every source gives :class:`RunData`: ``metrics[protocol][metric]`` (``protocol`` "" for a run
without protocols, e.g. a training run) plus its history rows for curves.

* Evaluation JSON: ``aggregate.json`` written by ``python -m d4d.evaluate`` (or its folder).
* Local wandb runs: a ``.wandb`` file, a run folder or any folder above them (no network);
  summary keys ``eval/<protocol>/<metric>`` become protocols, other numeric keys ``metrics[""]``.
* wandb API (online): ``entity/project`` with run ids, tags or groups.
* Baselines CSV: a ``name`` column, optional ``protocol`` column, one column per metric
  (published numbers of other methods), e.g. ``name,protocol,mpsnr,mssim,mlpips``.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

from d4d.utils.errors import UserError


@dataclasses.dataclass
class RunData:
    name: str
    source: str
    kind: str  # "evaluation" | "wandb" | "baseline"
    metrics: dict[str, dict[str, float]]
    history: list[dict] = dataclasses.field(default_factory=list)
    directions: dict[str, int] = dataclasses.field(default_factory=dict)
    config: dict = dataclasses.field(default_factory=dict)
    tags: list[str] = dataclasses.field(default_factory=list)
    group: str | None = None
    complete: bool | None = None  # evaluations: False while d4d.evaluate runs or after it was stopped


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def split_summary(summary: dict) -> dict[str, dict[str, float]]:
    """Numeric summary -> ``{protocol: {metric: value}}``: ``eval/<protocol>/<metric>`` keys go to their
    protocol, every other numeric key not starting with ``_`` to protocol ""."""
    out: dict[str, dict[str, float]] = {}
    for key, value in summary.items():
        v = _number(value)
        if v is None or key.startswith("_"):
            continue
        parts = key.split("/")
        if parts[0] == "eval" and len(parts) == 3:
            out.setdefault(parts[1], {})[parts[2]] = v
        else:
            out.setdefault("", {})[key] = v
    return out


def load_evaluation(path: str | Path, name: str | None = None) -> RunData:
    p = Path(path)
    if p.is_dir():
        p = p / "aggregate.json"
    if not p.is_file():
        raise UserError(f"{path}: no evaluation file (expected aggregate.json from python -m d4d.evaluate)")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("protocols"), dict):
        raise UserError(f"{p}: not a d4d.evaluate aggregate (no 'protocols' object)")
    metrics = {proto: {k: (math.nan if v is None else float(v)) for k, v in vals.items() if k != "clips"
                       and (v is None or _number(v) is not None)}
               for proto, vals in doc["protocols"].items()}
    directions = {k: int(v) for k, v in (doc.get("directions") or {}).items()}
    return RunData(name=name or doc.get("name") or p.parent.name, source=str(p), kind="evaluation",
                   metrics=metrics, directions=directions, config=doc.get("config") or {},
                   complete=doc.get("complete"))


def load_wandb_offline(path: str | Path, name: str | None = None) -> list[RunData]:
    """Every run found under ``path`` (see :func:`d4d.reporting.wandb_offline.find_run_files`)."""
    from d4d.reporting.wandb_offline import find_run_files, read_run_file

    runs = []
    for f in find_run_files(path):
        info = read_run_file(f)
        label = name or info["name"] or info["id"] or f.parent.name
        runs.append(RunData(name=label, source=str(f), kind="wandb", metrics=split_summary(info["summary"]),
                            history=info["history"], config=info["config"], tags=info["tags"],
                            group=info["group"]))
    if name and len(runs) > 1:
        for i, r in enumerate(runs):
            r.name = f"{name}#{i}"
    return runs


def wandb_api_filters(run_ids: list[str], tags: list[str], groups: list[str]) -> dict:
    """The MongoDB-style filter of ``wandb.Api().runs`` selecting runs by id, tag or group (any of them)."""
    clauses = []
    if run_ids:
        clauses.append({"name": {"$in": list(run_ids)}})  # the API's "name" is the run id
    if tags:
        clauses.append({"tags": {"$in": list(tags)}})
    if groups:
        clauses.append({"group": {"$in": list(groups)}})
    if not clauses:
        raise UserError("--wandb-project needs --run-id, --tag or --group to choose runs")
    return clauses[0] if len(clauses) == 1 else {"$or": clauses}


def load_wandb_api(project: str, run_ids: list[str], tags: list[str], groups: list[str],
                   history_keys: list[str] | None = None) -> list[RunData]:
    """Runs of ``entity/project`` from the wandb API (needs network and a login)."""
    if project.count("/") != 1:
        raise UserError(f"--wandb-project {project!r}: expected ENTITY/PROJECT")
    import wandb

    filters = wandb_api_filters(run_ids, tags, groups)
    try:
        api_runs = list(wandb.Api(timeout=30).runs(project, filters=filters))
    except Exception as exc:  # noqa: BLE001 - network, auth, unknown project
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"wandb API {project}: {why}") from None
    if not api_runs:
        raise UserError(f"wandb API {project}: no run matches {filters}")
    out = []
    for r in api_runs:
        history = list(r.scan_history(keys=history_keys)) if history_keys else list(r.scan_history())
        out.append(RunData(name=r.name or r.id, source=r.url, kind="wandb",
                           metrics=split_summary(dict(r.summary)),
                           history=history, config=dict(r.config), tags=list(r.tags), group=r.group))
    return out


def load_baselines(path: str | Path) -> list[RunData]:
    """External numbers from a CSV (``name``, optional ``protocol``, one column per metric)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--baselines {path}: file not found")
    with open(p, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "name" not in rows[0]:
        raise UserError(f"--baselines {path}: needs a header with a 'name' column and one column per metric")
    runs: dict[str, RunData] = {}
    for line, row in enumerate(rows, start=2):
        name = (row.pop("name") or "").strip()
        protocol = (row.pop("protocol", "") or "").strip()
        if not name:
            raise UserError(f"--baselines {path} line {line}: empty name")
        vals = {}
        for key, text in row.items():
            text = (text or "").strip()
            if not text:
                continue
            try:
                vals[key.strip()] = float(text)
            except ValueError:
                raise UserError(f"--baselines {path} line {line}: {key}={text!r} is not a number") from None
        run = runs.setdefault(name, RunData(name=name, source=str(p), kind="baseline", metrics={}))
        run.metrics[protocol] = vals
    return list(runs.values())
