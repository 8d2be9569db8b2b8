"""Evaluation metrics: masked image metrics (DyCheck, Table 1), LPIPS, covisibility, temporal
flicker and camera accuracy (CamI2V). See ``docs/evaluation.md`` for definitions and choices."""
from d4d.metrics.camera import (
    CAMERA_METRICS, aggregate_trials, camera_errors, drop_outliers, normalize_trajectory,
)
from d4d.metrics.flow import FlowEstimator, covisibility_mask, temporal_flicker
from d4d.metrics.image import masked_psnr, masked_ssim, ssim_map
from d4d.metrics.lpips import build_lpips, masked_lpips

__all__ = [
    "CAMERA_METRICS", "FlowEstimator", "aggregate_trials", "build_lpips", "camera_errors",
    "covisibility_mask", "drop_outliers", "masked_lpips", "masked_psnr", "masked_ssim",
    "normalize_trajectory", "ssim_map", "temporal_flicker",
]
