"""Epipolar attention: masks against the true epipolar geometry, zero gradient from disallowed keys,
occlusion-sensitive masking, the span construction against the direct one, the block-sparse (flex)
path against the dense one (tiles, mask_mod, outputs, gradients) and no host synchronisation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import flex_attention as flex
from torch.utils._python_dispatch import TorchDispatchMode

from d4d.geometry.cameras import invert_se3, make_pose
from d4d.geometry.epipolar import epipolar_mask_reference, token_centers
from d4d.geometry.motions import motion_path
from d4d.models.dynamic import build_tiny_wan
from d4d.models.dynamic import epipolar_attention as ea
from d4d.models.dynamic.epipolar_attention import (BranchContext, EpipolarAttnProcessor, EpipolarBranch,
                                                   clip_epipolar_mask)
from d4d.models.dynamic.epipolar_mask import EpipolarMask, clip_epipolar_spans
from d4d.models.dynamic.occlusion import covisible_keys
from d4d.utils.errors import UserError

GRID, PX = (12, 16), 8  # 96 x 128 image, 12 x 16 tokens of 8 px
IMAGE_HW = (GRID[0] * PX, GRID[1] * PX)
K = torch.tensor([[100.0, 0, 64], [0, 100.0, 48], [0, 0, 1]])


def _rot_y(deg: float) -> torch.Tensor:
    a = math.radians(deg)
    return torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])


def _two_views() -> torch.Tensor:
    second = make_pose(_rot_y(-12.0), torch.tensor([0.6, 0.15, 0.2]))  # a sideways step turning back in
    return torch.stack([torch.eye(4), second]).double()


def _project(c2w: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    cam = (invert_se3(c2w) @ torch.cat([points, torch.ones(len(points), 1, dtype=points.dtype)], 1).T).T[:, :3]
    pix = (K.double() @ cam.T).T
    return pix[:, :2] / pix[:, 2:]


def test_allowed_keys_lie_on_the_true_epipolar_line():
    c2w = _two_views()
    mask = clip_epipolar_mask(c2w, K, IMAGE_HW, GRID, PX)
    n = GRID[0] * GRID[1]
    centers = token_centers(GRID, PX)
    half_cell = PX * math.sqrt(2) / 2
    checked = 0
    for q in range(0, n, 7):
        # the true line: project points of the query's ray at several depths into view 1
        ray = torch.linalg.solve(K.double(), torch.tensor([*centers[q].tolist(), 1.0], dtype=torch.float64))
        pts = _project(c2w[1], torch.stack([ray * d for d in (0.5, 1.0, 2.0, 4.0, 50.0)]))
        direction = (pts[-1] - pts[0]) / (pts[-1] - pts[0]).norm()
        normal = torch.stack([-direction[1], direction[0]])
        dist = ((centers - pts[0]) @ normal).abs()  # distance of every key centre in view 1 to the line
        allowed = mask[q, n:]
        if not (dist < half_cell - 1e-6).any():  # the line misses view 1's image
            assert not allowed.any()
            continue
        # every allowed key is within the threshold of the true line, every key within it is allowed
        assert dist[allowed].max() < half_cell + 1e-6
        assert allowed[dist < half_cell - 1e-6].all()
        # and the projections themselves (inside the image) fall in allowed cells
        for x, y in pts:
            if 0 <= x < IMAGE_HW[1] and 0 <= y < IMAGE_HW[0]:
                assert allowed[int(y // PX) * GRID[1] + int(x // PX)]
        checked += 1
    assert checked > 20
    # own frame: along the query's own row (module docstring of d4d.geometry.epipolar)
    row = mask[:n, :n].reshape(GRID[0], GRID[1], GRID[0], GRID[1])
    assert row[3, 5, 3].all() and not row[3, 5, 4].any()


def test_masked_attention_gives_zero_gradient_from_disallowed_keys():
    torch.manual_seed(0)
    attn = build_tiny_wan().transformer.blocks[0].attn1
    branch = EpipolarBranch(attn, num_registers=2, chunk_frames=1)
    torch.nn.init.normal_(branch.to_out.weight)  # a fresh branch outputs zero: make it say something
    grid, px = (4, 6), 8
    c2w = _two_views()
    Kq = torch.tensor([[40.0, 0, 24], [0, 40.0, 16], [0, 0, 1]])
    mask = clip_epipolar_mask(c2w, Kq, (32, 48), grid, px)
    n = grid[0] * grid[1]
    x = torch.randn(1, 2 * n, 32, requires_grad=True)
    q = 9
    out = branch(x, mask[None], n)
    out[0, q].sum().backward()
    grad = x.grad[0].abs().sum(-1)
    allowed = mask[q].clone()
    allowed[q] = True  # the query's own input
    assert (grad[~allowed] == 0).all() and (~allowed).sum() > n // 2
    assert (grad[allowed] > 0).all()
    assert branch.registers.grad.abs().sum() > 0  # registers are always visible


def test_occlusion_masks_out_of_view_and_disoccluded_keys():
    grid, px, hw = (6, 8), 8, (48, 64)
    Kq = torch.tensor([[50.0, 0, 32], [0, 50.0, 24], [0, 0, 1]])
    c2w = torch.stack([torch.eye(4), make_pose(torch.eye(3), torch.tensor([1.0, 0, 0]))]).double()
    depth = torch.full((2, *grid), 4.0)
    vis = covisible_keys(c2w, Kq, hw, grid, px, depth)
    n = grid[0] * grid[1]
    cols = torch.arange(n) % grid[1]
    # camera 1 is 1 m to the right: at 4 m its right edge shows what camera 0 never saw
    assert not vis[0, 1][cols == grid[1] - 1].any() and vis[0, 1][cols < 4].all()
    assert vis[0, 0].all() and vis[1, 1].all()
    # an occluder in view 0 in front of where view 1's keys land: those keys were hidden, now disoccluded
    occluded = depth.clone()
    occluded[0, :, 3:5] = 1.0
    vis2 = covisible_keys(c2w, Kq, hw, grid, px, occluded)
    assert (vis[0, 1] & ~vis2[0, 1]).sum() >= grid[0]
    # without depth: points at infinity, a pure translation hides nothing
    assert covisible_keys(c2w, Kq, hw, grid, px, None).all()
    # the mask honours it
    full = clip_epipolar_mask(c2w, Kq, hw, grid, px, occlusion=True, depth=occluded)
    plain = clip_epipolar_mask(c2w, Kq, hw, grid, px)
    assert (full <= plain).all() and not full[:n, n:][:, ~vis2[0, 1]].any()


def test_blockwise_mask_matches_reference_and_attention_chunks_agree():
    from d4d.geometry.epipolar import epipolar_mask_reference
    from d4d.geometry.motions import motion_path

    c2w = motion_path("orbit", 5).double()
    ref = epipolar_mask_reference(c2w, K, GRID, PX)
    assert torch.equal(clip_epipolar_mask(c2w, K, IMAGE_HW, GRID, PX, block_frames=2), ref)
    torch.manual_seed(0)
    branch = EpipolarBranch(build_tiny_wan().transformer.blocks[0].attn1, 2, chunk_frames=1)
    torch.nn.init.normal_(branch.to_out.weight)
    x = torch.randn(1, ref.shape[0], 32)
    one = branch(x, ref[None], GRID[0] * GRID[1])
    branch.chunk_frames = 5
    torch.testing.assert_close(one, branch(x, ref[None], GRID[0] * GRID[1]))


# ------------------------------------------------------------------------ block-sparse (flex) path
SMALL_GRID, SMALL_PX, SMALL_HW = (6, 10), 8, (48, 80)
SMALL_K = torch.tensor([[60.0, 0, 40], [0, 60.0, 24], [0, 0, 1]])
CASES = [("orbit", False), ("zoom_in", False), ("orbit", True), ("turn_left", True)]


def _small_mask(motion: str, occlusion: bool, frames: int = 5) -> EpipolarMask:
    depth = 1 + 4 * torch.rand(frames, *SMALL_GRID, generator=torch.Generator().manual_seed(0))
    depth[1, 2:4, 3:6] = 0.5  # an occluder in front: keys behind it are disoccluded in the other views
    c2w = motion_path(motion, frames).double()
    return clip_epipolar_spans(c2w, SMALL_K, SMALL_HW, SMALL_GRID, SMALL_PX, occlusion, depth if occlusion else None)


def _with_registers(dense: torch.Tensor, registers: int) -> torch.Tensor:
    return torch.cat([torch.ones(*dense.shape[:2], registers, dtype=torch.bool), dense], -1)


@pytest.mark.parametrize("motion, occlusion", CASES)
def test_block_mask_tiles_and_mask_mod_are_exactly_the_dense_mask(motion, occlusion):
    mask, regs = _small_mask(motion, occlusion), 3
    dense = mask.dense()
    if not occlusion:  # the spans are the direct float64 evaluation
        ref = epipolar_mask_reference(motion_path(motion, 5).double(), SMALL_K, SMALL_GRID, SMALL_PX)
        assert torch.equal(dense[0], ref)
    else:  # occlusion removes keys, never adds any
        plain = _small_mask(motion, False).dense()
        assert (dense <= plain).all() and dense.sum() < 0.8 * plain.sum()
    full = _with_registers(dense, regs)
    length = mask.length
    assert torch.equal(flex.create_mask(mask.mask_mod(regs), 1, 1, length, regs + length, device="cpu")[:, 0], full)
    for bs in (16, 32):
        pad = F.pad(full, (0, -(-(length + regs) // bs) * bs - length - regs, 0, -(-length // bs) * bs - length))
        expected = pad.reshape(1, -(-length // bs), bs, -1, bs).any(4).any(2)
        tiles = mask.tiles(regs, bs)
        assert torch.equal(tiles, expected)
        assert torch.equal(mask.block_mask(regs, bs).to_dense()[:, 0].bool(), tiles)
    if motion != "zoom_in":
        assert mask.tiles(regs, 16).float().mean() < 0.9  # block sparsity to exploit


def _eager_flex_with_backward(monkeypatch):
    """torch 2.13 refuses flex_attention inputs that require grad on CPU (``_validate_device``), though its
    eager path (dense scores + mask_mod, HOP autograd) has a backward: lift the check for the test."""
    monkeypatch.setattr(flex, "_validate_device", lambda *args: None)
    monkeypatch.setattr(flex, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", False)
    monkeypatch.setattr(flex, "_warn_once", lambda *args, **kwargs: None)  # "called without torch.compile()"
    monkeypatch.setattr(ea, "flex_kernel", lambda device, needs_grad: flex.flex_attention)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the compiled flex kernel needs CUDA for a backward"))])
@pytest.mark.parametrize("motion, occlusion", CASES[:3])
def test_flex_and_dense_paths_give_the_same_outputs_and_gradients(motion, occlusion, device, monkeypatch):
    """On CPU flex runs eagerly (mask_mod; tiles are checked above and by the compiled test below);
    on CUDA the compiled block-sparse kernel, forward and backward."""
    if device == "cpu":
        _eager_flex_with_backward(monkeypatch)
    torch.manual_seed(0)
    branch = EpipolarBranch(build_tiny_wan().transformer.blocks[0].attn1, num_registers=3, chunk_frames=2).to(device)
    torch.nn.init.normal_(branch.to_out.weight)
    mask = _small_mask(motion, occlusion).to(device)
    x = torch.randn(1, mask.length, 32, device=device, requires_grad=True)
    target = torch.randn(1, mask.length, 32, device=device)
    params = [x, *branch.parameters()]
    results = {}
    for backend in ("dense", "flex"):
        branch.backend = backend
        out = branch(x, mask, mask.tokens_per_frame)
        results[backend] = (out, torch.autograd.grad((out * target).sum(), params))
    (dense, dense_grads), (sparse, sparse_grads) = results["dense"], results["flex"]
    assert dense.abs().mean() > 0.1
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    for a, b in zip(sparse_grads, dense_grads):  # float32 sums over all tokens: 1e-5 of the gradient's scale
        scale = float(b.abs().max())
        assert scale > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale)
    # not vacuous: a mask without the epipolar constraint gives another result
    branch.backend = "dense"
    assert not torch.allclose(branch(x, torch.ones(1, mask.length, mask.length, dtype=torch.bool, device=device),
                                     mask.tokens_per_frame), dense, atol=1e-3)


@pytest.mark.slow  # compiles the CPU flex kernel: ~10-30 s on a loaded 2-core CPU
def test_compiled_cpu_flex_kernel_skips_empty_tiles_and_matches_dense():
    """The compiled kernel is the one that reads the tile map: with 128-tiles of a clip where some are
    empty it must still give the dense result (a missing tile would drop allowed keys)."""
    torch.manual_seed(0)
    grid, hw = (16, 24), (128, 192)
    Kw = torch.tensor([[150.0, 0, 96], [0, 150.0, 64], [0, 0, 1]])
    mask = clip_epipolar_spans(motion_path("orbit", 3).double(), Kw, hw, grid, 8, occlusion=True)  # 1152 tokens
    tiles = mask.tiles(4)  # 9 x 10 tiles of 128
    assert 0.3 < tiles.float().mean() < 0.9
    branch = EpipolarBranch(build_tiny_wan().transformer.blocks[0].attn1, num_registers=4, backend="flex")
    torch.nn.init.normal_(branch.to_out.weight)
    x = torch.randn(1, mask.length, 32)
    with torch.no_grad():
        sparse = branch(x, mask, mask.tokens_per_frame)
        branch.backend = "dense"
        dense = branch(x, mask, mask.tokens_per_frame)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


def test_backend_choice_and_flex_training_on_cpu_is_refused():
    attn = build_tiny_wan().transformer.blocks[0].attn1
    with pytest.raises(UserError, match="model.epipolar_backend: expected one of dense, flex, auto, got 'sparse'"):
        EpipolarBranch(attn, backend="sparse")
    assert ea.resolve_backend("auto", torch.device("cpu")) == "dense"
    assert ea.resolve_backend("auto", torch.device("cuda")) == "flex"
    assert ea.resolve_backend("dense", torch.device("cuda")) == "dense"
    mask = _small_mask("orbit", False)
    branch = EpipolarBranch(attn, backend="flex")
    with pytest.raises(UserError, match="no backward on CPU"):
        branch(torch.randn(1, mask.length, 32), mask, mask.tokens_per_frame)
    with pytest.raises(TypeError, match="EpipolarMask"):
        branch(torch.randn(1, mask.length, 32), mask.dense(), mask.tokens_per_frame)


class _NoHostSync(TorchDispatchMode):
    """Raises on the ops that read a device value on the host: ``.item()``/``bool()``/``float()`` of a
    tensor (``_local_scalar_dense``), ``is_nonzero``, and ``nonzero``/``masked_select`` (data-dependent
    shapes). Higher-order ops (flex_attention) pass through unchecked."""

    supports_higher_order_operators = True
    aten = torch.ops.aten
    FORBIDDEN = {aten._local_scalar_dense, aten.is_nonzero, aten.nonzero, aten.masked_select}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not isinstance(func, torch._ops.HigherOrderOperator) and func.overloadpacket in self.FORBIDDEN:
            raise AssertionError(f"host synchronisation: {func}")
        return func(*args, **(kwargs or {}))


def test_masks_and_branches_do_not_synchronise_with_the_host(monkeypatch):
    """Mask construction (spans, occlusion, a depthless clip), the BlockMask, and the processor with its
    branch, dense forward + backward and flex (kernel stubbed: torch's own), with a 0/1 keep."""
    with pytest.raises(AssertionError, match="host synchronisation"), _NoHostSync():
        bool(torch.ones(2).any())  # the detector detects
    torch.manual_seed(0)
    attn = build_tiny_wan().transformer.blocks[0].attn1
    branch = EpipolarBranch(attn, num_registers=3, chunk_frames=2, backend="dense")
    torch.nn.init.normal_(branch.to_out.weight)
    depth = 1 + torch.rand(5, *SMALL_GRID)
    c2w = motion_path("orbit", 5).double()
    x = torch.randn(2, 5 * 60, 32, requires_grad=True)
    calls = []
    stub = lambda q, k, v, block_mask: calls.append(1) or q  # noqa: E731
    monkeypatch.setattr(ea, "flex_kernel", lambda device, needs_grad: stub)
    with _NoHostSync():
        mask = EpipolarMask.stack([clip_epipolar_spans(c2w, SMALL_K, SMALL_HW, SMALL_GRID, SMALL_PX, True, depth),
                                   clip_epipolar_spans(c2w, SMALL_K, SMALL_HW, SMALL_GRID, SMALL_PX, True, depth * 0)])
        mask.block_mask(3)
        ctx = BranchContext(mask=mask, keep=torch.tensor([1.0, 0.0]), any_keep=True, tokens_per_frame=60)
        processor = EpipolarAttnProcessor(lambda attn, h, *args: h, branch, ctx)
        out = processor(attn, x)
        out.square().sum().backward()
        branch.backend = "flex"
        processor(attn, x.detach())
    assert calls and x.grad.abs().sum() > 0 and torch.equal(out[1], x[1])  # keep = 0: nothing added
    # a depthless clip (all 0) takes the depth-free covisibility, chosen on the device
    assert not torch.equal(mask.covis[0], mask.covis[1])
    assert torch.equal(mask.covis[1], covisible_keys(c2w, SMALL_K, SMALL_HW, SMALL_GRID, SMALL_PX, None))
