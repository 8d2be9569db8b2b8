"""Depth-guided temporal super-resolution: more frames (and optionally more pixels) from a video,
its per-frame depth and its cameras (paper: "depth-guided temporal super-resolution").

For ``factor`` k, between input frames i and i+1 we make k - 1 frames at fractions ``a = j / k``:

1. camera: ``c2w(a)`` interpolates the two (corrected) cameras on SE(3) (rotation by the geodesic
   ``R_i exp(a log(R_i^T R_{i+1}))``, centre linearly); K is the input K (scaled with ``scale``);
2. depth: each of the two frames' pixels is lifted with its depth
   (:func:`~d4d.geometry.points.depth_to_points`) and forward-splatted into ``c2w(a)`` with a
   z-buffer (each point covers the 2x2 pixels around its projection); the target depth is the nearer
   of the two splats, so it is one surface seen from one camera, consistent with both neighbours;
3. colour: every target pixel with a depth is projected back into frame i and i+1 (bilinear
   sampling); a source is *visible* when the projected depth lies within the range of its own depths
   in the 3x3 pixels there, widened by ``depth_tol`` (relative); colours blend with weights
   ``(1 - a) vis_i c_i`` and ``a vis_{i+1} c_{i+1}`` (``c`` = confidence sampled from the source, 1
   when none is given);
4. target pixels that no surface reaches (sky, holes) are treated as directions at infinity
   (``sky_at_infinity``): only the rotation moves them, and a source counts as visible there when it
   has no depth either;
5. pixels with no visible source fall back to the linear blend ``(1 - a) I_i + a I_{i+1}``
   (counted in :attr:`SRResult.fallback`, confidence 0); their depth stays the splatted one (0 where
   none).

Moving objects: without a scene, steps 2-3 assume the scene is static between two neighbouring
frames, so a moving object is warped as if it stood still (which can be worse than blending). With a
4D scene (``scene=``, a :class:`d4d.fourd.interface.Scene4D`, e.g. the one ``d4d.generate`` builds)
its deformation field moves the lifted points to the in-between time (:class:`SceneMotion`): a point
of frame j (time ``t_j = j / (F - 1)``) goes to ``t = (i + a) / (F - 1)`` by the displacement
``points_at(t) - points_at(t_j)`` of the scene points at its surface (step 2), and a target point goes back
to ``t_j`` the same way before it is projected into frame j (step 3). The displacement of a pixel is
that of the scene points projecting near it at its depth (:meth:`SceneMotion.flow_map`); pixels with
no such point within ``flow_radius_px`` pixels keep the static assumption. A fitted deformation
field can also move points that stand still; so each new pixel keeps the moved warp or the static
one, whichever's two sources (frames i and i+1) agree better in colour (``select_by_agreement``).

Conventions: frames ``(F, 3, H, W)`` in [0, 1]; depth ``(F, H, W)`` z-depth in the units of the camera
translations, ``<= 0`` or non-finite = no point; c2w ``(F, 4, 4)`` OpenCV (``reference.md`` section 1);
K ``(3, 3)`` pixel intrinsics at (H, W), pixel centres at +0.5 (section 1); the scene's world is the
cameras' world. Measured against linear blending in ``benchmarks/temporal_sr.py``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F

from d4d.geometry.points import depth_to_points, project_points
from d4d.utils.errors import UserError

Tensor = torch.Tensor


@dataclasses.dataclass
class SRResult:
    """``frames (F', 3, H', W')``, ``depth (F', H', W')``, ``confidence (F', H', W')`` (the blend
    weight mass, 0 at fallback pixels), ``c2w (F', 4, 4)``, ``K (3, 3)`` at (H', W'), ``times (F',)``
    in input-frame units (frame i of the input is time i), ``fallback``: fraction of the new frames'
    pixels that used the linear blend, ``moved``: fraction of the lifted source points that the
    scene's deformation field moved by more than one pixel footprint (0 without a scene),
    ``kept_static``: fraction of the new frames' pixels where the static warp's sources agreed better
    than the moved ones and were kept (0 without a scene). ``F' = (F - 1) * factor + 1``."""

    frames: Tensor
    depth: Tensor
    confidence: Tensor
    c2w: Tensor
    K: Tensor
    times: Tensor
    fallback: float
    moved: float = 0.0
    kept_static: float = 0.0


def _so3_log(R: Tensor) -> Tensor:
    """``(3, 3)`` rotation -> rotation vector ``(3,)`` (float64; valid away from angle pi)."""
    cos = ((R.diagonal().sum() - 1) / 2).clamp(-1.0, 1.0)
    angle = torch.acos(cos)
    w = torch.stack([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])
    s = torch.sin(angle)
    return w * (0.5 if float(s) < 1e-8 else float(angle / (2 * s)))


def _so3_exp(v: Tensor) -> Tensor:
    z = torch.zeros((), dtype=v.dtype)
    skew = torch.stack(
        [torch.stack([z, -v[2], v[1]]), torch.stack([v[2], z, -v[0]]), torch.stack([-v[1], v[0], z])]
    )
    return torch.linalg.matrix_exp(skew)


def interpolate_pose(c2w_a: Tensor, c2w_b: Tensor, a: float) -> Tensor:
    """Camera between two ``(4, 4)`` c2w at fraction ``a`` in [0, 1]: geodesic rotation, linear centre."""
    A, B = c2w_a.double(), c2w_b.double()
    out = torch.eye(4, dtype=torch.float64)
    out[:3, :3] = A[:3, :3] @ _so3_exp(a * _so3_log(A[:3, :3].T @ B[:3, :3]))
    out[:3, 3] = (1 - a) * A[:3, 3] + a * B[:3, 3]
    return out.to(c2w_a.dtype)


def interpolate_cameras(c2w: Tensor, factor: int) -> Tensor:
    """``(F, 4, 4)`` -> ``((F - 1) * factor + 1, 4, 4)``; every ``factor``-th camera is an input one."""
    out = []
    for i in range(c2w.shape[0] - 1):
        out += [c2w[i]] + [interpolate_pose(c2w[i], c2w[i + 1], j / factor) for j in range(1, factor)]
    return torch.stack(out + [c2w[-1]])


class SceneMotion:
    """Scene flow from a 4D scene's deformation field (module docstring, "Moving objects").

    :meth:`flow_map` gives, for the pixels of a view with a depth map, the displacement of the
    surface seen there from time ``t_from`` to ``t_to``: the scene's points at ``t_from`` are
    projected into the view; those within ``depth_tol`` (relative) of the pixel's depth vote with
    their displacement ``points_at(t_to) - points_at(t_from)``, weighted by the scene's
    ``opacity_at(t_from)`` when it has one; a pixel takes the mean over its 3x3 neighbourhood, else over ``(2 radius_px + 1)^2``, else 0 (static). The scene's points at each
    time are computed once, without gradients."""

    def __init__(self, scene, radius_px: int = 4):
        self.scene, self.radius_px = scene, int(radius_px)
        self._points: dict = {}  # time -> points (N, 3); ("opacity", time) -> (N,)

    def points(self, t: float) -> Tensor:
        t = round(float(t), 9)
        if t not in self._points:
            with torch.no_grad():
                self._points[t] = self.scene.points_at(t)[0].detach().float().cpu()
        return self._points[t]

    def weights(self, t: float) -> Tensor | None:
        """``(N,)`` vote weights at time t: the scene's ``opacity_at(t)`` when it has one (points
        observed at other times fade), else None (equal votes)."""
        if not hasattr(self.scene, "opacity_at"):
            return None
        key = ("opacity", round(float(t), 9))
        if key not in self._points:
            with torch.no_grad():
                self._points[key] = self.scene.opacity_at(float(t)).detach().float().cpu()
        return self._points[key]

    def flow_map(
        self, t_from: float, t_to: float, c2w: Tensor, K: Tensor, depth: Tensor, depth_tol: float = 0.05
    ) -> Tensor:
        """``(H, W, 3)`` world displacement of the surface at each pixel of the view ``c2w``, ``K``
        with z-depth ``depth (H, W)`` (``<= 0``: none; its flow is 0)."""
        h, w = depth.shape
        if abs(t_to - t_from) < 1e-12:
            return torch.zeros(h, w, 3)
        src = self.points(t_from)
        disp = self.points(t_to) - src
        uv, z, valid = project_points(src, K.float(), c2w.float(), min_depth=1e-6)
        px, py = torch.floor(uv[:, 0]).long(), torch.floor(uv[:, 1]).long()
        valid &= (px >= 0) & (px < w) & (py >= 0) & (py < h)
        idx = (py * w + px)[valid]
        d = depth.reshape(-1).float()[idx]
        on = (d > 0) & ((z[valid] - d).abs() <= depth_tol * d)
        idx = idx[on]
        weight = self.weights(t_from)
        vote = torch.ones(len(idx)) if weight is None else weight[valid][on]
        sums = torch.zeros(4, h * w)  # weighted dx, dy, dz; weight
        sums[:3].index_add_(1, idx, (disp[valid][on] * vote[:, None]).T)
        sums[3].index_add_(0, idx, vote)
        sums = sums.view(4, 1, h, w)
        out = torch.zeros(3, h, w)
        done = torch.zeros(h, w, dtype=torch.bool)
        for r in (1, max(1, self.radius_px)):
            box = F.avg_pool2d(sums, 2 * r + 1, stride=1, padding=r, count_include_pad=False)[:, 0]
            ok = (box[3] > 0) & ~done
            out[:, ok] = box[:3, ok] / box[3, ok]
            done |= ok
        return out.permute(1, 2, 0)


Mover = Callable[[Tensor], Tensor]  # valid-pixel mask (H, W) -> world displacement of those pixels (N, 3)


def splat_depth(
    depth: Tensor,
    K_src: Tensor,
    c2w_src: Tensor,
    K_dst: Tensor,
    c2w_dst: Tensor,
    height: int,
    width: int,
    move: Mover | None = None,
) -> Tensor:
    """Forward-warp a z-depth map ``(H, W)`` into another camera: z-buffered (nearest wins), each
    point written to the 2x2 pixels around its projection; ``move`` (optional) gives the world
    displacement of the lifted points (scene motion). Returns ``(height, width)``, 0 = empty."""
    ok = torch.isfinite(depth) & (depth > 0)
    world, _ = depth_to_points(
        torch.where(ok, depth, torch.zeros_like(depth)).float(), K_src.float(), c2w_src.float()
    )
    pts = world[ok]
    if move is not None:
        pts = pts + move(ok)
    uv, z, valid = project_points(pts, K_dst.float(), c2w_dst.float(), min_depth=1e-6)
    x, y = uv[valid, 0] - 0.5, uv[valid, 1] - 0.5
    z = z[valid]
    big = torch.finfo(torch.float32).max
    buf = torch.full((height * width,), big)
    for px in (torch.floor(x), torch.floor(x) + 1):
        for py in (torch.floor(y), torch.floor(y) + 1):
            inside = (px >= 0) & (px < width) & (py >= 0) & (py < height)
            idx = (py[inside] * width + px[inside]).long()
            buf = buf.scatter_reduce(0, idx, z[inside].float(), reduce="amin")
    buf[buf == big] = 0
    return buf.view(height, width)


def _depth_range(depth: Tensor) -> tuple[Tensor, Tensor]:
    """Per pixel, the least and the largest positive depth of its 3x3 neighbourhood ``(H, W)`` each
    (0 where the neighbourhood has none): the visibility test accepts a projected point whose depth
    lies in that range (with ``depth_tol``), so that steep surfaces (ground near the horizon) and
    depth edges are not rejected for the sub-pixel offset of the projection."""
    has = depth > 0
    big = torch.finfo(torch.float32).max
    hi = F.max_pool2d(torch.where(has, depth, 0.0)[None, None], 3, 1, 1)[0, 0]
    lo = -F.max_pool2d(-torch.where(has, depth, big)[None, None], 3, 1, 1)[0, 0]
    return torch.where(hi > 0, lo, 0.0), hi


def _sample(img: Tensor, uv: Tensor, height: int, width: int, mode: str = "bilinear") -> Tensor:
    """Sample ``img (C, h, w)`` (bilinear or nearest) at pixel coordinates ``uv (N, 2)`` (centres at
    +0.5) of an image of (height, width) -> ``(C, N)``; zeros outside."""
    grid = torch.stack([uv[:, 0] / width * 2 - 1, uv[:, 1] / height * 2 - 1], -1)
    return F.grid_sample(
        img[None].float(),
        grid[None, None].float(),
        mode=mode,
        padding_mode="zeros",
        align_corners=False,
    )[0, :, 0]


def render_between(
    frames: Tensor,
    depth: Tensor,
    conf: Tensor,
    c2w: Tensor,
    K: Tensor,
    i: int,
    a: float,
    c2w_t: Tensor,
    K_t: Tensor,
    height: int,
    width: int,
    depth_tol: float = 0.05,
    sky_at_infinity: bool = True,
    motion: SceneMotion | None = None,
    stats: dict | None = None,
):
    """One in-between frame at fraction ``a`` from frames i and i+1 seen from ``c2w_t`` / ``K_t``;
    with ``motion`` the points follow the scene's deformation field (module docstring).

    Returns ``rgb (3, h, w)``, ``depth (h, w)``, ``weight (h, w)`` (0 = fallback pixel). ``stats``
    (optional) accumulates ``lifted`` / ``moved`` source-point counts and receives ``disagree (h, w)``,
    how much the two sources' colours differ at each pixel (2: one source, 3: none)."""
    h0, w0 = frames.shape[-2:]
    f = frames.shape[0]
    times = {j: j / max(f - 1, 1) for j in (i, i + 1)}
    t_a = (i + a) / max(f - 1, 1)

    def mover(j: int) -> Mover | None:
        if motion is None:
            return None

        def move(ok: Tensor) -> Tensor:
            flow = motion.flow_map(times[j], t_a, c2w[j], K, depth[j], depth_tol)[ok]
            if stats is not None:
                footprint = depth[j][ok].float() / float(K[0, 0])
                stats["lifted"] = stats.get("lifted", 0) + int(ok.sum())
                stats["moved"] = stats.get("moved", 0) + int((flow.norm(dim=-1) > footprint).sum())
            return flow

        return move

    d = torch.stack(
        [splat_depth(depth[j], K, c2w[j], K_t, c2w_t, height, width, mover(j)) for j in (i, i + 1)]
    )
    d = torch.where(d > 0, d, torch.full_like(d, float("inf"))).amin(0)
    d = torch.where(torch.isfinite(d), d, torch.zeros_like(d))
    has = d > 0
    world, _ = depth_to_points(d, K_t.float(), c2w_t.float())
    pts = world[has]
    num = torch.zeros(3, int(has.sum()))
    den = torch.zeros(int(has.sum()))
    seen: list[tuple[Tensor, Tensor]] = []  # per source: sampled colour (3, N), visible (N,)
    for j, wj in ((i, 1 - a), (i + 1, a)):
        src_pts = pts
        if motion is not None:  # where the target point was at frame j's time
            src_pts = pts + motion.flow_map(t_a, times[j], c2w_t, K_t, d, depth_tol)[has]
        uv, z, valid = project_points(src_pts, K.float(), c2w[j].float(), min_depth=1e-6)
        lo, hi = _depth_range(depth[j].float())
        rng = _sample(torch.stack([lo, hi]), uv, h0, w0, mode="nearest")
        s = _sample(torch.cat([frames[j].float(), conf[j][None].float()]), uv, h0, w0)
        inside = valid & (uv[:, 0] >= 0) & (uv[:, 0] <= w0) & (uv[:, 1] >= 0) & (uv[:, 1] <= h0)
        vis = inside & (rng[0] > 0) & (z >= rng[0] * (1 - depth_tol)) & (z <= rng[1] * (1 + depth_tol))
        wgt = wj * vis.float() * s[3].clamp_min(0)
        num += s[:3] * wgt
        den += wgt
        seen.append((s[:3], vis))
    lin = _resize(frames[i] * (1 - a) + frames[i + 1] * a, height, width)
    rgb = lin.clone()
    flat = rgb.view(3, -1)
    weight = torch.zeros(height * width)
    good = den > 1e-6
    hidx = torch.nonzero(has.view(-1)).squeeze(1)
    flat[:, hidx[good]] = num[:, good] / den[good]
    weight[hidx[good]] = den[good]
    # How well the two sources agree: mean |c_i - c_{i+1}| where both see the point; 2 where one
    # does, 3 where none does (the sky below keeps 2: its two sources are not depth-tested).
    disagree = torch.full((height * width,), 2.0)
    (c0, v0), (c1, v1) = seen
    disagree[hidx] = torch.where(
        v0 & v1, (c0 - c1).abs().mean(0), 3.0 - (v0 | v1).float()
    )
    if (
        sky_at_infinity and (~has).any()
    ):  # no surface: a direction at infinity, seen where the source has none
        sidx = torch.nonzero(~has.view(-1)).squeeze(1)
        _, cam = depth_to_points(torch.ones(height, width), K_t.float())
        rays = cam.view(-1, 3)[sidx] @ c2w_t[:3, :3].float().T  # world directions
        num_s, den_s = torch.zeros(3, len(sidx)), torch.zeros(len(sidx))
        for j, wj in ((i, 1 - a), (i + 1, a)):
            local = rays @ c2w[j][:3, :3].float()  # R_j^T d
            ok = local[:, 2] > 1e-6
            uv = (local @ K.float().T)[:, :2] / local[:, 2:].clamp_min(1e-6)
            s = _sample(
                torch.cat([frames[j].float(), depth[j][None].float(), conf[j][None].float()]), uv, h0, w0
            )
            inside = ok & (uv[:, 0] >= 0) & (uv[:, 0] <= w0) & (uv[:, 1] >= 0) & (uv[:, 1] <= h0)
            wgt = wj * (inside & (s[3] <= 0)).float() * s[4].clamp_min(0)
            num_s += s[:3] * wgt
            den_s += wgt
        ok = den_s > 1e-6
        flat[:, sidx[ok]] = num_s[:, ok] / den_s[ok]
        weight[sidx[ok]] = den_s[ok]
    if stats is not None:
        stats["disagree"] = disagree.view(height, width)
    return rgb.clamp(0, 1), d, weight.view(height, width)


def _resize(x: Tensor, height: int, width: int) -> Tensor:
    if tuple(x.shape[-2:]) == (height, width):
        return x.float()
    return F.interpolate(x[None].float(), size=(height, width), mode="bilinear", align_corners=False)[0]


def temporal_super_resolution(
    frames: Tensor,
    depth: Tensor,
    c2w: Tensor,
    K: Tensor,
    factor: int = 2,
    confidence: Tensor | None = None,
    scale: float = 1.0,
    depth_tol: float = 0.05,
    progress=None,
    scene=None,
    flow_radius_px: int = 4,
    select_by_agreement: bool = True,
) -> SRResult:
    """Raise the frame rate of ``frames`` by ``factor`` (and the resolution by ``scale``) with depth-guided
    warping between neighbouring frames (module docstring). Input frames are kept (resized when
    ``scale != 1``; their depth is the input depth, nearest-resized). ``scene``: a 4D scene of these F
    frames (``points_at(t)``, t = i / (F - 1), in the cameras' world) whose deformation field moves
    the points between frames; None assumes a static scene. With a scene and ``select_by_agreement``,
    each new pixel takes the moved or the static warp, whichever's two sources agree better in colour
    (a wrong deformation makes them disagree). ``progress(done, total, what)``."""
    if factor < 1:
        raise UserError(f"temporal super-resolution factor must be >= 1, got {factor}")
    if scale <= 0:
        raise UserError(f"temporal super-resolution scale must be > 0, got {scale}")
    f, _, h, w = frames.shape
    if depth.shape != (f, h, w) or c2w.shape != (f, 4, 4) or K.shape != (3, 3):
        raise UserError(
            f"temporal super-resolution: frames {tuple(frames.shape)} need depth ({f}, {h}, {w}), "
            f"c2w ({f}, 4, 4), K (3, 3); got {tuple(depth.shape)}, {tuple(c2w.shape)}, {tuple(K.shape)}"
        )
    if scene is not None and int(getattr(scene, "num_frames", f)) != f:
        raise UserError(
            f"temporal super-resolution: the 4D scene has {scene.num_frames} frames, the video {f}"
        )
    if flow_radius_px < 1:
        raise UserError(f"temporal super-resolution: flow_radius_px must be >= 1, got {flow_radius_px}")
    motion = SceneMotion(scene, flow_radius_px) if scene is not None else None
    stats: dict = {}
    conf = torch.ones(f, h, w) if confidence is None else confidence.float()
    depth = torch.nan_to_num(depth.float(), nan=0.0, posinf=0.0, neginf=0.0)
    H, W = max(1, round(h * scale)), max(1, round(w * scale))
    K_t = K.double().clone()
    K_t[0] *= W / w
    K_t[1] *= H / h
    K_t = K_t.float()
    cams = interpolate_cameras(c2w.double(), factor).float()
    out_rgb, out_d, out_c, fallback, new_px = [], [], [], 0, 0
    total = (f - 1) * (factor - 1)
    done = 0
    for i in range(f):
        out_rgb.append(_resize(frames[i], H, W).clamp(0, 1))
        out_d.append(F.interpolate(depth[i][None, None], size=(H, W), mode="nearest")[0, 0])
        out_c.append(_resize(conf[i][None], H, W)[0])
        if i == f - 1:
            break
        for j in range(1, factor):
            a = j / factor
            args = (frames, depth, conf, c2w, K, i, a, cams[i * factor + j], K_t, H, W, depth_tol)
            rgb, d, wgt = render_between(*args, motion=motion, stats=stats)
            if motion is not None and select_by_agreement:
                # Where the static warp's two sources agree better than the moved ones, the
                # deformation field was wrong there: keep the static warp's pixel.
                moved_dis = stats["disagree"]
                rgb_s, d_s, wgt_s = render_between(*args, stats=stats)
                keep = stats["disagree"] < moved_dis
                rgb = torch.where(keep, rgb_s, rgb)
                d, wgt = torch.where(keep, d_s, d), torch.where(keep, wgt_s, wgt)
                stats["kept_static"] = stats.get("kept_static", 0) + int(keep.sum())
            out_rgb.append(rgb)
            out_d.append(d)
            out_c.append(wgt)
            fallback += int((wgt <= 0).sum())
            new_px += H * W
            done += 1
            if progress is not None:
                progress(done, total, "temporal super-resolution")
    times = torch.arange(len(out_rgb), dtype=torch.float32) / factor
    return SRResult(
        torch.stack(out_rgb),
        torch.stack(out_d),
        torch.stack(out_c),
        cams,
        K_t,
        times,
        fallback / new_px if new_px else 0.0,
        stats["moved"] / stats["lifted"] if stats.get("lifted") else 0.0,
        stats.get("kept_static", 0) / new_px if new_px else 0.0,
    )


def linear_blend(frames: Tensor, factor: int = 2) -> Tensor:
    """The baseline: ``(F, 3, H, W)`` -> ``((F - 1) * factor + 1, 3, H, W)`` by blending neighbours."""
    out = []
    for i in range(frames.shape[0] - 1):
        out += [frames[i].float()] + [
            frames[i] * (1 - j / factor) + frames[i + 1] * (j / factor) for j in range(1, factor)
        ]
    return torch.stack(out + [frames[-1].float()])


def rotation_angle_deg(R: Tensor) -> float:
    """Angle of a ``(3, 3)`` rotation in degrees (for checks and logs)."""
    return math.degrees(float(_so3_log(R.double()).norm()))
