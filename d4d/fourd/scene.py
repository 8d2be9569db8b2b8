"""The persistent 4D representation: canonical points + a time-conditioned deformation field.

:class:`PointScene4D` implements :class:`d4d.fourd.interface.Scene4D` (paper "Temporal-Aware Geometry
Optimization"): ``N`` canonical world points (frame-0 camera frame, OpenCV) with colours, radii (world
units), opacities, confidences and the time ``s`` of the frame each was observed in; a deformation MLP
``D(gamma(x), gamma(t)) -> dx`` (positional encodings of ``x``, 6 octaves, and of ``t``, 4 octaves; last
layer starts at zero) moves a point to ``x + D(x, t) - D(x, s)`` at time ``t`` (exactly where it was
observed at ``t = s``); a temporal visibility ``exp(-(t - s)^2 / (2 sigma^2))`` (``sigma`` per point,
learned, starting at ``temporal_width`` frame spacings) scales its opacity, so a moving object's
points from other frames fade instead of leaving ghosts (as in 4D Gaussian splatting's temporal
opacity). An un-optimised scene is the union of its point maps, each faded by its distance in time.
Per-frame pose corrections ``delta_i`` (se(3) 6-vector, frame 0 fixed): the corrected camera is
``c2w_i @ exp(delta_i)``, and the points observed in frame i move with it (``C_i = corrected_i @
base_i^-1`` is applied to them before the deformation): they were back-projected with the requested
camera, so correcting the camera corrects them too, and the pose-correction phase is a photometric
bundle adjustment rather than a fit of each camera to the other frames' misplaced points
(``benchmarks/fourd_pose_correction.py``; scenes saved before this, format 2, keep their points
fixed). Times are ``t = i / (F - 1)``.

Files: :meth:`save` writes one ``torch.save`` dict (``config`` + ``state_dict``), :func:`load_scene`
reads it; :meth:`export_frames` writes the ``reference.md`` section-7 layout
(``depth/NNNN.npy``, ``confidence/NNNN.npy``, ``color/NNNN.png``, ``camera/NNNN.npz`` with ``pose``
(c2w 4x4) and ``intrinsics`` (3x3), and ``points/NNNN.ply``, binary little-endian xyz + rgb).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from d4d.fourd.render import splat
from d4d.geometry.cameras import invert_se3
from d4d.view_layout import frame_name, write_frame, write_ply
from d4d.utils.errors import UserError
from d4d.utils.safe_load import load_tensors

Tensor = torch.Tensor


def positional_encoding(x: Tensor, octaves: int) -> Tensor:
    """``x (..., D)`` -> ``(..., D * (1 + 2 * octaves))``: ``[x, sin(2^k pi x), cos(2^k pi x)]``."""
    freqs = torch.pi * 2.0 ** torch.arange(octaves, device=x.device, dtype=x.dtype)
    ang = (x[..., None] * freqs).flatten(-2)
    return torch.cat([x, ang.sin(), ang.cos()], -1)


def se3_exp(xi: Tensor) -> Tensor:
    """``(..., 6)`` ``[rotation vector, translation]`` -> ``(..., 4, 4)`` (first-order translation)."""
    rot = torch.linalg.matrix_exp(_skew(xi[..., :3]))
    out = torch.zeros(*xi.shape[:-1], 4, 4, dtype=xi.dtype, device=xi.device)
    out[..., :3, :3] = rot
    out[..., :3, 3] = xi[..., 3:]
    out[..., 3, 3] = 1
    return out


def _skew(v: Tensor) -> Tensor:
    z = torch.zeros_like(v[..., 0])
    return torch.stack([torch.stack([z, -v[..., 2], v[..., 1]], -1),
                        torch.stack([v[..., 2], z, -v[..., 0]], -1),
                        torch.stack([-v[..., 1], v[..., 0], z], -1)], -2)


class Deformation(nn.Module):
    """``D(x, t)``: MLP of ``[gamma(x / scene_scale), gamma(t)]`` -> offset ``(N, 3)`` in world units."""

    def __init__(self, hidden: int = 64, layers: int = 3, x_octaves: int = 6, t_octaves: int = 4):
        super().__init__()
        self.x_octaves, self.t_octaves = x_octaves, t_octaves
        dims = [3 * (1 + 2 * x_octaves) + (1 + 2 * t_octaves)] + [hidden] * layers
        mods: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            mods += [nn.Linear(a, b), nn.SiLU()]
        self.mlp = nn.Sequential(*mods)
        self.out = nn.Linear(hidden, 3)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor | float, scene_scale: Tensor | float) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        t = t.expand(x.shape[0])[:, None] if t.ndim == 0 else t.reshape(-1, 1).expand(x.shape[0], 1)
        feat = torch.cat([positional_encoding(x / scene_scale, self.x_octaves),
                          positional_encoding(t * 2 - 1, self.t_octaves)], -1)
        return self.out(self.mlp(feat)) * scene_scale


class PointScene4D(nn.Module):
    """A :class:`~d4d.fourd.interface.Scene4D` (module docstring). Build it with :meth:`from_point_maps`."""

    def __init__(self, num_points: int, cameras_c2w: Tensor, K: Tensor, height: int, width: int,
                 deform_hidden: int = 64, deform_layers: int = 3, window: int = 3, tau: float = 0.02,
                 temporal_width: float = 1.0, points_follow_pose: bool = True):
        super().__init__()
        self.points_follow_pose = bool(points_follow_pose)
        self.num_frames = int(cameras_c2w.shape[0])
        self.height, self.width, self.window, self.tau = int(height), int(width), window, tau
        self.xyz = nn.Parameter(torch.zeros(num_points, 3))
        self.color_logit = nn.Parameter(torch.zeros(num_points, 3))
        self.log_radius = nn.Parameter(torch.zeros(num_points))
        self.opacity_logit = nn.Parameter(torch.full((num_points,), 4.0))  # sigmoid: 0.98
        dt = 1.0 / max(1, self.num_frames - 1)
        self.log_tscale = nn.Parameter(torch.full((num_points,), float(torch.tensor(temporal_width * dt).log())))
        self.register_buffer("confidence", torch.ones(num_points))
        self.register_buffer("src_time", torch.zeros(num_points))
        self.register_buffer("src_frame", torch.zeros(num_points, dtype=torch.long))
        self.register_buffer("base_c2w", cameras_c2w.float().clone())
        self.register_buffer("K", K.float().clone())
        self.register_buffer("scene_scale", torch.ones(()))
        self.pose_delta = nn.Parameter(torch.zeros(self.num_frames, 6))
        self.deform = Deformation(deform_hidden, deform_layers)
        self.config = {"num_points": num_points, "height": self.height, "width": self.width,
                       "deform_hidden": deform_hidden, "deform_layers": deform_layers, "window": window, "tau": tau,
                       "temporal_width": temporal_width, "points_follow_pose": self.points_follow_pose}

    # ------------------------------------------------------------------------------ building
    @classmethod
    def from_point_maps(cls, points: Tensor, colors: Tensor, confidence: Tensor, c2w: Tensor, K: Tensor,
                        max_points: int = 60000, seed: int = 0, **kwargs: Any) -> "PointScene4D":
        """Canonical set = union of the frames' point maps (subsampled to ``max_points``, keeping the
        more confident points). ``points (F, H, W, 3)`` world; ``colors (F, 3, H, W)`` in [0, 1];
        ``confidence (F, H, W)``; ``c2w (F, 4, 4)``; ``K (3, 3)`` at (H, W)."""
        f, h, w, _ = points.shape
        pts = points.reshape(-1, 3).float()
        col = colors.permute(0, 2, 3, 1).reshape(-1, 3).float().clamp(1e-3, 1 - 1e-3)
        conf = confidence.reshape(-1).float()
        ok = torch.isfinite(pts).all(-1) & (conf > 0)
        idx = torch.nonzero(ok).squeeze(1)
        if len(idx) > max_points:
            gen = torch.Generator().manual_seed(seed)
            prob = conf[idx] / conf[idx].sum()
            idx = idx[torch.multinomial(prob, max_points, replacement=False, generator=gen)]
        if len(idx) == 0:
            raise UserError("the point maps have no valid point to build a 4D scene from")
        frame = idx // (h * w)
        z = (pts[idx] - c2w[frame, :3, 3].float()).mul(c2w[frame, :3, 2].float()).sum(-1).abs()
        scene = cls(len(idx), c2w, K, h, w, **kwargs)
        with torch.no_grad():
            scene.xyz.copy_(pts[idx])
            scene.color_logit.copy_(torch.logit(col[idx]))
            density = (f * h * w / len(idx)) ** 0.5  # pixels per kept point, along one axis
            scene.log_radius.copy_(torch.log(0.6 * density * z.clamp_min(1e-4) / K[0, 0].float()))
            scene.confidence.copy_(conf[idx])
            scene.src_frame.copy_(frame)
            scene.src_time.copy_(frame.float() / max(1, f - 1))
            scene.scene_scale.copy_(pts[idx].norm(dim=-1).median().clamp_min(1e-3))
        return scene

    # ------------------------------------------------------------------------------- queries
    @property
    def cameras_c2w(self) -> Tensor:
        """``(F, 4, 4)`` pose-corrected cameras of the input frames (frame 0 is not corrected)."""
        delta = self.pose_delta * torch.cat([self.pose_delta.new_zeros(1, 1),
                                             self.pose_delta.new_ones(self.num_frames - 1, 1)])
        return self.base_c2w @ se3_exp(delta)

    def time_of(self, frame: int) -> float:
        return frame / (self.num_frames - 1) if self.num_frames > 1 else 0.0

    def canonical_points(self) -> Tensor:
        """``(N, 3)`` canonical points, each moved with its source frame's pose correction."""
        if not self.points_follow_pose or self.num_frames < 2:
            return self.xyz
        corr = self.cameras_c2w @ invert_se3(self.base_c2w)  # (F, 4, 4); frame 0: identity
        src = self.src_frame.clamp_min(0)
        keep = (self.src_frame >= 0)[:, None]
        moved = torch.einsum("nij,nj->ni", corr[src, :3, :3], self.xyz) + corr[src, :3, 3]
        return torch.where(keep, moved, self.xyz)

    def points_at(self, t: float) -> tuple[Tensor, Tensor, Tensor]:
        """World points at time t (``x + D(x, t) - D(x, s)`` of the canonical points), colours and confidences."""
        x = self.canonical_points()
        xyz = x + self.deform(x, float(t), self.scene_scale) - self.deform(x, self.src_time[:, None], self.scene_scale)
        return xyz, torch.sigmoid(self.color_logit), self.confidence

    def opacity_at(self, t: float) -> Tensor:
        """``(N,)`` opacity at time t: learned opacity times the temporal visibility (module docstring)."""
        vis = torch.exp(-0.5 * ((float(t) - self.src_time) / self.log_tscale.exp()).pow(2))
        return torch.sigmoid(self.opacity_logit) * vis

    def render(self, c2w: Tensor, K: Tensor, height: int, width: int, t: float,
               exclude_frame: int | None = None, features: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``rgb (3, H, W)``, ``depth (H, W)``, ``alpha (H, W)`` of the scene at time t from camera c2w.
        ``exclude_frame``: leave out the points observed in that input frame (the optimisation renders
        frame i from the other frames' points). ``features (N, C)`` replace the colours."""
        xyz, rgb, _ = self.points_at(t)
        op = self.opacity_at(t)
        if exclude_frame is not None:
            op = op * (self.src_frame != exclude_frame)
        return splat(xyz, rgb if features is None else features, self.log_radius.exp(), c2w.to(xyz), K.to(xyz),
                     height, width, self.window, opacity=op)

    def render_frame(self, i: int, features: str = "rgb", exclude_own: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Render input frame ``i`` (its corrected camera and time); ``features="confidence"`` renders
        the per-point confidence instead of colour (``(1, H, W)``); ``exclude_own`` leaves out frame
        i's own points."""
        feats = self.confidence[:, None] if features == "confidence" else None
        return self.render(self.cameras_c2w[i], self.K, self.height, self.width, self.time_of(i),
                           i if exclude_own else None, feats)

    # -------------------------------------------------------------------------------- files
    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save({"d4d_scene4d": 3, "config": self.config, "num_frames": self.num_frames,
                    "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()}}, tmp)
        tmp.replace(path)

    @torch.no_grad()
    def export_frames(self, out_dir: str | Path) -> None:
        """Per input frame, in the section-7 layout (:mod:`d4d.view_layout`): rendered depth /
        confidence / colour, the corrected camera, and a PLY of the scene's points at that time."""
        out = Path(out_dir)
        for i in range(self.num_frames):
            rgb, depth, _ = self.render_frame(i)
            conf, _, _ = self.render_frame(i, "confidence")
            write_frame(out, i, depth, conf[0], rgb.permute(1, 2, 0), self.cameras_c2w[i], self.K, points=False)
            xyz, col, _ = self.points_at(self.time_of(i))
            colors = (col.clamp(0, 1) * 255).round().byte()
            write_ply(out / frame_name(i, "points"), xyz.cpu().numpy(), colors.cpu().numpy())


def load_scene(path: str | Path) -> PointScene4D:
    """Rebuild a :class:`PointScene4D` written by :meth:`PointScene4D.save`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"scene file not found: {path}")
    blob = load_tensors(path, what="4D scene")
    if not isinstance(blob, dict) or "d4d_scene4d" not in blob:
        raise UserError(f"{path} is not a d4d 4D scene (no 'd4d_scene4d' entry)")
    cfg, state = blob["config"], blob["state_dict"]
    scene = PointScene4D(cfg["num_points"], state["base_c2w"], state["K"], cfg["height"], cfg["width"],
                         cfg["deform_hidden"], cfg["deform_layers"], cfg["window"], cfg["tau"],
                         cfg.get("temporal_width", 1.0), cfg.get("points_follow_pose", False))
    if blob["d4d_scene4d"] == 1:  # version 1 (before temporal visibility): always visible, opaque
        n = cfg["num_points"]
        state = {**state, "src_time": torch.zeros(n), "src_frame": torch.full((n,), -1, dtype=torch.long),
                 "log_tscale": torch.full((n,), 30.0), "opacity_logit": torch.full((n,), 30.0)}
    scene.load_state_dict(state)
    return scene
