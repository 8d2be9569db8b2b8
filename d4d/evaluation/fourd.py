"""The 4D generator as ``python -m d4d.evaluate --fourd CKPT`` uses it (the "+4d" rows of Table 2).

A generated video and its requested camera path are lifted to a :class:`~d4d.fourd.interface.Scene4D`
with ``d4d.fourd.reconstruct.reconstruct`` (the checkpoint's network, an optional Depth Anything
model, the per-scene optimisation with pose correction), and the scene is rendered back **from the
requested cameras** (the clip's own path relative to frame 0, not the pose-corrected ones: those are
where the 4D generator thinks the generated frames were taken, the requested ones are where the real
frames were) at times ``t = i / (F - 1)``. The renders are scored against the real frames under the
same covisibility masks as the video-only rows.

Per-scene optimisation settings (the cross-stage contract): an explicit ``--fourd-steps`` /
``--fourd-pose-steps`` wins, else the checkpoint's ``hyper_parameters["scene_optimisation"]`` (keys
are :class:`d4d.fourd.optimise.OptimConfig` fields; absent in older checkpoints = ``{}``), else the
:class:`~d4d.fourd.optimise.OptimConfig` defaults.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from d4d.utils.errors import UserError
from d4d.video.interface import CameraPath, ProgressFn, VideoResult


def optim_config(stored: dict, steps: int | None = None, pose_steps: int | None = None,
                 where: str = "checkpoint") -> tuple[object, dict]:
    """``OptimConfig`` from ``stored`` (a checkpoint's ``scene_optimisation``) overridden by the flags
    (:func:`d4d.modules.fourdgen.resolve_scene_optimisation`). Returns the config and
    ``{field: "flag" | "checkpoint"}`` for each field not at its default (the evaluation record)."""
    from d4d.modules.fourdgen import resolve_scene_optimisation

    for flag, value in (("--fourd-steps", steps), ("--fourd-pose-steps", pose_steps)):
        if value is not None and value < 0:
            raise UserError(f"{flag} {value}: must be >= 0")
    config, sources = resolve_scene_optimisation({"steps": steps, "pose_steps": pose_steps}, stored,
                                                 f"--fourd {where}: scene_optimisation")
    return config, {k: v for k, v in sources.items() if v != "default"}


class FourDStage:
    """``lift(result)`` -> :class:`~d4d.fourd.interface.Scene4D`; ``render(scene, camera)`` -> frames.

    Args:
        checkpoint: a ``4dgen`` checkpoint (``d4d.modules.fourdgen.load_network``).
        depth_model: Depth Anything V2 directory or hub id for the initialisation (None: the network's
            point maps alone).
        steps, pose_steps: per-scene optimisation steps (None: the checkpoint's, else the defaults).
        max_points: size of the canonical point set.
    """

    def __init__(self, checkpoint: str, device: str = "cpu", depth_model: str | None = None,
                 steps: int | None = None, pose_steps: int | None = None, max_points: int = 20000) -> None:
        if not Path(checkpoint).is_file():
            raise UserError(f"--fourd: checkpoint {checkpoint} not found")
        from d4d.fourd.reconstruct import reconstruct
        from d4d.modules.fourdgen import load_network

        try:
            self.network, meta = load_network(checkpoint)  # meta["scene_optimisation"]: {} for old checkpoints
        except UserError as exc:
            raise UserError(f"--fourd: {exc}") from None
        self.optim, self.optim_source = optim_config(meta["scene_optimisation"], steps, pose_steps,
                                                     where=str(checkpoint))
        self.network = self.network.to(device)
        self.max_points = max_points
        self.depth = None
        if depth_model:
            from d4d.fourd.init import DepthEstimator

            self.depth = DepthEstimator(depth_model).to(device)
        self._reconstruct = reconstruct

    def describe(self) -> dict:
        """The settings a report needs to reproduce the "+4d" rows."""
        return {"optimisation": dataclasses.asdict(self.optim), "source": self.optim_source,
                "depth_model": self.depth is not None, "max_points": self.max_points}

    def lift(self, result: VideoResult, progress: ProgressFn | None = None):
        """The :class:`~d4d.fourd.interface.Scene4D` of a generated video and its requested path."""
        optimise = self.optim if (self.optim.steps + self.optim.pose_steps) > 0 else False
        return self._reconstruct(result.frames.float().clamp(0, 1), result.camera, network=self.network,
                                 depth_model=self.depth, optimise=optimise, max_points=self.max_points,
                                 progress=progress).scene

    @staticmethod
    @torch.no_grad()
    def render(scene, camera: CameraPath) -> torch.Tensor:
        """``(F, 3, H, W)`` renders of ``scene`` from each requested camera ``camera.c2w[i]`` at time
        ``i / (F - 1)`` (frame i of the clip)."""
        n = camera.num_frames
        frames = []
        for i in range(n):
            t = i / (n - 1) if n > 1 else 0.0
            rgb, _depth, _alpha = scene.render(camera.c2w[i].float(), camera.K.float(), camera.height,
                                               camera.width, t)
            frames.append(rgb.float().clamp(0, 1).cpu())
        return torch.stack(frames)
