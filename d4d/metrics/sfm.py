"""Recover the camera path of a video with COLMAP (pycolmap), the intrinsics known.

SIFT features on every frame (one shared PINHOLE camera with the given ``K``, kept fixed),
exhaustive matching, incremental mapping; the largest model is kept. Short generated clips have
small baselines, so the initial-pair thresholds are relaxed from COLMAP's defaults (tabled in
:data:`MAPPER_OVERRIDES`). Output: ``(F, 4, 4)`` OpenCV c2w in the model's frame and scale, NaN for
frames the mapper did not register. Pass the result with the requested path to
:func:`d4d.metrics.camera.camera_errors`, which makes both relative to frame 0 and normalises scale.

pycolmap is the ``eval`` extra (``pip install 'd4d[eval]'``; ``pycolmap-cuda12`` is its CUDA build):
it has no aarch64 Linux wheel, so a plain install leaves it out and :func:`import_pycolmap` says so in
one line. ``device`` (``auto`` | ``cpu`` | ``cuda``) runs feature extraction and matching on the GPU
when the installed pycolmap was built with CUDA (``auto``) or on request; GPU SIFT finds different
features than CPU SIFT, so compare figures measured on the same device.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from d4d.metrics.camera import aggregate_trials, camera_errors
from d4d.utils.errors import UserError
from d4d.utils.logging import get_logger

log = get_logger(__name__)

COLMAP_DEVICES = ("auto", "cpu", "cuda")
INSTALL_HINT = "pip install 'd4d[eval]' (or pip install pycolmap; pycolmap-cuda12 for COLMAP on a GPU)"


def import_pycolmap(needed_by: str = "camera accuracy"):
    """The pycolmap module; UserError naming the package and the install command when it is missing."""
    try:
        import pycolmap
    except ImportError:
        raise UserError(f"{needed_by} needs the pycolmap package, which is not installed: "
                        f"{INSTALL_HINT}") from None
    return pycolmap


def colmap_device(spec: str = "auto", needed_by: str = "camera accuracy") -> str:
    """``auto`` | ``cpu`` | ``cuda`` -> ``cpu`` or ``cuda``: ``auto`` is ``cuda`` when the installed
    pycolmap has CUDA support (``pycolmap.has_cuda``), else ``cpu``; ``cuda`` without it is a UserError."""
    if spec not in COLMAP_DEVICES:
        raise UserError(f"COLMAP device {spec!r}: expected one of {', '.join(COLMAP_DEVICES)}")
    has_cuda = bool(getattr(import_pycolmap(needed_by), "has_cuda", False))
    if spec == "auto":
        return "cuda" if has_cuda else "cpu"
    if spec == "cuda" and not has_cuda:
        raise UserError("COLMAP device cuda: the installed pycolmap has no CUDA support "
                        "(pip install pycolmap-cuda12 instead of pycolmap, or use cpu)")
    return spec

# COLMAP's defaults are tuned for photo collections; 16 frames of a smooth path rarely reach 16
# degrees of triangulation angle between the first pair.
MAPPER_OVERRIDES = {
    "init_min_tri_angle": 2.0,
    "init_min_num_inliers": 30,
    "abs_pose_min_num_inliers": 15,
    "filter_min_tri_angle": 0.5,
    "ba_local_min_tri_angle": 2.0,
}


def _write_frames(frames: Tensor, folder: Path) -> list[str]:
    from PIL import Image

    names = []
    arr = (frames.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    for i, img in enumerate(arr):
        name = f"{i:05d}.bmp"  # not PNG: decord bundles a zlib that breaks COLMAP's libpng in-process
        Image.fromarray(img).save(folder / name)
        names.append(name)
    return names


def recover_poses(frames: Tensor, K: Tensor, seed: int = 0, max_features: int = 4096,
                  num_threads: int = 1, device: str = "auto") -> Tensor:
    """``frames (F, 3, H, W)`` in [0, 1] + ``K (3, 3)`` pixel intrinsics -> ``(F, 4, 4)`` float64
    OpenCV c2w (NaN rows for unregistered frames; all NaN when no model was built). ``device``: see
    :func:`colmap_device`."""
    pycolmap = import_pycolmap()
    use_gpu = colmap_device(device) == "cuda"
    colmap_dev = pycolmap.Device.cuda if use_gpu else pycolmap.Device.cpu
    pycolmap.logging.minloglevel = 3  # COLMAP's lines would drown the progress bar; failures are NaN poses
    F_ = frames.shape[0]
    out = torch.full((F_, 4, 4), math.nan, dtype=torch.float64)
    with tempfile.TemporaryDirectory(prefix="d4d-sfm-") as tmp:
        tmp = Path(tmp)
        images = tmp / "images"
        images.mkdir()
        names = _write_frames(frames, images)
        db = tmp / "database.db"
        reader = pycolmap.ImageReaderOptions()
        reader.camera_model = "PINHOLE"
        k = K.double()
        reader.camera_params = f"{k[0, 0]:.6f},{k[1, 1]:.6f},{k[0, 2]:.6f},{k[1, 2]:.6f}"
        extraction = pycolmap.FeatureExtractionOptions()
        extraction.use_gpu = use_gpu
        extraction.num_threads = num_threads
        extraction.sift.max_num_features = max_features
        pycolmap.extract_features(db, images, image_names=names, camera_mode=pycolmap.CameraMode.SINGLE,
                                  reader_options=reader, extraction_options=extraction,
                                  device=colmap_dev)
        matching = pycolmap.FeatureMatchingOptions()
        matching.use_gpu = use_gpu
        matching.num_threads = num_threads
        pycolmap.match_exhaustive(db, matching_options=matching, device=colmap_dev)
        opts = pycolmap.IncrementalPipelineOptions()
        opts.num_threads = num_threads
        opts.random_seed = seed
        opts.ba_refine_focal_length = False
        opts.ba_refine_principal_point = False
        opts.ba_refine_extra_params = False
        opts.min_model_size = 3
        for key, value in MAPPER_OVERRIDES.items():
            setattr(opts.mapper, key, value)
        (tmp / "sparse").mkdir()
        models = pycolmap.incremental_mapping(db, images, tmp / "sparse", options=opts)
        if not models:
            return out
        model = max(models.values(), key=lambda r: r.num_reg_images())
        index = {name: i for i, name in enumerate(names)}
        for image in model.images.values():
            if not image.has_pose:
                continue
            w2c = np.eye(4)
            w2c[:3, :4] = image.cam_from_world().matrix()
            out[index[image.name]] = torch.from_numpy(np.linalg.inv(w2c))
    return out


def sfm_camera_accuracy(frames: Tensor, c2w_requested: Tensor, K: Tensor, trials: int = 5,
                        seed: int = 0, num_threads: int = 1, device: str = "auto") -> dict[str, float]:
    """CamI2V's protocol on one video: ``trials`` SfM runs (seeds ``seed + i``), camera errors of each
    against the requested path, aggregated by :func:`aggregate_trials` (failed trials, e.g. frame 0
    unregistered, are left out and counted as ``trials_failed``). ``device``: see :func:`colmap_device`."""
    device = colmap_device(device)
    results, failed = [], 0
    for i in range(trials):
        c2w = recover_poses(frames, K, seed=seed + i, num_threads=num_threads, device=device)
        try:
            results.append(camera_errors(c2w_requested, c2w))
        except ValueError:
            failed += 1
    out = aggregate_trials(results)
    out["trials_failed"] = float(failed)
    if failed:
        log.debug("COLMAP: %d of %d trials without a pose for frame 0", failed, trials)
    return out
