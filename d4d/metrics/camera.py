"""Camera accuracy of a generated video: RotErr, TransErr and CamMC as CamI2V defines them.

Reference section 6. Both trajectories are ``(F, 4, 4)`` OpenCV camera-to-world poses; each is first
made relative to its frame 0 (``inv(c2w_0) @ c2w_i``) and its translations divided by its own
largest translation norm (SfM recovers poses up to scale). Then, summed over frames:

* ``rot_err``   = sum ``arccos((tr(R_gt^T R_gen) - 1) / 2)``  (radians; ``rot_err_deg`` in degrees)
* ``trans_err`` = sum ``||t_gt - t_gen||``
* ``cam_mc``    = sum ``||[R_gt | t_gt] - [R_gen | t_gen]||_F``

Frames missing from the recovered trajectory (NaN poses, e.g. not registered by SfM) are left
out of the sums and counted in ``registered``. CamI2V repeats pose recovery (5 trials) and drops
values beyond 10 standard deviations of the mean: :func:`drop_outliers` and :func:`aggregate_trials`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

CAMERA_METRICS = ("rot_err", "trans_err", "cam_mc")


def normalize_trajectory(c2w: Tensor) -> Tensor:
    """``(F, 4, 4)`` c2w -> relative to frame 0, translations divided by the largest norm (kept
    as is when the camera does not move). Float64. NaN poses stay NaN."""
    c2w = c2w.double()
    rel = torch.linalg.inv(c2w[0]) @ c2w
    norms = rel[:, :3, 3].norm(dim=-1)
    scale = torch.nan_to_num(norms, nan=0.0).max()
    if scale > 1e-12:
        rel = rel.clone()
        rel[:, :3, 3] /= scale
    return rel


def geodesic_angles(R_a: Tensor, R_b: Tensor) -> Tensor:
    """``arccos((tr(R_a^T R_b) - 1) / 2)`` per frame, radians; ``(..., 3, 3)`` -> ``(...)``."""
    tr = (R_a.transpose(-1, -2) @ R_b).diagonal(dim1=-2, dim2=-1).sum(-1)
    return torch.arccos(((tr - 1) / 2).clamp(-1.0, 1.0))


def camera_errors(c2w_gt: Tensor, c2w_gen: Tensor) -> dict[str, float]:
    """RotErr, TransErr, CamMC (sums over frames, see the module docstring) plus ``rot_err_deg``,
    ``registered`` (fraction of frames with a finite recovered pose) and ``frames``.

    Raises ValueError when the shapes differ or frame 0 of ``c2w_gen`` is missing (everything is
    relative to it)."""
    if c2w_gt.shape != c2w_gen.shape or c2w_gt.dim() != 3 or c2w_gt.shape[-2:] != (4, 4):
        raise ValueError(f"trajectories must both be (F, 4, 4), got {tuple(c2w_gt.shape)} "
                         f"and {tuple(c2w_gen.shape)}")
    if not torch.isfinite(c2w_gen[0]).all():
        raise ValueError("the recovered trajectory has no pose for frame 0")
    ok = torch.isfinite(c2w_gen).flatten(1).all(1)
    gt = normalize_trajectory(c2w_gt)
    gen = normalize_trajectory(c2w_gen)
    gt, gen = gt[ok], gen[ok]
    rot = geodesic_angles(gt[:, :3, :3], gen[:, :3, :3]).sum()
    trans = (gt[:, :3, 3] - gen[:, :3, 3]).norm(dim=-1).sum()
    mc = (gt[:, :3, :4] - gen[:, :3, :4]).flatten(1).norm(dim=-1).sum()
    return {"rot_err": float(rot), "rot_err_deg": math.degrees(float(rot)), "trans_err": float(trans),
            "cam_mc": float(mc), "registered": float(ok.float().mean()), "frames": int(c2w_gt.shape[0])}


def drop_outliers(values: Tensor, sigmas: float = 10.0) -> Tensor:
    """The finite entries of ``values`` within ``sigmas`` standard deviations of their mean
    (CamI2V's rule, 10 sigma). With fewer than 3 finite values nothing is dropped."""
    v = values.double()
    v = v[torch.isfinite(v)]
    if v.numel() < 3:
        return v
    mean, std = v.mean(), v.std()
    return v[(v - mean).abs() <= sigmas * std]


def aggregate_trials(per_trial: list[dict[str, float]], sigmas: float = 10.0) -> dict[str, float]:
    """Mean of each camera metric over repeated pose recoveries, after :func:`drop_outliers`;
    also ``trials`` (how many succeeded) and ``<metric>_std``. NaN when no trial succeeded."""
    out: dict[str, float] = {"trials": float(len(per_trial))}
    for key in (*CAMERA_METRICS, "rot_err_deg", "registered"):
        vals = drop_outliers(torch.tensor([t[key] for t in per_trial], dtype=torch.float64), sigmas)
        out[key] = float(vals.mean()) if vals.numel() else math.nan
        out[f"{key}_std"] = float(vals.std()) if vals.numel() > 1 else 0.0 if vals.numel() else math.nan
    return out
