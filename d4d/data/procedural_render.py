"""A vectorised torch ray-caster for :class:`d4d.data.procedural_scene.Scene`.

One ray per pixel centre ``(u + 0.5, v + 0.5)``, all frames at once. Cameras are OpenCV (x right,
y down, z forward) camera-to-world; the world has y pointing down. Rays are built with
``d = R K^-1 [u, v, 1]`` *unnormalised*, so the ray parameter of a hit is its z-depth along the
optical axis. Textures are band-limited by the pixel footprint (a pattern finer than a pixel fades
to its mean colour instead of aliasing), so depth, mask and colour all belong to the pixel centre.
"""
from __future__ import annotations

import math

import torch

from d4d.data.procedural_scene import Material, Scene

NEAR = 0.05  # metres; hits closer than this are ignored (the camera never is inside an object)
FAR = 100.0  # z-depth beyond which the ground is treated as sky (fog reaches the horizon colour)


def _hit_ground(o: torch.Tensor, d: torch.Tensor, y: float) -> torch.Tensor:
    t = (y - o[..., 1]) / d[..., 1]
    return torch.where((d[..., 1] > 1e-9) & (t > NEAR), t, torch.inf)


def _hit_box(o, d, centre, half) -> torch.Tensor:
    """Slab test. ``o, d: (T, N, 3)``, ``centre: (T, 3)``, ``half: (3,)`` -> ``t: (T, N)``, inf on miss."""
    safe = torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)  # the sign of 0 is irrelevant here
    lo = (centre[:, None] - half - o) / safe
    hi = (centre[:, None] + half - o) / safe
    t_in = torch.minimum(lo, hi).amax(-1)
    t_out = torch.maximum(lo, hi).amin(-1)
    return torch.where((t_out >= t_in) & (t_in > NEAR), t_in, torch.inf)


def _hit_sphere(o, d, centre, radius: float) -> torch.Tensor:
    oc = o - centre[:, None]
    a = (d * d).sum(-1)
    b = (oc * d).sum(-1)
    disc = b * b - a * ((oc * oc).sum(-1) - radius * radius)
    t = (-b - disc.clamp_min(0).sqrt()) / a
    return torch.where((disc >= 0) & (t > NEAR), t, torch.inf)


def _wave(x: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Square wave of period 1 in [-1, 1], its edges blurred over the footprint ``fp`` (periods)."""
    return (torch.sin(2 * math.pi * x) / (2 * math.pi * fp).clamp_min(1e-6)).clamp(-1, 1)


def _pattern(mat: Material, u: torch.Tensor, v: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Blend weight of ``colour2`` in [0, 1]; ``u, v, fp`` in metres on the surface."""
    u, v, fp = u / mat.period, v / mat.period, fp / mat.period
    if mat.pattern == "plain":
        return torch.zeros_like(u)
    if mat.pattern == "checker":
        return 0.5 + 0.5 * _wave(u, fp) * _wave(v, fp)
    if mat.pattern == "stripes":
        return 0.5 + 0.5 * _wave(u if mat.stripe_axis == 0 else v, fp)
    if mat.pattern == "dots":
        du, dv = u - torch.floor(u) - 0.5, v - torch.floor(v) - 0.5
        inside = ((0.3 - torch.sqrt(du * du + dv * dv)) / fp.clamp_min(1e-6) + 0.5).clamp(0, 1)
        fade = (2 * fp - 0.5).clamp(0, 1)  # dots smaller than a pixel: their mean coverage
        return inside * (1 - fade) + (math.pi * 0.09) * fade
    if mat.pattern == "bricks":  # mortar lines, rows offset by half a brick; bricks are 1 x 0.5 periods
        row = torch.floor(v * 2)
        uu = u + 0.5 * torch.remainder(row, 2)
        dist = torch.minimum((uu - torch.round(uu)).abs(), (v * 2 - torch.round(v * 2)).abs() / 2)
        line = ((0.04 - dist) / fp.clamp_min(1e-6) + 0.5).clamp(0, 1)
        fade = (2 * fp - 0.5).clamp(0, 1)
        return line * (1 - fade) + 0.2 * fade
    raise ValueError(f"unknown pattern {mat.pattern!r}")


def _colour(mat: Material, weight: torch.Tensor) -> torch.Tensor:
    c1 = torch.tensor(mat.colour, dtype=torch.float32)
    c2 = torch.tensor(mat.colour2, dtype=torch.float32)
    return c1 + weight[:, None] * (c2 - c1)


@torch.no_grad()
def render(
    scene: Scene,
    c2w: torch.Tensor,
    K: torch.Tensor,
    height: int,
    width: int,
    times: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ray-cast ``scene`` from every camera.

    Args:
        c2w: ``(T, 4, 4)`` OpenCV camera-to-world in the scene's world (y down, metres).
        K: ``(3, 3)`` or ``(T, 3, 3)`` pixel intrinsics at ``height x width`` with last row [0, 0, 1].
        times: ``(T,)`` scene time in [0, 1] of each frame (default ``linspace(0, 1, T)``).

    Returns:
        ``rgb`` uint8 ``(T, H, W, 3)``; ``depth`` float32 ``(T, H, W)`` z-depth in metres, 0 where
        the ray sees the sky; ``mask`` bool ``(T, H, W)``, True where a moving object is seen.
    """
    c2w = torch.as_tensor(c2w, dtype=torch.float32)
    T = c2w.shape[0]
    K = torch.as_tensor(K, dtype=torch.float32)
    K = K.expand(T, 3, 3) if K.ndim == 2 else K
    if times is None:
        times = torch.linspace(0.0, 1.0, T) if T > 1 else torch.zeros(1)
    times = torch.as_tensor(times, dtype=torch.float32).reshape(T)

    vv, uu = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    pix = torch.stack([uu, vv, torch.ones_like(uu)], -1).reshape(1, -1, 3)
    d_cam = pix @ torch.linalg.inv(K).transpose(1, 2)  # (T, N, 3), z = 1
    d = d_cam @ c2w[:, :3, :3].transpose(1, 2)
    o = c2w[:, None, :3, 3].expand_as(d)
    norm = d.norm(dim=-1)

    centres = [s.centres(times) for s in scene.shapes]
    hits = [_hit_ground(o, d, scene.ground_y)]
    for s, c in zip(scene.shapes, centres):
        half = torch.tensor(s.half, dtype=torch.float32)
        hits.append(_hit_box(o, d, c, half) if s.kind == "box" else _hit_sphere(o, d, c, s.half[0]))
    t, idx = torch.stack(hits).min(0)  # (T, N); ties go to the ground, then to the earlier shape
    hit = t < FAR
    depth = torch.where(hit, t, torch.zeros_like(t))
    p = o + depth[..., None] * d
    frame = torch.arange(T)[:, None].expand_as(t)

    # Sky: vertical gradient by elevation (up is -y).
    elev = (-d[..., 1] / norm).clamp(0, 1) ** 0.6
    top, horizon = torch.tensor(scene.sky_top), torch.tensor(scene.sky_horizon)
    rgb = horizon + elev[..., None] * (top - horizon)

    light = torch.tensor(scene.light_dir, dtype=torch.float32)
    light = light / light.norm()
    for i in range(len(scene.shapes) + 1):
        sel = hit & (idx == i)
        if not sel.any():
            continue
        pi, di, fi = p[sel], d[sel], frame[sel]
        if i == 0:
            mat = scene.ground
            n = torch.tensor([0.0, -1.0, 0.0]).expand_as(pi)
            su, sv = pi[:, 0], pi[:, 2]
        else:
            s = scene.shapes[i - 1]
            mat, q = s.material, pi - centres[i - 1][fi]
            if s.kind == "box":
                half = torch.tensor(s.half, dtype=torch.float32)
                axis = (q.abs() / half).argmax(-1)  # the face hit is where |q| reaches the half extent
                n = torch.nn.functional.one_hot(axis, 3).float() * torch.sign(q)
                local = q + half  # texture anchored at the box corner, so it moves with the box
                tu = torch.tensor([2, 0, 0])[axis]  # x-face: (z, y); y-face: (x, z); z-face: (x, y)
                tv = torch.tensor([1, 2, 1])[axis]
                su, sv = local.gather(1, tu[:, None])[:, 0], local.gather(1, tv[:, None])[:, 0]
            else:
                r = s.half[0]
                n = q / r
                # A whole number of periods around the equator, so the texture has no seam.
                periods = max(2, round(2 * math.pi * r / mat.period))
                su = torch.atan2(q[:, 2], q[:, 0]) * (periods * mat.period / (2 * math.pi))
                sv = torch.asin((q[:, 1] / r).clamp(-1, 1)) * r
        cos = (n * di).sum(-1) / norm[sel]
        # Footprint of one pixel on the surface (metres): grows with depth and at grazing angles.
        fp = depth[sel] / K[fi, 0, 0] / cos.abs().clamp_min(0.15)
        col = _colour(mat, _pattern(mat, su, sv, fp))
        n = torch.where(cos[:, None] > 0, -n, n)  # light the side facing the camera
        lam = (n * light).sum(-1).clamp_min(0)
        col = col * (scene.ambient + (1 - scene.ambient) * lam)[:, None]
        fog = (depth[sel] / FAR).clamp(0, 1) ** 2  # fades into the horizon colour at FAR
        rgb[sel] = col + fog[:, None] * (horizon - col)

    moving = torch.tensor([False] + [s.moving for s in scene.shapes])
    mask = hit & moving[idx]
    shape = (T, height, width)
    rgb = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).reshape(*shape, 3)
    return rgb, depth.reshape(shape), mask.reshape(shape)
