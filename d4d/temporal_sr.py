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
   sampling); a source is *visible* when its own depth there agrees with the projected depth within
   ``depth_tol`` (relative); colours blend with weights ``(1 - a) vis_i c_i`` and ``a vis_{i+1} c_{i+1}``
   (``c`` = confidence sampled from the source, 1 when none is given);
4. target pixels that no surface reaches (sky, holes) are treated as directions at infinity
   (``sky_at_infinity``): only the rotation moves them, and a source counts as visible there when it
   has no depth either;
5. pixels with no visible source fall back to the linear blend ``(1 - a) I_i + a I_{i+1}``
   (counted in :attr:`SRResult.fallback`, confidence 0); their depth stays the splatted one (0 where
   none).

Conventions: frames ``(F, 3, H, W)`` in [0, 1]; depth ``(F, H, W)`` z-depth in the units of the camera
translations, ``<= 0`` or non-finite = no point; c2w ``(F, 4, 4)`` OpenCV (``reference.md`` section 1);
K ``(3, 3)`` pixel intrinsics at (H, W), pixel centres at +0.5 (section 1). The geometry assumes the
scene between two neighbouring frames is static: moving objects are warped as if they stood still
where they pass the depth test, which can be worse than blending (``benchmarks/temporal_sr.py``).
"""

from __future__ import annotations

import dataclasses
import math

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
    pixels that used the linear blend. ``F' = (F - 1) * factor + 1``."""

    frames: Tensor
    depth: Tensor
    confidence: Tensor
    c2w: Tensor
    K: Tensor
    times: Tensor
    fallback: float


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


def splat_depth(
    depth: Tensor, K_src: Tensor, c2w_src: Tensor, K_dst: Tensor, c2w_dst: Tensor, height: int, width: int
) -> Tensor:
    """Forward-warp a z-depth map ``(H, W)`` into another camera: z-buffered (nearest wins), each
    point written to the 2x2 pixels around its projection. Returns ``(height, width)``, 0 = empty."""
    ok = torch.isfinite(depth) & (depth > 0)
    world, _ = depth_to_points(
        torch.where(ok, depth, torch.zeros_like(depth)).float(), K_src.float(), c2w_src.float()
    )
    uv, z, valid = project_points(world[ok], K_dst.float(), c2w_dst.float(), min_depth=1e-6)
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


def _sample(img: Tensor, uv: Tensor, height: int, width: int) -> Tensor:
    """Bilinear sample ``img (C, h, w)`` at pixel coordinates ``uv (N, 2)`` (centres at +0.5) of an image
    of (height, width) -> ``(C, N)``; zeros outside."""
    grid = torch.stack([uv[:, 0] / width * 2 - 1, uv[:, 1] / height * 2 - 1], -1)
    return F.grid_sample(
        img[None].float(),
        grid[None, None].float(),
        mode="bilinear",
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
):
    """One in-between frame at fraction ``a`` from frames i and i+1 seen from ``c2w_t`` / ``K_t``.

    Returns ``rgb (3, h, w)``, ``depth (h, w)``, ``weight (h, w)`` (0 = fallback pixel)."""
    h0, w0 = frames.shape[-2:]
    d = torch.stack([splat_depth(depth[j], K, c2w[j], K_t, c2w_t, height, width) for j in (i, i + 1)])
    d = torch.where(d > 0, d, torch.full_like(d, float("inf"))).amin(0)
    d = torch.where(torch.isfinite(d), d, torch.zeros_like(d))
    has = d > 0
    world, _ = depth_to_points(d, K_t.float(), c2w_t.float())
    pts = world[has]
    num = torch.zeros(3, int(has.sum()))
    den = torch.zeros(int(has.sum()))
    for j, wj in ((i, 1 - a), (i + 1, a)):
        uv, z, valid = project_points(pts, K.float(), c2w[j].float(), min_depth=1e-6)
        src = torch.cat([frames[j].float(), depth[j][None].float(), conf[j][None].float()])
        s = _sample(src, uv, h0, w0)
        inside = valid & (uv[:, 0] >= 0) & (uv[:, 0] <= w0) & (uv[:, 1] >= 0) & (uv[:, 1] <= h0)
        vis = inside & (s[3] > 0) & ((s[3] - z).abs() <= depth_tol * z)
        wgt = wj * vis.float() * s[4].clamp_min(0)
        num += s[:3] * wgt
        den += wgt
    lin = _resize(frames[i] * (1 - a) + frames[i + 1] * a, height, width)
    rgb = lin.clone()
    flat = rgb.view(3, -1)
    weight = torch.zeros(height * width)
    good = den > 1e-6
    hidx = torch.nonzero(has.view(-1)).squeeze(1)
    flat[:, hidx[good]] = num[:, good] / den[good]
    weight[hidx[good]] = den[good]
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
) -> SRResult:
    """Raise the frame rate of ``frames`` by ``factor`` (and the resolution by ``scale``) with depth-guided
    warping between neighbouring frames (module docstring). Input frames are kept (resized when
    ``scale != 1``; their depth is the input depth, nearest-resized). ``progress(done, total, what)``."""
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
            rgb, d, wgt = render_between(
                frames, depth, conf, c2w, K, i, a, cams[i * factor + j], K_t, H, W, depth_tol
            )
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
