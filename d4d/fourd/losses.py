"""Training loss and validation metrics of the reconstruction network (``reference.md`` section 7).

Loss (DUSt3R / CUT3R), per sample of ``F`` frames, with ``valid`` the pixels with known depth:

* normalisation ("avg_dis"): ground-truth points (own camera and world together) are divided by their
  mean distance to the origin over valid pixels, ``z_gt``; predictions by their own ``z_pred``. For
  metric-scale samples with ``metric_scale=True`` the prediction is divided by ``z_gt`` instead, so
  the network learns the scale (CUT3R);
* confidence regression ``c * ||p_hat - p|| - alpha * log c`` (``c = 1 + exp(x)``, alpha 0.2), for
  the own-camera and the world point maps, averaged over valid pixels;
* optional pose term: L2 of the predicted c2w translation (in ``z_gt`` units) and of the unit
  quaternion (sign-invariant) against the ground truth relative to frame 0;
* optional RGB term: MSE of the predicted colour against the input frame.

Metrics: depth AbsRel and delta < 1.25 after one median scale per clip; world point-map error after
one least-squares scale per clip, relative to the ground truth's mean distance.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from d4d.geometry.cameras import relative_poses
from d4d.geometry.points import depth_to_points
from d4d.geometry.precision import full_precision

Tensor = torch.Tensor


@full_precision
def gt_points(depth: Tensor, K: Tensor, c2w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``depth (B, F, H, W)`` z-depth, ``K (B, F, 3, 3)``, ``c2w (B, F, 4, 4)`` -> ``(local, world, valid)``
    with points ``(B, F, H, W, 3)`` and world = frame 0's camera (poses made relative to frame 0)."""
    rel = torch.stack([relative_poses(c.double(), 0).float() for c in c2w])
    world, local = depth_to_points(depth.float(), K.float(), rel)
    return local, world, depth > 0


def _avg_dis(local: Tensor, world: Tensor, valid: Tensor) -> Tensor:
    """Mean distance to the origin over valid pixels of both maps, per sample ``(B,)``."""
    v = valid.flatten(1).float()
    dist = local.norm(dim=-1).flatten(1) * v + world.norm(dim=-1).flatten(1) * v
    return (dist.sum(1) / (2 * v.sum(1)).clamp_min(1)).clamp_min(1e-8)


def rotation_to_quaternion(R: Tensor) -> Tensor:
    """``(..., 3, 3)`` rotations -> ``(..., 4)`` unit quaternions ``wxyz`` (w >= 0)."""
    m = R.float()
    w = torch.sqrt((1 + m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]).clamp_min(1e-8)) / 2
    x = torch.sqrt((1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2]).clamp_min(0)) / 2
    y = torch.sqrt((1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2]).clamp_min(0)) / 2
    z = torch.sqrt((1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]).clamp_min(0)) / 2
    x = torch.copysign(x, m[..., 2, 1] - m[..., 1, 2])
    y = torch.copysign(y, m[..., 0, 2] - m[..., 2, 0])
    z = torch.copysign(z, m[..., 1, 0] - m[..., 0, 1])
    return F.normalize(torch.stack([w, x, y, z], -1), dim=-1)


@full_precision
def reconstruction_loss(pred: dict[str, Tensor], depth: Tensor, K: Tensor, c2w: Tensor, metric: Tensor,
                        frames: Tensor | None = None, alpha: float = 0.2, metric_scale: bool = True,
                        pose_weight: float = 0.0, rgb_weight: float = 0.0) -> dict[str, Tensor]:
    """The module docstring's loss.

    Args:
        pred: the network output (``local``, ``world`` ``(B, F, H, W, 3)``, ``conf``, ``pose``, ``rgb``).
        depth: ``(B, F, H, W)`` supervision z-depth (0 = invalid); K ``(B, F, 3, 3)``; c2w ``(B, F, 4, 4)``.
        metric: ``(B,)`` bool, the sample's depth and poses are metric. frames: ``(B, F, 3, H, W)``.
    Returns: ``loss`` (total) and its parts ``conf_loss``, ``reg`` (unweighted distance), ``pose``, ``rgb``.
    """
    local, world, valid = gt_points(depth, K, c2w)
    z_gt = _avg_dis(local, world, valid)
    z_pred = _avg_dis(pred["local"], pred["world"], valid)
    use_gt = metric.bool() & metric_scale
    z_p = torch.where(use_gt, z_gt, z_pred).view(-1, 1, 1, 1, 1)
    zg = z_gt.view(-1, 1, 1, 1, 1)
    err_l = (pred["local"] / z_p - local / zg).norm(dim=-1)
    err_w = (pred["world"] / z_p - world / zg).norm(dim=-1)
    c = pred["conf"]
    n = valid.sum().clamp_min(1)
    conf_term = ((c * (err_l + err_w) - 2 * alpha * torch.log(c)) * valid).sum() / n
    out = {"conf_loss": conf_term, "reg": ((err_l + err_w) / 2 * valid).sum() / n}
    loss = conf_term
    if pose_weight > 0:
        rel = torch.stack([relative_poses(x.double(), 0).float() for x in c2w])
        t_gt = rel[..., :3, 3] / z_gt.view(-1, 1, 1)
        q_gt = rotation_to_quaternion(rel[..., :3, :3])
        q = pred["pose"][..., 3:]
        q_err = torch.minimum((q - q_gt).pow(2).sum(-1), (q + q_gt).pow(2).sum(-1))
        pose = (pred["pose"][..., :3] - t_gt).pow(2).sum(-1).mean() + q_err.mean()
        out["pose"] = pose
        loss = loss + pose_weight * pose
    if rgb_weight > 0 and frames is not None:
        rgb = F.mse_loss(pred["rgb"], frames.float())
        out["rgb"] = rgb
        loss = loss + rgb_weight * rgb
    out["loss"] = loss
    return out


@full_precision
def depth_metrics(pred_depth: Tensor, gt_depth: Tensor, valid: Tensor | None = None) -> dict[str, Tensor]:
    """Per-sample scale-aligned depth errors.

    Args: ``pred_depth``, ``gt_depth`` ``(B, ...)`` z-depth; valid ``(B, ...)`` (default ``gt > 0``).
    Predicted depths are clamped to >= 1e-6. The prediction of each sample is scaled by ``median(gt) / median(pred)`` over its valid pixels.
    Returns ``abs_rel (B,)`` = mean ``|s d - d*| / d*`` and ``delta1 (B,)`` = fraction with
    ``max(s d / d*, d* / s d) < 1.25``.
    """
    valid = (gt_depth > 0) if valid is None else valid
    pred_depth = pred_depth.clamp_min(1e-6)  # points behind the camera count as (large) errors
    abs_rel, delta1 = [], []
    for p, g, v in zip(pred_depth, gt_depth, valid):
        if not v.any():
            abs_rel.append(p.new_tensor(float("nan")))
            delta1.append(p.new_tensor(float("nan")))
            continue
        p, g = p[v].float(), g[v].float()
        s = g.median() / p.median().clamp_min(1e-8)
        q = s * p
        abs_rel.append(((q - g).abs() / g).mean())
        delta1.append((torch.maximum(q / g, g / q) < 1.25).float().mean())
    return {"abs_rel": torch.stack(abs_rel), "delta1": torch.stack(delta1)}


@full_precision
def point_error(pred: Tensor, gt: Tensor, valid: Tensor) -> Tensor:
    """``(B,)`` mean ``||s p_hat - p||`` over valid pixels divided by mean ``||p||``, with ``s`` the
    least-squares scale per sample. ``pred``, ``gt``: ``(B, ..., 3)``; ``valid (B, ...)``."""
    out = []
    for p, g, v in zip(pred, gt, valid):
        if not v.any():
            out.append(p.new_tensor(float("nan")))
            continue
        p, g = p[v].float(), g[v].float()
        s = (p * g).sum() / (p * p).sum().clamp_min(1e-12)
        out.append((s * p - g).norm(dim=-1).mean() / g.norm(dim=-1).mean().clamp_min(1e-12))
    return torch.stack(out)
