"""Fundamental matrices and CamI2V-style epipolar attention masks, built blockwise.

Geometry (``../shared/docs/reference.md`` section 4). For frames ``a`` and ``b`` the relative pose
``inv(c2w_b) @ c2w_a = (R, t)`` maps camera-a coordinates to camera-b coordinates;
``E = [t]x R`` and ``F_ab = K_b^-T E K_a^-1``, so that ``x_b^T F_ab x_a = 0`` for the continuous
pixel coordinates (pixel centres at ``+0.5``, :mod:`d4d.geometry.cameras`) of one 3D point seen
in both frames. Each ``F_ab`` is scaled to unit Frobenius norm (it is only defined up to scale).

Degenerate translations. When ``t`` is about zero (a frame with itself, or a camera that only
rotates), ``E`` vanishes. As CamI2V does, ``t`` is then replaced by a tiny deterministic
translation, here along camera b's x axis (its size is irrelevant after normalisation). The
epipole is then at infinity in the horizontal direction, so the line of a query token is the
horizontal line through the point ``K_b R K_a^-1 x_a`` (the rotation-only correspondence).
Consequence, chosen and tested: **a frame attends to itself along its own token row** (the query
token included), and a rotating-only camera pair along the row through the correspondence.

Tokens. A feature map of ``h x w`` tokens at downsampling ``d`` covers an ``(h d) x (w d)`` image;
token ``(i, j)`` is centred at CamI2V's ``idx * d + d / 2 - 0.5`` in pixel-*index* coordinates,
which is ``idx * d + d / 2`` in the continuous coordinates ``K`` uses (CamI2V feeds the index
coordinate to ``K`` directly, shifting its lines by half a pixel; we do not). Tokens are flattened
frame-major then row-major: global index ``frame * h * w + i * w + j`` (CamI2V's ``(T H W)``).

Mask. Query token ``x1`` in frame ``a`` may attend key token ``x2`` in frame ``b`` when
``|l . x2| < cell_size * sqrt(2) / 2`` with ``l = F_ab x1`` divided by the norm of its first two
entries: the line passes through the key's ``cell_size``-wide cell. If ``x1`` is exactly the
epipole (``F_ab x1 = 0``, e.g. the focus of expansion of a forward move), every point of its ray
projects to the epipole in ``b``, so keys within the same distance of that epipole are allowed.
Register tokens are added by the attention layer, not here.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from d4d.geometry.cameras import invert_se3
from d4d.geometry.precision import full_precision

Tensor = torch.Tensor


def _skew(v: Tensor) -> Tensor:
    """``(..., 3)`` -> ``(..., 3, 3)`` cross-product matrix ``[v]x``."""
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], -1).reshape(*v.shape, 3)


def _pair_geometry(c2w: Tensor, K: Tensor, min_relative_translation: float) -> tuple[Tensor, Tensor]:
    """Float64 ``F: (T, T, 3, 3)`` and homogeneous epipoles ``(T, T, 3)`` (camera a seen in b)."""
    c2w = c2w.to(torch.float64)
    num = c2w.shape[0]
    K = K.to(torch.float64).expand(num, 3, 3)
    rel = invert_se3(c2w)[None, :] @ c2w[:, None]  # [a, b] = inv(c2w_b) @ c2w_a
    rot, trans = rel[..., :3, :3], rel[..., :3, 3]
    length = trans.norm(dim=-1)
    tiny = length <= min_relative_translation * float(length.max())
    tiny |= torch.eye(num, dtype=torch.bool, device=c2w.device)
    fallback = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64, device=c2w.device)
    trans = torch.where(tiny[..., None], fallback, trans)
    k_inv = torch.linalg.inv(K)
    fund = k_inv[None, :].transpose(-1, -2) @ _skew(trans) @ rot @ k_inv[:, None]
    fund = fund / fund.flatten(-2).norm(dim=-1)[..., None, None]
    epipole = (K[None, :] @ trans[..., None]).squeeze(-1)
    return fund, epipole


@full_precision
def fundamental_matrices(c2w: Tensor, K: Tensor, min_relative_translation: float = 1e-6) -> Tensor:
    """Fundamental matrices of all ordered frame pairs.

    Args:
        c2w: ``(T, 4, 4)`` OpenCV camera-to-world (any world frame, any translation scale).
        K: ``(T, 3, 3)`` or ``(3, 3)`` pixel intrinsics.
        min_relative_translation: pairs whose ``|t|`` is at most this fraction of the largest
            pair translation (and every frame with itself) get the deterministic fallback
            translation (module docstring).

    Returns:
        ``F: (T, T, 3, 3)`` float64, ``F[a, b]`` with ``x_b^T F[a, b] x_a = 0``, unit Frobenius norm.
    """
    return _pair_geometry(c2w, K, min_relative_translation)[0]


def token_centers(grid_hw: tuple[int, int], downsample: int, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """Continuous pixel coordinates of token centres: ``(h * w, 2)`` rows ``(x, y)``, row-major.

    ``x = j * d + d / 2`` (CamI2V's ``j * d + d / 2 - 0.5`` in pixel-index coordinates, + 0.5).
    """
    h, w = grid_hw
    ys = torch.arange(h, dtype=dtype, device=device) * downsample + downsample / 2
    xs = torch.arange(w, dtype=dtype, device=device) * downsample + downsample / 2
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)


def _block_distances(fund: Tensor, epipole: Tensor, centers64: Tensor, dtype: torch.dtype) -> Tensor:
    """Distances ``(Q, T, N, N)`` from key token centres to the epipolar lines of query tokens.

    ``fund``, ``epipole``: the rows ``[q, :]`` of the pair geometry (``(Q, T, 3, 3)``, ``(Q, T, 3)``).
    Elementwise arithmetic only, so results do not depend on how frames are blocked.
    """
    x1, y1 = centers64[:, 0], centers64[:, 1]
    lines = [fund[..., r, 0, None] * x1 + fund[..., r, 1, None] * y1 + fund[..., r, 2, None] for r in range(3)]
    a, b, c = lines  # each (Q, T, N1), float64
    scale = torch.sqrt(x1 * x1 + y1 * y1 + 1.0)
    degenerate = torch.sqrt(a * a + b * b + c * c) <= 1e-9 * scale
    norm = torch.sqrt(a * a + b * b)
    norm = torch.where(degenerate | (norm == 0), torch.ones_like(norm), norm)
    a, b, c = (v / norm for v in (a, b, c))
    keys = centers64.to(dtype)
    x2, y2 = keys[:, 0], keys[:, 1]
    dist = (a.to(dtype)[..., None] * x2 + b.to(dtype)[..., None] * y2 + c.to(dtype)[..., None]).abs()
    if degenerate.any():
        ez = epipole[..., 2]
        at_infinity = ez.abs() <= 1e-12 * epipole.norm(dim=-1)
        ex = torch.where(at_infinity, torch.full_like(ez, math.inf), epipole[..., 0] / ez)
        ey = torch.where(at_infinity, torch.full_like(ez, math.inf), epipole[..., 1] / ez)
        to_epipole = torch.hypot(x2 - ex.to(dtype)[..., None], y2 - ey.to(dtype)[..., None])  # (Q, T, N2)
        dist = torch.where(degenerate[..., None], to_epipole[..., None, :], dist)
    return dist


def _check(c2w: Tensor, grid_hw: tuple[int, int], downsample: int) -> None:
    if c2w.ndim != 3 or c2w.shape[-2:] != (4, 4):
        raise ValueError(f"expected c2w of shape (T, 4, 4), got {tuple(c2w.shape)}")
    if min(grid_hw) < 1 or downsample < 1:
        raise ValueError(f"grid_hw and downsample must be positive, got {grid_hw}, {downsample}")


@full_precision
def epipolar_mask_block(
    c2w: Tensor,
    K: Tensor,
    grid_hw: tuple[int, int],
    downsample: int,
    query_frames: slice,
    cell_size: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Epipolar mask rows of the query tokens of some frames, against every key token.

    Args:
        c2w: ``(T, 4, 4)`` OpenCV camera-to-world.
        K: ``(T, 3, 3)`` or ``(3, 3)`` pixel intrinsics of the *image* (``(h d) x (w d)`` pixels).
        grid_hw: token grid ``(h, w)``; ``N = h * w`` tokens per frame.
        downsample: ``d``, image pixels per token side.
        query_frames: a ``slice`` of frame indices (step 1), e.g. ``slice(4, 8)``.
        cell_size: token footprint in pixels (default ``d``); threshold ``cell_size * sqrt(2) / 2``.
        dtype: precision of the distance computation (the only ``O(N^2)`` temporary).

    Returns:
        bool ``(Q * N, T * N)``, ``Q`` the number of query frames; True = may attend. Peak memory
        ``Q * T * N^2`` elements of ``dtype``.
    """
    _check(c2w, grid_hw, downsample)
    num = c2w.shape[0]
    start, stop, step = query_frames.indices(num)
    if step != 1:
        raise ValueError("query_frames must be a contiguous slice")
    fund, epipole = _pair_geometry(c2w, K, 1e-6)
    centers = token_centers(grid_hw, downsample, device=c2w.device)
    threshold = (downsample if cell_size is None else cell_size) * math.sqrt(2) / 2
    dist = _block_distances(fund[start:stop], epipole[start:stop], centers, dtype)  # (Q, T, N, N)
    mask = dist < threshold
    q, n = stop - start, centers.shape[0]
    return mask.permute(0, 2, 1, 3).reshape(q * n, num * n)


@full_precision
def iter_epipolar_mask_blocks(
    c2w: Tensor,
    K: Tensor,
    grid_hw: tuple[int, int],
    downsample: int,
    block_frames: int = 1,
    cell_size: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[slice, Tensor]]:
    """Yield ``(query_frames, block)`` covering all frames, ``block_frames`` query frames at a time.

    ``block`` is :func:`epipolar_mask_block`'s ``(Q * N, T * N)`` bool tensor; its rows are rows
    ``query_frames.start * N ... query_frames.stop * N`` of the full mask.
    """
    if block_frames < 1:
        raise ValueError(f"block_frames must be >= 1, got {block_frames}")
    num = c2w.shape[0]
    for start in range(0, num, block_frames):
        frames = slice(start, min(num, start + block_frames))
        yield frames, epipolar_mask_block(c2w, K, grid_hw, downsample, frames, cell_size, dtype)


@full_precision
def epipolar_mask(
    c2w: Tensor,
    K: Tensor,
    grid_hw: tuple[int, int],
    downsample: int,
    block_frames: int = 1,
    cell_size: float | None = None,
    dtype: torch.dtype = torch.float32,
    max_elements: int = 2**31,
) -> Tensor:
    """The full bool epipolar mask ``(T * N, T * N)``, assembled block by block.

    Peak memory is the output plus one block's ``block_frames * T * N^2`` distances. Raises
    ``ValueError`` when the output would exceed ``max_elements``; use
    :func:`iter_epipolar_mask_blocks` then. Arguments as in :func:`epipolar_mask_block`.
    """
    _check(c2w, grid_hw, downsample)
    total = c2w.shape[0] * grid_hw[0] * grid_hw[1]
    if total * total > max_elements:
        raise ValueError(
            f"epipolar mask of {total} x {total} tokens exceeds max_elements={max_elements}; "
            "iterate over iter_epipolar_mask_blocks instead"
        )
    n = grid_hw[0] * grid_hw[1]
    out = torch.empty(total, total, dtype=torch.bool, device=c2w.device)
    for frames, block in iter_epipolar_mask_blocks(c2w, K, grid_hw, downsample, block_frames, cell_size, dtype):
        out[frames.start * n : frames.stop * n] = block
    return out


@full_precision
def epipolar_mask_reference(
    c2w: Tensor,
    K: Tensor,
    grid_hw: tuple[int, int],
    downsample: int,
    cell_size: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Direct all-pairs construction: every ``(T, T, N, N)`` distance materialised at once.

    The baseline the blockwise functions are checked and benchmarked against; same output as
    :func:`epipolar_mask`, peak memory ``T^2 N^2`` elements of ``dtype``.
    """
    _check(c2w, grid_hw, downsample)
    fund, epipole = _pair_geometry(c2w, K, 1e-6)
    centers = token_centers(grid_hw, downsample, device=c2w.device)
    threshold = (downsample if cell_size is None else cell_size) * math.sqrt(2) / 2
    dist = _block_distances(fund, epipole, centers, dtype)  # (T, T, N, N)
    num, n = c2w.shape[0], centers.shape[0]
    return (dist < threshold).permute(0, 2, 1, 3).reshape(num * n, num * n)
