"""Epipolar masks of a batch of clips in an exact compact form, and their block-sparse view.

:class:`EpipolarMask` holds, per clip, the packed row spans of :func:`d4d.geometry.epipolar.epipolar_spans`
(``(L, T, h)`` int32: the allowed key columns ``[lo, hi)`` of every key row for every query token) and,
for occlusion-sensitive masks, the covisibility ``(T, T, N)`` of :func:`~d4d.models.dynamic.occlusion.covisible_keys`.
Key ``(frame b, row i, column j)`` is allowed for query ``q`` of frame ``a`` when
``lo <= j < hi`` for ``spans[q, b, i]`` and ``covis[a, b, i w + j]``: integer tests only, so every reader
gets the same bits, and the dense ``(L, L)`` mask (0.41 GB per clip at 49 frames of Wan 480p, 1.07 GB at
81) is never needed:

* the dense attention path asks for the rows of one chunk of query frames (:meth:`EpipolarMask.rows`);
* the flex path gets a :class:`~torch.nn.attention.flex_attention.BlockMask` (:meth:`EpipolarMask.block_mask`)
  whose ``mask_mod`` evaluates the same test by index (a gather of one span and one covisibility bit),
  and whose tile map (which ``block x block`` tiles hold any allowed pair) is computed exactly from the
  spans (and covisibility prefix counts) without evaluating all ``L^2`` pairs.

Decided and measured (``benchmarks/epipolar.py``): this ``mask_mod`` from spans rather than a
``BlockMask`` derived from a dense mask, which needs the ``(L, L)`` mask per clip and an ``L^2``
reduction to find the tiles (49 frames of Wan 480p, one CPU thread: 3.1 s and 1.3 GB against 0.75 s
and 0.2 GB for spans, covisibility and tiles; the previous dense construction took 11 s and 2.2 GB),
and rather than a ``mask_mod`` recomputing point-line distances from fundamental matrices in the
kernel, whose float rounding (fused multiply-adds in a compiled kernel, not in eager code) could flip
keys at the threshold between the tile map, the kernel and the dense path. Memory per clip: ``4 L T h``
bytes of spans (32 MB at 49 frames, 84 MB at 81). Nothing here synchronises with the host.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from d4d.geometry.epipolar import SPAN_LOW, SPAN_SHIFT, epipolar_spans, spans_to_mask, unpack_spans
from d4d.geometry.precision import full_precision
from d4d.models.dynamic.occlusion import covisible_keys

Tensor = torch.Tensor
BLOCK_SIZE = 128  # flex_attention's default tile


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(eq=False)
class EpipolarMask:
    """Epipolar masks of ``B`` clips (module docstring). ``spans``: ``(B, L, T, h)`` int32 packed;
    ``covis``: ``(B, T, T, N)`` bool or None; ``grid_hw``: tokens per frame ``(h, w)``."""

    spans: Tensor
    covis: Tensor | None
    grid_hw: tuple[int, int]
    _block_masks: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    @property
    def num_frames(self) -> int:
        return self.spans.shape[2]

    @property
    def tokens_per_frame(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    @property
    def length(self) -> int:
        return self.spans.shape[1]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of the dense mask this stands for: ``(B, L, L)``."""
        return (self.spans.shape[0], self.length, self.length)

    @property
    def device(self) -> torch.device:
        return self.spans.device

    def to(self, device: torch.device | str) -> "EpipolarMask":
        covis = None if self.covis is None else self.covis.to(device)
        return EpipolarMask(self.spans.to(device), covis, self.grid_hw)

    @staticmethod
    def stack(masks: list["EpipolarMask"]) -> "EpipolarMask":
        """Concatenate the clips of several masks (same grid and frame count) along the batch."""
        covis = None if masks[0].covis is None else torch.cat([m.covis for m in masks])
        return EpipolarMask(torch.cat([m.spans for m in masks]), covis, masks[0].grid_hw)

    def rows(self, start: int, stop: int) -> Tensor:
        """Dense bool rows ``(B, stop - start, L)`` of the query tokens ``start:stop`` (True = may attend)."""
        stop = min(stop, self.length)
        rows = spans_to_mask(self.spans[:, start:stop], self.grid_hw[1])
        if self.covis is not None:
            frames = torch.arange(start, stop, device=self.device) // self.tokens_per_frame
            rows = rows & self.covis[:, frames].flatten(2)
        return rows

    def dense(self) -> Tensor:
        """The whole ``(B, L, L)`` bool mask (for tests and small clips)."""
        return self.rows(0, self.length)

    def tiles(self, num_registers: int = 0, block_size: int = BLOCK_SIZE, chunk_frames: int = 1) -> Tensor:
        """Which ``block_size`` tiles of the ``(L, R + L)`` attention (``R = num_registers`` keys first,
        always visible) hold an allowed pair: bool ``(B, ceil(L / bs), ceil((R + L) / bs))``, exact.

        Each non-empty span of a key row is a contiguous run of key indices; its pieces inside each key
        tile are counted against covisibility prefix sums, so a tile is marked iff some pair in it is
        allowed. Work ``O(L T h)`` per clip, in chunks of ``chunk_frames`` query frames (peak about 30
        int64 temporaries of ``chunk_frames N T h``: 235 MB at 81 frames of Wan 480p).
        """
        b, length, num, h = self.spans.shape
        w, n, reg, bs = self.grid_hw[1], self.tokens_per_frame, num_registers, block_size
        kv_blocks, dev = _cdiv(reg + length, bs), self.device
        occupied = torch.zeros(b, length, kv_blocks + 1, dtype=torch.bool, device=dev)  # last column: nothing
        row_start = reg + (torch.arange(num, device=dev)[:, None] * n + torch.arange(h, device=dev) * w)  # (T, h)
        pieces = (w - 1) // bs + 2  # tiles one row's run of <= w keys can touch
        if self.covis is not None:
            prefix = F.pad(self.covis.reshape(b, num, num, h, w).cumsum(-1, dtype=torch.int32), (1, 0))
            prefix = prefix.reshape(b, -1)  # (B, T * T * h * (w + 1))
            cell = (torch.arange(num, device=dev)[:, None] * h + torch.arange(h, device=dev)) * (w + 1)  # (T, h)
        chunk = max(1, chunk_frames) * n
        for start in range(0, length, chunk):
            stop = min(length, start + chunk)
            lo, hi = unpack_spans(self.spans[:, start:stop])  # (B, c, T, h)
            first, last = row_start + lo, row_start + hi  # global key indices [first, last)
            if self.covis is not None:  # prefix index of (query frame, key frame, key row, column 0)
                frame_q = torch.arange(start, stop, device=dev) // n
                base = (frame_q[:, None, None] * (num * h * (w + 1)) + cell).reshape(1, -1)
            for k in range(pieces):
                tile = first // bs + k
                a, z = torch.maximum(first, tile * bs), torch.minimum(last, tile * bs + bs)  # the run inside it
                if self.covis is None:
                    hit = a < z
                else:  # covisible keys in the run: a difference of prefix counts (0 for an empty run)
                    ja = (a - row_start).clamp(0, w)
                    jz = torch.maximum((z - row_start).clamp(0, w), ja)
                    count = (prefix.gather(1, base + jz.reshape(b, -1)) - prefix.gather(1, base + ja.reshape(b, -1)))
                    hit = count.reshape(a.shape) > 0
                target = torch.where(hit, tile, kv_blocks).reshape(b, stop - start, -1).long()
                occupied[:, start:stop].scatter_(-1, target, True)
        occupied[:, :, : _cdiv(reg, bs)] = True  # the registers
        occupied = F.pad(occupied[..., :kv_blocks], (0, 0, 0, _cdiv(length, bs) * bs - length))
        return occupied.reshape(b, -1, bs, kv_blocks).any(2)

    def mask_mod(self, num_registers: int):
        """flex_attention ``mask_mod(b, h, q, kv)`` for keys ``[R registers, L tokens]``: the span and
        covisibility test of the module docstring, read by index (indices clamped into range, so the
        padding of a last partial tile reads valid memory)."""
        spans, covis, reg = self.spans, self.covis, num_registers
        length, n, w = self.length, self.tokens_per_frame, self.grid_hw[1]

        def epipolar_mask_mod(b, h, q_idx, kv_idx):
            key = torch.clamp(kv_idx - reg, 0, length - 1)
            query = torch.clamp(q_idx, 0, length - 1)
            frame = key // n
            within = key - frame * n
            row = within // w
            col = within - row * w
            span = spans[b, query, frame, row]
            ok = (col >= (span & SPAN_LOW)) & (col < (span >> SPAN_SHIFT))
            if covis is not None:
                ok = ok & covis[b, query // n, frame, within]
            return (kv_idx < reg) | ok

        return epipolar_mask_mod

    def block_mask(self, num_registers: int, block_size: int = BLOCK_SIZE) -> BlockMask:
        """The :class:`BlockMask` of the ``(L, R + L)`` attention (one head dimension, broadcast over
        heads), from :meth:`tiles` and :meth:`mask_mod`; built once per mask and cached (the blocks of a
        forward, the steps of a sampler share it). Every listed tile is "partial" (``mask_mod`` applied):
        a full epipolar tile is too rare to be worth finding."""
        key = (num_registers, block_size)
        if key not in self._block_masks:
            tiles = self.tiles(num_registers, block_size).to(torch.int32)
            counts = tiles.sum(-1, dtype=torch.int32)
            order = torch.argsort(tiles, dim=-1, descending=True, stable=True).to(torch.int32)
            self._block_masks[key] = BlockMask.from_kv_blocks(
                counts[:, None].contiguous(), order[:, None].contiguous(), BLOCK_SIZE=block_size,
                mask_mod=self.mask_mod(num_registers), seq_lengths=(self.length, num_registers + self.length))
        return self._block_masks[key]


@full_precision
def clip_epipolar_spans(c2w: Tensor, K: Tensor, image_hw: tuple[int, int], grid_hw: tuple[int, int], token_px: int,
                        occlusion: bool = False, depth: Tensor | None = None, block_frames: int = 2) -> EpipolarMask:
    """The :class:`EpipolarMask` of one clip (batch of 1), on ``c2w``'s device.

    Args:
        c2w: ``(T, 4, 4)`` camera of each latent frame; K: ``(3, 3)`` or ``(T, 3, 3)`` at ``image_hw``.
        grid_hw: tokens per frame ``(h, w)``; token_px: image pixels per token side.
        occlusion: also drop keys of ``b`` not covisible from ``a`` (depth ``(T, h, w)`` if known, 0 =
            unknown; a clip whose depth is all 0 gets the depth-free test, chosen on the device).
        block_frames: query frames solved at once (:func:`~d4d.geometry.epipolar.epipolar_spans`).
    """
    spans = epipolar_spans(c2w, K, grid_hw, token_px, block_frames=block_frames)
    covis = None
    if occlusion:
        covis = covisible_keys(c2w, K, image_hw, grid_hw, token_px, None)
        if depth is not None:
            covis = torch.where((depth > 0).any(), covisible_keys(c2w, K, image_hw, grid_hw, token_px, depth), covis)
        covis = covis[None]
    return EpipolarMask(spans[None], covis, tuple(grid_hw))
