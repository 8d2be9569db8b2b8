"""The metrics of one generated clip against its real clip (frames 1..F-1; frame 0 is the input).

Keys of :func:`score_clip` (all floats; NaN where a metric cannot be computed, e.g. an empty mask):

==================  ========  =============================================================
key                 better    meaning
==================  ========  =============================================================
``mpsnr``           higher    masked PSNR (dB), mean over frames (reference section 8)
``mssim``           higher    masked SSIM, DyCheck-compatible (empty windows count as 1)
``mssim_strict``    higher    masked SSIM averaged over the mask only
``mlpips``          lower     masked AlexNet LPIPS (absent with ``--lpips off``)
``covisible``       -         mean fraction of covisible pixels in frames 1..F-1
``scored_frames``   -         frames with a non-empty mask (at most F-1), i.e. entering the means
``flicker``         lower     warping error of the generated video (Lai et al.)
``rot_err``         lower     CamI2V RotErr (radians, sum over frames) of SfM poses
``trans_err``       lower     CamI2V TransErr of SfM poses
``cam_mc``          lower     CamI2V CamMC of SfM poses
``fourd_*``         lower     the same three from the 4D generator's corrected cameras
``seconds``         -         (added by ``d4d.evaluate``) wall time of the video, or of lifting +
                              rendering for a "+4d" row
==================  ========  =============================================================
"""
from __future__ import annotations

import math

import torch

from d4d.metrics.camera import camera_errors
from d4d.metrics.flow import FlowEstimator, temporal_flicker
from d4d.metrics.image import masked_psnr, masked_ssim
from d4d.metrics.lpips import masked_lpips

# direction of each metric for tables: +1 higher is better, -1 lower is better
DIRECTIONS = {
    "mpsnr": 1, "mssim": 1, "mssim_strict": 1, "mlpips": -1, "flicker": -1,
    "rot_err": -1, "trans_err": -1, "cam_mc": -1,
    "fourd_rot_err": -1, "fourd_trans_err": -1, "fourd_cam_mc": -1,
}


def image_metrics(real: torch.Tensor, fake: torch.Tensor, masks: torch.Tensor,
                  lpips_model=None) -> dict[str, float]:
    """mPSNR / mSSIM (both) / mLPIPS of frames 1..F-1 (``(F, 3, H, W)`` in [0, 1], masks ``(F, H, W)``),
    each the mean over frames with a non-empty mask."""
    if real.shape != fake.shape:
        raise ValueError(f"generated frames {tuple(fake.shape)} do not match the real clip "
                         f"{tuple(real.shape)}")
    r, f, m = real[1:].double(), fake[1:].double().clamp(0, 1), masks[1:]

    def mean(x: torch.Tensor) -> float:
        x = x[~torch.isnan(x)]
        return float(x.mean()) if x.numel() else math.nan

    psnr = masked_psnr(r, f, m)
    ssim = masked_ssim(r, f, m)
    out = {"mpsnr": mean(psnr.clamp(max=100.0)),  # identical frames: cap +inf at 100 dB
           "mssim": mean(ssim["ssim_dycheck"]), "mssim_strict": mean(ssim["ssim_strict"]),
           "covisible": float(m.float().mean()),
           "scored_frames": int((~torch.isnan(psnr)).sum())}
    if lpips_model is not None:
        out["mlpips"] = mean(masked_lpips(lpips_model, r.float(), f.float(), m))
    return out


def score_clip(real: torch.Tensor, fake: torch.Tensor, masks: torch.Tensor, c2w_requested: torch.Tensor,
               K: torch.Tensor, *, lpips_model=None, flow: FlowEstimator | None = None,
               camera_trials: int = 0, fourd_c2w: torch.Tensor | None = None,
               seed: int = 0, colmap_device: str = "auto") -> dict[str, float]:
    """All metrics of one generated clip (see the module table); ``colmap_device`` (auto | cpu | cuda)
    is where COLMAP runs for the camera metrics (:func:`d4d.metrics.sfm.colmap_device`)."""
    out = image_metrics(real, fake, masks, lpips_model)
    out["flicker"] = temporal_flicker(fake, flow)
    if camera_trials > 0:
        from d4d.metrics.sfm import sfm_camera_accuracy

        acc = sfm_camera_accuracy(fake, c2w_requested, K, trials=camera_trials, seed=seed, device=colmap_device)
        out.update({k: acc[k] for k in ("rot_err", "trans_err", "cam_mc", "registered")})
        out["sfm_trials_failed"] = acc["trials_failed"]
    if fourd_c2w is not None:
        err = camera_errors(c2w_requested, fourd_c2w)
        out.update({f"fourd_{k}": err[k] for k in ("rot_err", "trans_err", "cam_mc")})
    return out
