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
Exact ties (a line through a cell corner, which zooms produce by symmetry) count as allowed
(:func:`_threshold`). Register tokens are added by the attention layer, not here.

Construction: exact row spans. For a query line the allowed keys of one key row are the columns
``j`` with ``|a (j d + d/2) + b y + c| < threshold``, linear in ``j``: an interval (for the epipole
case the intersection of the row with a disc: an interval too). :func:`epipolar_spans` solves for
that interval ``[lo, hi)`` of every (query token, key frame, key row) in float64 on the cameras'
device, vectorised over a block of query frames at a time, and stores it packed in one int32
(``lo | hi << 16``): ``T N * T * h`` entries instead of the ``(T N)^2`` mask, and no ``O(N^2)``
floating-point work at all. The mask is then integer comparisons (:func:`spans_to_mask`), which
every reader (the dense rows, a flex ``mask_mod`` evaluated inside a compiled kernel) evaluates
identically. :func:`epipolar_mask_reference` evaluates the distances directly instead (float64 by
default) and is what the span construction is tested against (equal on every Wan 480p test clip;
they could differ only for a key within float64 rounding, ~1e-12 px, of the threshold, where the
previous float32 distances disagreed with float64 on 0.05 % of a zoom clip's pairs). Nothing here
synchronises with the host.
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
    tiny = length <= min_relative_translation * length.max()  # a tensor: no host sync
    tiny |= torch.eye(num, dtype=torch.bool, device=c2w.device)
    fallback = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64, device=c2w.device)
    trans = torch.where(tiny[..., None], fallback, trans)
    k_inv = torch.linalg.inv_ex(K).inverse  # linalg.inv checks for errors: a device sync on CUDA
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


def _lines(fund: Tensor, centers64: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalised epipolar lines ``a x + b y + c = 0`` of every query token, ``(Q, T, N1)`` each, float64,
    and ``degenerate``: the query token is the epipole (``F x1 = 0``), the line is undefined."""
    x1, y1 = centers64[:, 0], centers64[:, 1]
    a, b, c = (fund[..., r, 0, None] * x1 + fund[..., r, 1, None] * y1 + fund[..., r, 2, None] for r in range(3))
    scale = torch.sqrt(x1 * x1 + y1 * y1 + 1.0)
    degenerate = torch.sqrt(a * a + b * b + c * c) <= 1e-9 * scale
    norm = torch.sqrt(a * a + b * b)
    norm = torch.where(degenerate | (norm == 0), torch.ones_like(norm), norm)
    return a / norm, b / norm, c / norm, degenerate


def _epipole_xy(epipole: Tensor) -> tuple[Tensor, Tensor]:
    """Pixel coordinates of homogeneous epipoles ``(..., 3)``; ``inf`` for an epipole at infinity."""
    ez = epipole[..., 2]
    at_infinity = ez.abs() <= 1e-12 * epipole.norm(dim=-1)
    safe = torch.where(at_infinity, torch.ones_like(ez), ez)
    inf = torch.full_like(ez, math.inf)
    return torch.where(at_infinity, inf, epipole[..., 0] / safe), torch.where(at_infinity, inf, epipole[..., 1] / safe)


def _block_distances(fund: Tensor, epipole: Tensor, centers64: Tensor, dtype: torch.dtype) -> Tensor:
    """Distances ``(Q, T, N, N)`` from key token centres to the epipolar lines of query tokens.

    ``fund``, ``epipole``: the rows ``[q, :]`` of the pair geometry (``(Q, T, 3, 3)``, ``(Q, T, 3)``).
    Elementwise arithmetic only, so results do not depend on how frames are blocked. The direct
    evaluation of the reference; degenerate rows use the distance to the epipole (``torch.where``,
    no data-dependent branch).
    """
    a, b, c, degenerate = _lines(fund, centers64)  # each (Q, T, N1), float64
    keys = centers64.to(dtype)
    x2, y2 = keys[:, 0], keys[:, 1]
    dist = (a.to(dtype)[..., None] * x2 + b.to(dtype)[..., None] * y2 + c.to(dtype)[..., None]).abs()
    ex, ey = _epipole_xy(epipole)
    to_epipole = torch.hypot(x2 - ex.to(dtype)[..., None], y2 - ey.to(dtype)[..., None])  # (Q, T, N2)
    return torch.where(degenerate[..., None], to_epipole[..., None, :], dist)


TIE_MARGIN = 1e-9


def _threshold(downsample: int, cell_size: float | None) -> float:
    """``cell_size * sqrt(2) / 2`` with a relative margin of :data:`TIE_MARGIN`: a line exactly through a
    key cell's corner (zoom paths produce them by symmetry: 45-degree lines through grid corners) is at
    exactly the threshold, and float64 rounding of ~1e-12 px would decide it differently in every
    formulation. With the margin such ties count as allowed everywhere; 1e-9 relative is far above
    float64 rounding and far below any geometric scale."""
    return (downsample if cell_size is None else cell_size) * math.sqrt(2) / 2 * (1 + TIE_MARGIN)


SPAN_SHIFT = 16  # spans are packed as lo | hi << SPAN_SHIFT in an int32
SPAN_LOW = (1 << SPAN_SHIFT) - 1


def unpack_spans(spans: Tensor) -> tuple[Tensor, Tensor]:
    """``lo, hi`` (int32) of packed spans: allowed columns ``lo <= j < hi`` (empty when ``hi <= lo``)."""
    return spans & SPAN_LOW, spans >> SPAN_SHIFT


def _row_spans(fund: Tensor, epipole: Tensor, grid_hw: tuple[int, int], downsample: int, threshold: float) -> Tensor:
    """Packed spans ``(Q, T, N1, h)`` of the allowed key columns in each key row (module docstring).

    Per query line and key row ``y``: ``|a x + b y + c| < t`` <=> ``x`` in the open interval between
    ``(-t - b y - c) / a`` and ``(t - b y - c) / a`` (every column or none when ``a = 0``); at the
    epipole ``(x - ex)^2 < t^2 - (y - ey)^2``. Key column ``j`` sits at ``x = j d + d/2``.
    """
    h, w = grid_hw
    d = float(downsample)
    centers = token_centers(grid_hw, downsample, device=fund.device)
    a, b, c, degenerate = _lines(fund, centers)
    ys = torch.arange(h, dtype=torch.float64, device=fund.device) * d + d / 2
    inf = math.inf
    v = b[..., None] * ys + c[..., None]  # (Q, T, N1, h)
    a = a[..., None]
    flat = a == 0
    safe = torch.where(flat, torch.ones_like(a), a)
    x1, x2 = (-threshold - v) / safe, (threshold - v) / safe
    whole = v.abs() < threshold  # a horizontal line: the whole row or nothing
    xlo = torch.where(flat, torch.where(whole, -inf, inf), torch.minimum(x1, x2))
    xhi = torch.where(flat, torch.full_like(v, inf), torch.maximum(x1, x2))
    ex, ey = _epipole_xy(epipole)  # (Q, T)
    r2 = threshold * threshold - (ys - ey[..., None]) ** 2  # (Q, T, h)
    r = torch.sqrt(r2.clamp_min(0.0))
    inside = r2 > 0
    elo = torch.where(inside, ex[..., None] - r, inf)[:, :, None]
    ehi = torch.where(inside, ex[..., None] + r, inf)[:, :, None]
    xlo = torch.where(degenerate[..., None], elo, xlo)
    xhi = torch.where(degenerate[..., None], ehi, xhi)
    # open interval (xlo, xhi) in x = j d + d/2  ->  integer columns lo <= j < hi
    lo = torch.floor(((xlo - d / 2) / d).clamp(-1.0, float(w))) + 1
    hi = torch.ceil(((xhi - d / 2) / d).clamp(-1.0, float(w)))
    lo = lo.clamp(0, w).to(torch.int32)
    hi = torch.maximum(hi.clamp(0, w).to(torch.int32), lo)
    return lo | (hi << SPAN_SHIFT)


def _check(c2w: Tensor, grid_hw: tuple[int, int], downsample: int) -> None:
    if c2w.ndim != 3 or c2w.shape[-2:] != (4, 4):
        raise ValueError(f"expected c2w of shape (T, 4, 4), got {tuple(c2w.shape)}")
    if min(grid_hw) < 1 or downsample < 1:
        raise ValueError(f"grid_hw and downsample must be positive, got {grid_hw}, {downsample}")
    if grid_hw[1] >= 1 << (SPAN_SHIFT - 1):
        raise ValueError(f"token grids wider than {(1 << (SPAN_SHIFT - 1)) - 1} are not supported, got {grid_hw}")


@full_precision
def epipolar_spans(
    c2w: Tensor,
    K: Tensor,
    grid_hw: tuple[int, int],
    downsample: int,
    cell_size: float | None = None,
    block_frames: int = 2,
    query_frames: slice | None = None,
) -> Tensor:
    """The epipolar mask in its exact compact form (module docstring), on ``c2w``'s device.

    Args:
        c2w, K, grid_hw, downsample, cell_size: as in :func:`epipolar_mask_block`.
        block_frames: query frames solved at once (peak about 20 float64 temporaries of
            ``block_frames T N h``: 315 MB at 81 frames of Wan 480p with the default 2).
        query_frames: a contiguous ``slice`` of query frames (default all).

    Returns:
        int32 ``(Q N, T, h)``: for each query token (frame-major, row-major) and key frame and key
        row, the allowed key columns ``[lo, hi)`` packed as ``lo | hi << 16`` (:func:`unpack_spans`).
    """
    _check(c2w, grid_hw, downsample)
    if block_frames < 1:
        raise ValueError(f"block_frames must be >= 1, got {block_frames}")
    num, (h, w) = c2w.shape[0], grid_hw
    start, stop, step = (query_frames or slice(None)).indices(num)
    if step != 1:
        raise ValueError("query_frames must be a contiguous slice")
    fund, epipole = _pair_geometry(c2w, K, 1e-6)
    threshold = _threshold(downsample, cell_size)
    out = torch.empty(stop - start, h * w, num, h, dtype=torch.int32, device=c2w.device)
    for first in range(start, stop, block_frames):
        last = min(stop, first + block_frames)
        spans = _row_spans(fund[first:last], epipole[first:last], grid_hw, downsample, threshold)  # (Q, T, N, h)
        out[first - start: last - start] = spans.permute(0, 2, 1, 3)
    return out.reshape(-1, num, h)


def spans_to_mask(spans: Tensor, width: int) -> Tensor:
    """Packed spans ``(..., T, h)`` -> bool mask rows ``(..., T * h * width)`` (integer compares only)."""
    lo, hi = unpack_spans(spans)
    cols = torch.arange(width, dtype=spans.dtype, device=spans.device)
    return ((cols >= lo[..., None]) & (cols < hi[..., None])).flatten(-3)


@full_precision
def epipolar_mask_block(
    c2w: Tensor,
    K: Tensor,
    grid_hw: tuple[int, int],
    downsample: int,
    query_frames: slice,
    cell_size: float | None = None,
) -> Tensor:
    """Epipolar mask rows of the query tokens of some frames, against every key token.

    Args:
        c2w: ``(T, 4, 4)`` OpenCV camera-to-world.
        K: ``(T, 3, 3)`` or ``(3, 3)`` pixel intrinsics of the *image* (``(h d) x (w d)`` pixels).
        grid_hw: token grid ``(h, w)``; ``N = h * w`` tokens per frame.
        downsample: ``d``, image pixels per token side.
        query_frames: a ``slice`` of frame indices (step 1), e.g. ``slice(4, 8)``.
        cell_size: token footprint in pixels (default ``d``); threshold ``cell_size * sqrt(2) / 2``.

    Returns:
        bool ``(Q * N, T * N)``, ``Q`` the number of query frames; True = may attend. Built from
        :func:`epipolar_spans` (float64 geometry, ``Q N T h`` int32 spans, then integer compares).
    """
    spans = epipolar_spans(c2w, K, grid_hw, downsample, cell_size, query_frames=query_frames)
    return spans_to_mask(spans, grid_hw[1])


@full_precision
def iter_epipolar_mask_blocks(
    c2w: Tensor,
    K: Tensor,
    grid_hw: tuple[int, int],
    downsample: int,
    block_frames: int = 1,
    cell_size: float | None = None,
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
        yield frames, epipolar_mask_block(c2w, K, grid_hw, downsample, frames, cell_size)


@full_precision
def epipolar_mask(
    c2w: Tensor,
    K: Tensor,
    grid_hw: tuple[int, int],
    downsample: int,
    block_frames: int = 1,
    cell_size: float | None = None,
    max_elements: int = 2**31,
) -> Tensor:
    """The full bool epipolar mask ``(T * N, T * N)``, assembled block by block.

    Peak memory is the output plus one block's ``block_frames * T * N^2`` booleans. Raises
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
    for frames, block in iter_epipolar_mask_blocks(c2w, K, grid_hw, downsample, block_frames, cell_size):
        out[frames.start * n : frames.stop * n] = block
    return out


@full_precision
def epipolar_mask_reference(
    c2w: Tensor,
    K: Tensor,
    grid_hw: tuple[int, int],
    downsample: int,
    cell_size: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Direct all-pairs construction: every ``(T, T, N, N)`` distance materialised at once.

    The baseline the span construction is checked and benchmarked against; same output as
    :func:`epipolar_mask` (float64 distances by default: in float32 a key centre within ~1e-5 px
    of the threshold, at 832 px, can land on either side), peak memory ``T^2 N^2`` elements of
    ``dtype``.
    """
    _check(c2w, grid_hw, downsample)
    fund, epipole = _pair_geometry(c2w, K, 1e-6)
    centers = token_centers(grid_hw, downsample, device=c2w.device)
    threshold = _threshold(downsample, cell_size)
    dist = _block_distances(fund, epipole, centers, dtype)  # (T, T, N, N)
    num, n = c2w.shape[0], centers.shape[0]
    return (dist < threshold).permute(0, 2, 1, 3).reshape(num * n, num * n)
