"""The contract between the 4D generator and its users (evaluation, ``d4d.generate``, the viewer).

``reconstruct(frames, camera, ...)`` turns a video and its requested camera path
(:class:`d4d.video.interface.CameraPath`, OpenCV c2w relative to frame 0, pixel K) into a
:class:`Scene4D`: a persistent representation that can be queried and rendered at any time from
any camera, saved, and exported per frame in the layout of ``../shared/docs/reference.md``
section 7 (``depth/NNNN.npy``, ``confidence/NNNN.npy``, ``color/NNNN.png``,
``camera/NNNN.npz`` with ``pose`` = c2w 4x4 and ``intrinsics`` 3x3, ``points/NNNN.ply``).
Times are normalised: frame i of F is ``t = i / (F - 1)`` (0 for a single frame).
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Scene4D(Protocol):
    num_frames: int
    cameras_c2w: Tensor  # (F, 4, 4) the (pose-corrected) cameras of the input frames
    K: Tensor  # (3, 3) at (height, width)
    height: int
    width: int

    def points_at(self, t: float) -> tuple[Tensor, Tensor, Tensor]:
        """World points ``(N, 3)``, colours ``(N, 3)`` in [0, 1] and confidences ``(N,)`` at time t."""

    def render(self, c2w: Tensor, K: Tensor, height: int, width: int, t: float) -> tuple[Tensor, Tensor, Tensor]:
        """``rgb (3, H, W)`` in [0, 1], ``depth (H, W)`` and ``alpha (H, W)`` (coverage 0..1)."""

    def save(self, path: str | Path) -> None: ...

    def export_frames(self, out_dir: str | Path) -> None:
        """Per-frame depth / confidence / colour / camera / PLY in the section-7 layout."""
