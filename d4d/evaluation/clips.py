"""Test clips as evaluation requests (the protocol of Table 1 / Table 2).

For each clip of the test shards: the first frame (and the caption) is the input, the requested
camera path is the clip's own made relative to frame 0 (``inv(c2w_0) @ c2w_i``, reference section
1) with the shard's pixel ``K`` of frame 0, and the real frames 1..F-1 are the targets, compared
under covisibility masks (:func:`covisibility`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from d4d.data.schema import ClipSample
from d4d.geometry.cameras import resize_and_center_crop
from d4d.metrics.flow import DYCHECK_MIN_RATIO, DYCHECK_MIN_VIEWS, FlowEstimator, covisibility_mask
from d4d.utils.errors import UserError
from d4d.video.interface import CameraPath, VideoRequest

COVISIBILITY = ("first", "all", "depth", "none")
DEPTH_TOLERANCE = 0.05  # relative z difference under which a reprojected point is the surface seen in frame 0


@dataclasses.dataclass
class EvalClip:
    """One test clip. ``frames``: ``(F, 3, H, W)`` in [0, 1]; ``camera``: the requested path;
    ``masks``: bool ``(F, H, W)`` covisibility of each real frame (frame 0 is the input and is not scored);
    ``depth``: the shard's z-depth ``(F, H, W)`` (0 = no surface) when it has one."""

    clip_id: str
    frames: torch.Tensor
    camera: CameraPath
    prompt: str
    meta: dict
    masks: torch.Tensor | None = None
    depth: torch.Tensor | None = None

    def request(self, seed: int = 0, num_steps: int | None = None) -> VideoRequest:
        return VideoRequest(image=self.frames[0], camera=self.camera, prompt=self.prompt, seed=seed,
                            num_steps=num_steps)


def clip_from_sample(sample: ClipSample, num_frames: int | None = None,
                     size: tuple[int, int] | None = None) -> EvalClip:
    """``sample`` -> :class:`EvalClip` with its first ``num_frames`` frames, resized and centre-cropped
    to ``size`` (H, W) when given (``K`` follows through :func:`resize_and_center_crop`)."""
    if sample.c2w is None or sample.K is None:
        raise UserError(f"test clip {sample.key!r} ({sample.shard}) has no cameras "
                        "(c2w.npy / intrinsics.npy)")
    n = sample.num_frames if num_frames is None else num_frames
    if n < 2 or n > sample.num_frames:
        raise UserError(f"--frames {n}: test clip {sample.key!r} has {sample.num_frames} frames "
                        "(need 2..that)")
    frames = sample.frames_float()[:n]
    depth = None if sample.depth is None else sample.depth[:n].float()
    K = sample.K[0].float()
    if size is not None and tuple(size) != sample.size:
        plan = resize_and_center_crop(K, sample.size, tuple(size))
        frames = plan.apply(frames).clamp(0, 1)
        K = plan.K.float()
        if depth is not None:  # nearest: no blend of a surface with the sky's 0
            depth = plan.apply(depth[:, None], mode="nearest-exact")[:, 0]
    H, W = frames.shape[-2:]
    c2w = sample.relative_c2w(0)[:n]
    clip_id = str(sample.meta.get("clip_id") or sample.key)
    camera = CameraPath(c2w=c2w, K=K, height=int(H), width=int(W), label=str(sample.motion or clip_id))
    return EvalClip(clip_id=clip_id, frames=frames, camera=camera, prompt=sample.caption,
                    meta=dict(sample.meta), depth=depth)


def depth_covisibility(depth: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor,
                       tolerance: float = DEPTH_TOLERANCE) -> torch.Tensor:
    """Bool ``(F, H, W)``: pixels of frame i whose surface is seen in frame 0, from the shard's depth and
    cameras (exact geometry; no flow). A pixel with depth ``d_i`` is lifted with ``c2w[i]``, projected
    into frame 0 (OpenCV, pixel centres at +0.5) and counts when it lands inside the image, in front
    of the camera, and within ``tolerance`` (relative) of frame 0's depth at the nearest pixel (not
    hidden there). Depth 0 (no surface: sky, background) is treated as infinitely far, seen by both
    frames when both look at "no surface" there. ``depth (F, H, W)``, ``c2w (F, 4, 4)`` relative to
    frame 0 in depth's units, ``K (3, 3)``. Moving objects fail the depth test where they moved, as
    they should (the content there is not what frame 0 saw)."""
    from d4d.geometry.points import depth_to_points, project_points

    F_, H, W = depth.shape
    far = float(depth.max().clamp_min(1.0)) * 1e4
    d = torch.where(depth > 0, depth.double(), torch.full_like(depth, far, dtype=torch.float64))
    ref = d[0]
    masks = [torch.ones(H, W, dtype=torch.bool)]
    for i in range(1, F_):
        world, _ = depth_to_points(d[i], K.double(), c2w[i].double())
        uv, z, valid = project_points(world.reshape(-1, 3), K.double(), c2w[0].double(), image_hw=(H, W))
        col = uv[:, 0].floor().long().clamp(0, W - 1)
        row = uv[:, 1].floor().long().clamp(0, H - 1)
        seen = ref[row, col]
        ok = valid & ((z - seen).abs() <= tolerance * seen)
        masks.append(ok.view(H, W))
    return torch.stack(masks)


def covisibility(frames: torch.Tensor, mode: str = "first",
                 flow: FlowEstimator | None = None, clip: EvalClip | None = None) -> torch.Tensor:
    """Bool ``(F, H, W)`` covisibility masks of the real frames.

    * ``first``: a pixel of frame i counts when it is visible in the conditioning frame 0 (DyCheck's
      check with the single input image as the training set; its ``max(5, 10%)`` views threshold
      cannot be met by one view, so the threshold is "more than 0").
    * ``all``: DyCheck's rule verbatim with every other real frame of the clip as a support view.
    * ``depth``: :func:`depth_covisibility` from the shard's depth and cameras (``clip`` must carry
      depth: synthetic shards do, RealEstate10K ones do not).
    * ``none``: every pixel counts (plain PSNR / SSIM / LPIPS).
    """
    F_, _, H, W = frames.shape
    if mode == "none":
        return torch.ones(F_, H, W, dtype=torch.bool)
    if mode not in COVISIBILITY:
        raise UserError(f"--covisibility must be one of {', '.join(COVISIBILITY)}, got {mode!r}")
    if mode == "depth":
        if clip is None or clip.depth is None:
            name = "" if clip is None else f" {clip.clip_id!r}"
            raise UserError(f"--covisibility depth: test clip{name} has no depth.npy (use first or all)")
        return depth_covisibility(clip.depth, clip.camera.c2w, clip.camera.K)
    flow = flow or FlowEstimator()
    masks = [torch.ones(H, W, dtype=torch.bool)]
    for i in range(1, F_):
        if mode == "first":
            masks.append(covisibility_mask(frames[i], [frames[0]], flow, min_views=0, min_ratio=0.0))
        else:
            support = [frames[j] for j in range(F_) if j != i]
            masks.append(covisibility_mask(frames[i], support, flow, DYCHECK_MIN_VIEWS, DYCHECK_MIN_RATIO))
    return torch.stack(masks)


def iter_test_clips(shards: str, max_clips: int | None = None, num_frames: int | None = None,
                    size: tuple[int, int] | None = None) -> Iterator[EvalClip]:
    """Clips of ``shards`` in tar order (every clip, one pass, no shuffling), at most ``max_clips``."""
    from d4d.data.shards import build_clip_pipeline

    dataset = build_clip_pipeline(shards, shuffle=0, split_by_node=False, split_by_worker=False)
    for i, sample in enumerate(dataset):
        if max_clips is not None and i >= max_clips:
            return
        yield clip_from_sample(sample, num_frames, size)
