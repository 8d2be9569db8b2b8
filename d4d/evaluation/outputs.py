"""What ``python -m d4d.evaluate`` writes, and its wandb logging.

``<out>/per_clip.csv`` and ``per_clip.json``: one row per (protocol, clip) with every metric of
:mod:`d4d.evaluation.scoring`. ``<out>/aggregate.json``::

    {"format": "d4d.evaluate/1", "name": ...,
     "protocols": {"dynamic": {"mpsnr": 21.3, ..., "clips": 16}, ...},
     "directions": {"mpsnr": 1, ...}, "config": {...the command's settings...},
     "complete": true}  # false while the evaluation runs (rewritten after every clip)

Aggregates are means over clips (NaN entries skipped); camera metrics first drop clips beyond 10
standard deviations (CamI2V). ``python -m d4d.report`` reads ``aggregate.json``.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch

from d4d.evaluation.scoring import DIRECTIONS
from d4d.metrics.camera import drop_outliers

FORMAT = "d4d.evaluate/1"
CAMERA_KEYS = ("rot_err", "trans_err", "cam_mc", "fourd_rot_err", "fourd_trans_err", "fourd_cam_mc")


def aggregate(rows: list[dict]) -> dict[str, dict[str, float]]:
    """``{protocol: {metric: mean over clips, "clips": n}}`` from per-clip rows."""
    out: dict[str, dict[str, float]] = {}
    for protocol in dict.fromkeys(r["protocol"] for r in rows):
        mine = [r for r in rows if r["protocol"] == protocol]
        keys = [k for k in mine[0] if k not in ("protocol", "clip_id", "motion")]
        agg: dict[str, float] = {"clips": len(mine)}
        for key in keys:
            vals = torch.tensor([float(r.get(key, math.nan)) for r in mine], dtype=torch.float64)
            vals = drop_outliers(vals) if key in CAMERA_KEYS else vals[~torch.isnan(vals)]
            agg[key] = float(vals.mean()) if vals.numel() else math.nan
        out[protocol] = agg
    return out


def _clean(x):
    """JSON has no NaN: write null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def write_results(out_dir: Path, rows: list[dict], name: str, config: dict, complete: bool = True) -> dict:
    """Write per_clip.csv, per_clip.json and aggregate.json; return the aggregate document.
    ``d4d.evaluate`` rewrites them after every clip with ``complete=False`` (an interrupted evaluation
    keeps what it scored) and once more at the end."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out_dir / "per_clip.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if isinstance(r.get(k), float) and math.isnan(r[k]) else r.get(k, ""))
                             for k in keys})
    (out_dir / "per_clip.json").write_text(json.dumps(_clean(rows), indent=1))
    doc = {"format": FORMAT, "name": name, "protocols": aggregate(rows),
           "directions": {k: v for k, v in DIRECTIONS.items()}, "config": config, "complete": complete}
    tmp = out_dir / "aggregate.json.tmp"  # readers (d4d.report) never see half a file
    tmp.write_text(json.dumps(_clean(doc), indent=1))
    tmp.replace(out_dir / "aggregate.json")
    return doc


def write_sample_video(path: Path, real: torch.Tensor, fake: torch.Tensor, fps: float = 8.0) -> Path:
    """Real | generated side by side as an mp4 (``(F, 3, H, W)`` in [0, 1]; odd sizes padded)."""
    from d4d.data.video import encode_mp4

    both = torch.cat([real, fake.clamp(0, 1)], dim=-1)
    H, W = both.shape[-2:]
    both = torch.nn.functional.pad(both, (0, W % 2, 0, H % 2))
    arr = both.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_mp4(arr, fps=fps, qp=18))
    return path


class WandbLog:
    """Evaluation logging to wandb (``mode``: online | offline | disabled): per-clip table, the
    aggregate as the run summary (``eval/<protocol>/<metric>``), sample videos and 4D point clouds."""

    def __init__(self, mode: str, out_dir: Path, name: str, config: dict, project: str = "d4d") -> None:
        self.run = None
        if mode == "disabled":
            return
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=project, name=name, job_type="evaluate", dir=str(out_dir), mode=mode,
                              config=config, reinit="finish_previous")

    def video(self, protocol: str, clip_id: str, path: Path) -> None:
        if self.run is not None:
            self.run.log({f"samples/{protocol}/{clip_id}": self.wandb.Video(str(path), format="mp4")})

    def points(self, protocol: str, clip_id: str, xyz: torch.Tensor, rgb: torch.Tensor,
               max_points: int = 20000) -> None:
        if self.run is None:
            return
        idx = torch.randperm(xyz.shape[0], generator=torch.Generator().manual_seed(0))[:max_points]
        arr = torch.cat([xyz[idx].detach().float(), rgb[idx].detach().float().clamp(0, 1) * 255], 1).cpu().numpy()
        self.run.log({f"points/{protocol}/{clip_id}": self.wandb.Object3D(arr)})

    def finish(self, rows: list[dict], doc: dict) -> None:
        if self.run is None:
            return
        keys = list(dict.fromkeys(k for r in rows for k in r))
        table = self.wandb.Table(columns=keys, data=[[r.get(k) for k in keys] for r in rows])
        self.run.log({"eval/per_clip": table})
        for protocol, metrics in doc["protocols"].items():
            for key, value in metrics.items():
                self.run.summary[f"eval/{protocol}/{key}"] = value
        self.run.finish()
