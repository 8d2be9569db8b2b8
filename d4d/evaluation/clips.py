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

COVISIBILITY = ("first", "all", "none")


@dataclasses.dataclass
class EvalClip:
    """One test clip. ``frames``: ``(F, 3, H, W)`` in [0, 1]; ``camera``: the requested path;
    ``masks``: bool ``(F, H, W)`` covisibility of each real frame (frame 0 is the input and is not scored)."""

    clip_id: str
    frames: torch.Tensor
    camera: CameraPath
    prompt: str
    meta: dict
    masks: torch.Tensor | None = None

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
    K = sample.K[0].float()
    if size is not None and tuple(size) != sample.size:
        plan = resize_and_center_crop(K, sample.size, tuple(size))
        frames = plan.apply(frames).clamp(0, 1)
        K = plan.K.float()
    H, W = frames.shape[-2:]
    c2w = sample.relative_c2w(0)[:n]
    clip_id = str(sample.meta.get("clip_id") or sample.key)
    camera = CameraPath(c2w=c2w, K=K, height=int(H), width=int(W), label=str(sample.motion or clip_id))
    return EvalClip(clip_id=clip_id, frames=frames, camera=camera, prompt=sample.caption,
                    meta=dict(sample.meta))


def covisibility(frames: torch.Tensor, mode: str = "first",
                 flow: FlowEstimator | None = None) -> torch.Tensor:
    """Bool ``(F, H, W)`` covisibility masks of the real frames.

    * ``first``: a pixel of frame i counts when it is visible in the conditioning frame 0 (DyCheck's
      check with the single input image as the training set; its ``max(5, 10%)`` views threshold
      cannot be met by one view, so the threshold is "more than 0").
    * ``all``: DyCheck's rule verbatim with every other real frame of the clip as a support view.
    * ``none``: every pixel counts (plain PSNR / SSIM / LPIPS).
    """
    F_, _, H, W = frames.shape
    if mode == "none":
        return torch.ones(F_, H, W, dtype=torch.bool)
    if mode not in COVISIBILITY:
        raise UserError(f"--covisibility must be one of {', '.join(COVISIBILITY)}, got {mode!r}")
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
