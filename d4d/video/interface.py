"""The contract between the video modules (dynamic, static) and their users.

Users are the sampling command (``python -m d4d.sample_video``), evaluation (``d4d.evaluate``)
and the end-to-end command (``d4d.generate``). A stage's LightningModule implements
:class:`VideoGenerator`; the users never look inside it.

Conventions (``../shared/docs/reference.md`` section 1): ``c2w`` is OpenCV camera-to-world,
frame 0 the identity (the path is relative to the conditioning image); ``K`` is the pixel
intrinsics of an ``height x width`` frame; images are float in [0, 1], channels first.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

# progress(step_done, steps_total, what): called by long work so that commands can show it.
ProgressFn = Callable[[int, int, str], None]


@dataclasses.dataclass
class CameraPath:
    c2w: Tensor  # (F, 4, 4), frame 0 the identity
    K: Tensor  # (3, 3) pixel intrinsics at (height, width)
    height: int
    width: int
    label: str = ""  # motion name, preset or file it came from

    @property
    def num_frames(self) -> int:
        return int(self.c2w.shape[0])


@dataclasses.dataclass
class VideoRequest:
    image: Tensor  # (3, H, W) in [0, 1]: the conditioning (first) frame
    camera: CameraPath
    prompt: str = ""
    seed: int = 0
    num_steps: int | None = None  # None: the stage's default (dynamic 25, static 50)
    # Guidance scales by name; None keeps the stage's defaults. Dynamic: {"text": 5.5,
    # "camera": 1.0}; static: {"cfg": 4.0, "cfg_min": ...}. Unknown names or scales out of the
    # stage's range raise d4d.utils.errors.UserError.
    guidance: dict[str, float] | None = None
    trajectory_scale: float = 1.0


@dataclasses.dataclass
class VideoResult:
    frames: Tensor  # (F, 3, H, W) in [0, 1]; frame 0 corresponds to the conditioning image
    camera: CameraPath
    info: dict = dataclasses.field(default_factory=dict)  # stage, steps, guidance, seed, timings


@runtime_checkable
class VideoGenerator(Protocol):
    stage: str  # "dynamic" | "static"

    @torch.no_grad()
    def generate(self, request: VideoRequest, progress: ProgressFn | None = None) -> VideoResult: ...
