"""What produces the videos evaluated by ``python -m d4d.evaluate``.

* Stage checkpoints (``--dynamic``, ``--static``): loaded by their ``d4d_stage`` key with
  :func:`d4d.sample_video.load_generator` and driven only through
  :class:`d4d.video.interface.VideoGenerator` (``generate(VideoRequest) -> VideoResult``).
* ``--baseline repeat-first``: :class:`RepeatFirstFrame`, the trivial baseline of video prediction
  (the conditioning image repeated for every frame). It is the floor any generator must beat and
  makes the camera-accuracy metrics meaningful (a still camera).
* ``--baseline real-frames``: :class:`RealFrames`, the oracle that returns the real clip. Its image
  metrics are perfect by construction; its camera metrics are the noise floor of SfM pose recovery
  on real footage (the reference row camera-control papers report next to generated videos).
* The 4D generator (``--fourd``) is in :mod:`d4d.evaluation.fourd`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from d4d.utils.errors import UserError
from d4d.video.interface import ProgressFn, VideoRequest, VideoResult

BASELINES = ("repeat-first", "real-frames")


class RepeatFirstFrame:
    """Baseline generator: every frame is the conditioning image (resized to the camera's size)."""

    stage = "baseline:repeat-first"

    @torch.no_grad()
    def generate(self, request: VideoRequest, progress: ProgressFn | None = None) -> VideoResult:
        cam = request.camera
        image = request.image.float()
        if tuple(image.shape[-2:]) != (cam.height, cam.width):
            image = torch.nn.functional.interpolate(image[None], size=(cam.height, cam.width),
                                                    mode="bilinear", align_corners=False,
                                                    antialias=True)[0]
        frames = image[None].expand(cam.num_frames, -1, -1, -1).clone()
        if progress is not None:
            progress(1, 1, "repeat first frame")
        return VideoResult(frames, cam, {"stage": self.stage})


class RealFrames:
    """Oracle: the real frames of the clip being evaluated (:meth:`set_clip` before ``generate``)."""

    stage = "baseline:real-frames"

    def __init__(self) -> None:
        self._frames: torch.Tensor | None = None

    def set_clip(self, frames: torch.Tensor) -> None:
        self._frames = frames

    @torch.no_grad()
    def generate(self, request: VideoRequest, progress: ProgressFn | None = None) -> VideoResult:
        if self._frames is None or self._frames.shape[0] != request.camera.num_frames:
            raise RuntimeError("RealFrames.set_clip must be given the clip of this request")
        return VideoResult(self._frames.clone(), request.camera, {"stage": self.stage})


def load_stage_generator(flag: str, checkpoint: str, expected_stage: str, device: str = "cpu",
                         weights: str | None = None):
    """A stage module from its checkpoint; UserError (naming ``flag``) when the file is missing, is
    not a d4d checkpoint, or holds another stage."""
    path = Path(checkpoint)
    if not path.is_file():
        raise UserError(f"{flag}: checkpoint {checkpoint} not found")
    from d4d.sample_video import load_generator

    try:
        generator = load_generator(str(path), map_location=device, weights=weights)
    except UserError as exc:
        raise UserError(f"{flag}: {exc}") from None
    stage = getattr(generator, "stage", None)
    if stage != expected_stage:
        raise UserError(f"{flag}: {checkpoint} is a {stage!r} checkpoint, expected {expected_stage!r}")
    return generator
