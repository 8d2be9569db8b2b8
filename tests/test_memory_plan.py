"""benchmarks.memory_plan: modules built on meta, activation bytes and FLOPs measured on meta, the
strategy memory model and the CLI, on the debug recipes (plus the full dynamic stage's parameter
counts, built on meta in a few seconds)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks.memory_plan import STRATEGIES, optimizer_bytes, param_stats, per_gpu, schedule_samples, world
from benchmarks.memory_stages import Stage, build_stage, read_recipe
from benchmarks.meta_measure import measure_step
from tests.conftest import REPO, run_module

DEBUG = sorted((REPO / "recipes" / "debug").glob("*.yaml"))
IDS = [p.stem for p in DEBUG]


@pytest.mark.parametrize("recipe", DEBUG, ids=IDS)
def test_meta_build_has_the_parameters_of_the_real_build(recipe):
    meta, real = build_stage(recipe, "meta"), build_stage(recipe, "cpu")
    shapes = {n: (tuple(p.shape), p.dtype, p.requires_grad) for n, p in meta.module.named_parameters()}
    assert all(p.device.type == "meta" for p in meta.module.parameters())
    assert shapes == {n: (tuple(p.shape), p.dtype, p.requires_grad) for n, p in real.module.named_parameters()}
    stats = param_stats(meta, 100_000)
    assert stats.total == sum(p.numel() for p in real.module.parameters())
    assert stats.trainable == sum(p.numel() for p in real.module.parameters() if p.requires_grad) > 0
    if hasattr(getattr(real.module, "model", None), "trainable_parameters"):  # what the optimizer gets
        assert stats.trainable == sum(p.numel() for p in real.module.model.trainable_parameters())


@pytest.mark.parametrize("recipe", DEBUG, ids=IDS)
def test_meta_measurement_equals_a_real_cpu_step(recipe):
    """Saved-for-backward bytes, live peaks and FLOPs of a tiny real forward + backward on CPU are what
    the meta run says (both on PyTorch's math attention, which is what the CPU runs)."""
    targets = read_recipe(recipe).get("activation_checkpointing")
    meta = measure_step(build_stage(recipe, "meta"), targets, sdpa="math")
    real = measure_step(build_stage(recipe, "cpu"), targets, sdpa="math")
    assert meta == real
    assert meta.saved > 0 and meta.flops_fwd > 0 and meta.flops_bwd > 0
    if targets:  # (the tiny dynamic model's peak is its VAE encoding, checkpointing or not)
        assert meta.blocks > 0 and meta.saved_ac < meta.saved and meta.peak_ac <= meta.peak
        assert 0 < meta.flops_recompute <= meta.flops_fwd


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _toy_stage(module, make_input):
    return Stage("toy", {}, module, lambda: {"x": make_input()}, lambda x: x, lambda x: module(x["x"]), 1, set(),
                 False)


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_saved_bytes_of_a_hand_counted_network(device):
    """fc1 keeps its input (for its weight gradient), relu and fc2 share relu's output: 4x16 + 4x32
    float32 values; parameters are not activations."""
    with torch.device(device):
        toy = _Toy()
    m = measure_step(_toy_stage(toy, lambda: torch.ones(4, 16, device=device)), None, sdpa="math")
    assert m.saved == (4 * 16 + 4 * 32) * 4
    assert m.flops_fwd == 2 * 4 * (16 * 32 + 32 * 8)
    assert m.flops_bwd == 2 * 4 * (16 * 32 + 32 * 8) + 2 * 4 * 32 * 8  # weight grads both, input grad of fc2 only


def test_checkpointed_blocks_keep_only_their_inputs():
    """Four blocks of (Linear, GELU, Linear) on 64 x 256 float32 tokens: checkpointing keeps the four
    block inputs plus one block's own tensors instead of every block's."""
    blocks = nn.Sequential(*[nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)) for _ in range(4)])
    blocks.to("meta")
    stage = _toy_stage(blocks, lambda: torch.ones(64, 256, device="meta"))
    m = measure_step(stage, ["*"], sdpa="math")  # the four top-level blocks (names "0".."3")
    token = 64 * 256 * 4
    hidden = 64 * 512 * 4
    assert m.blocks == 4
    assert m.saved == 4 * token + 4 * 2 * hidden  # each block: its input (fc weight grad), 2 hidden tensors
    assert m.block_inputs == 4 * token
    assert m.saved_ac == 4 * token + 2 * hidden
    assert m.peak_ac < m.peak


def test_gpu_attention_saves_the_fused_kernels_tensors():
    """With sdpa="gpu" a masked attention keeps q, k, v, the output, the logsumexp and the additive
    bias (padded to 16 keys), not the (Lq, Lk) probabilities of the math path."""
    b, h, lq, lk, d = 1, 4, 48, 50, 32

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.kv = nn.Linear(d, d * h), nn.Linear(d, 2 * d * h)

        def forward(self, x, y, mask):
            q = self.q(x).view(b, lq, h, d).transpose(1, 2)
            k, v = self.kv(y).view(b, lk, 2, h, d).permute(2, 0, 3, 1, 4)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    with torch.device("meta"):
        attn = Attn().to(torch.bfloat16)
    inputs = lambda: {"x": torch.ones(b, lq, d, device="meta", dtype=torch.bfloat16),  # noqa: E731
                      "y": torch.ones(b, lk, d, device="meta", dtype=torch.bfloat16),
                      "mask": torch.ones(b, 1, lq, lk, dtype=torch.bool, device="meta")}
    stage = Stage("attn", {}, attn, inputs, lambda x: x, lambda x: attn(x["x"], x["y"], x["mask"]), 1, set(), False)
    gpu, math = measure_step(stage, None, sdpa="gpu"), measure_step(stage, None, sdpa="math")
    bf16 = 2
    projections = bf16 * (b * lq * d + b * lk * d)  # inputs of the two linears
    q, kv, out = bf16 * b * lq * h * d, bf16 * b * lk * 2 * h * d, bf16 * b * h * lq * d  # k, v: views of kv
    lse, bias = 4 * b * h * 64, bf16 * b * lq * 64  # float32 logsumexp (48 -> 64 rows), bias padded 50 -> 64 keys
    rng = 2 * 8  # the kernel's philox seed and offset
    assert gpu.saved == projections + q + kv + out + lse + bias + rng
    assert math.saved > gpu.saved + 2 * b * h * lq * lk  # the math path keeps the probabilities
    assert gpu.flops_fwd == math.flops_fwd and gpu.flops_sdpa_fwd == 4 * b * h * lq * lk * d


def test_full_dynamic_stage_has_the_published_sizes():
    """Wan 2.1 I2V 14B + UMT5-XXL + CLIP-H + VAE on meta, the recipe's camera and epipolar branches:
    counts against the formulas of the branches and the filed 27.25B / 4.41B."""
    stage = build_stage(REPO / "recipes" / "dynamic.yaml", "meta")
    m = stage.module.model
    dim, blocks = 5120, len(m.transformer.blocks)
    branch = 4 * (dim * dim + dim) + 2 * dim + 4 * dim  # q, k, v, out; two RMSNorms; 4 registers
    hidden = stage.recipe["model"]["init_args"]["camera_hidden"]
    plucker = 6 * 16 ** 2 * 4  # 6 channels x (8 x 2 px)^2 x 4 frames per latent frame
    camera = plucker * hidden + hidden + hidden * hidden + hidden + blocks * (hidden * dim + dim)
    stats = param_stats(stage, 100_000)
    assert blocks == 40 and sum(p.numel() for p in m.epipolar.parameters()) == blocks * branch
    assert sum(p.numel() for p in m.camera.parameters()) == camera
    assert stats.trainable == blocks * branch + camera
    assert round(stats.total / 1e9, 2) == 27.25 and round(stats.trainable / 1e9, 2) == 4.41
    assert {p.dtype for p in m.vae.parameters()} == {torch.float32}
    assert {p.dtype for p in m.text_encoder.parameters()} == {torch.bfloat16}  # recipe: frozen_dtype bfloat16
    assert stats.host == 4 * stats.trainable  # load_device auto: the frozen parts go straight to the GPU

    opt = optimizer_bytes(stage.recipe, [p for p in stage.module.parameters() if p.requires_grad])
    assert (opt.state, opt.temporary) == (8, 4)  # AdamW: exp_avg + exp_avg_sq; foreach sqrt temporary
    gpus, per_node, _ = world(stage.recipe, 8)
    act = 20 * 10 ** 9
    totals = [per_gpu(stats, s, gpus, "bf16-mixed", opt, act)["total"] for s in STRATEGIES]
    assert totals[3] < totals[2] < totals[1] < totals[0]
    z1 = per_gpu(stats, "ZeRO-1", gpus, "bf16-mixed", opt, act)
    assert z1["weights"] == 2 * stats.total and z1["grads"] == 2 * stats.trainable
    assert z1["optim"] == 12 * stats.trainable // gpus and z1["step"] == 8 * stats.trainable // gpus
    assert schedule_samples(stage.recipe, 1, gpus)[0] == 50_000 * 8 * 8


@pytest.mark.parametrize("recipe", DEBUG, ids=IDS)
def test_zero_stages_shard_model_states(recipe):
    """On 8 GPUs, weights + gradients + optimizer states per GPU shrink from DDP to ZeRO-3."""
    stage = build_stage(recipe, "meta")
    stats = param_stats(stage, 100_000)
    opt = optimizer_bytes(stage.recipe, [p for p in stage.module.parameters() if p.requires_grad])
    assert opt.state == 8  # Adam / AdamW
    states = []
    for s in STRATEGIES:
        r = per_gpu(stats, s, 8, "bf16-mixed", opt, 0)
        states.append(r["weights"] + r["grads"] + r["optim"])
    ddp, z1, z2 = states[:3]
    assert z2 < z1 < ddp
    z3 = per_gpu(stats, "ZeRO-3", 8, "bf16-mixed", opt, 0)
    assert z3["grads"] + z3["optim"] == states[2] - 2 * stats.total  # ZeRO-3 = ZeRO-2 with the weights sharded


def test_cli_prints_one_row_per_recipe(tmp_path):
    out = tmp_path / "plan.json"
    proc = run_module("benchmarks.memory_plan", *map(str, DEBUG), "--json", str(out), timeout=600)
    table = proc.stdout.split("\n\n")[1].splitlines()
    assert table[0].split()[:3] == ["recipe", "params", "trainable"]
    assert [line.split()[0] for line in table[1:]] == IDS
    plans = json.loads(out.read_text())
    assert [Path(p["recipe"]).stem for p in plans] == IDS
    for p in plans:
        assert p["fits"] and p["gpus"] == 1 and p["host_node"] == p["host_rank"] * p["per_node"]
        f = p["flops_per_sample"]
        assert f["model"] <= f["counted"] and f["recompute"] >= 0 and p["gpu_hours"] > 0
    dynamic = next(p for p in plans if p["stage"] == "DynamicVideoModule")
    assert 0 < dynamic["epipolar"]["rows"]["dense"]["share"] < 1
