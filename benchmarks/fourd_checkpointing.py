"""Activation checkpointing on the 512 DPT model: peak memory and step time with and without it,
measured in the same run (each setting in its own subprocess, so peaks do not mix).

The model is the 512 recipe's layout (DPT head, cross-frame decoder, DINOv2-style encoder, patch
14, first aspect ratio 378x504) at a width that fits a CPU: ``--enc-dim/--enc-layers/--dec-dim/
--dec-depth`` (defaults 384 / 6 / 384 / 6, ViT-S-like); pass the recipe's 768 / 12 / 768 / 12 on a GPU.
Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process's peak RSS increase
over the state after building the model (``ru_maxrss``), which includes allocator slack.

    python -m benchmarks.fourd_checkpointing [--frames 2] [--size 378x504] [--steps 2] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(cfg: dict) -> dict:
    import torch

    from d4d.fourd.losses import reconstruction_loss
    from d4d.fourd.network import ReconstructionNet
    from d4d.utils.activation_checkpointing import apply_activation_checkpointing

    torch.manual_seed(0)
    dev = torch.device(cfg["device"])
    enc = {"type": "dinov2", "hidden_size": cfg["enc_dim"], "num_hidden_layers": cfg["enc_layers"],
           "num_attention_heads": cfg["enc_dim"] // 64, "intermediate_size": 4 * cfg["enc_dim"],
           "patch_size": 14, "image_size": 518}
    net = ReconstructionNet(None, enc, cfg["dec_dim"], cfg["dec_depth"], cfg["dec_dim"] // 64, "dpt",
                            {"features": 128, "layer_dims": [48, 96, 192, 384]}).to(dev)
    wrapped = apply_activation_checkpointing(net, ["CrossFrameBlock", "Dinov2Layer"]) if cfg["checkpointing"] else 0
    h, w = cfg["size"]
    b, f = 1, cfg["frames"]
    frames = torch.rand(b, f, 3, h, w, device=dev)
    c2w = torch.eye(4, device=dev).repeat(b, f, 1, 1)
    c2w[:, :, 0, 3] = torch.linspace(0, 0.3, f, device=dev)
    K = torch.tensor([[400.0, 0, w / 2], [0, 400.0, h / 2], [0, 0, 1]], device=dev).repeat(b, f, 1, 1)
    depth = 1 + torch.rand(b, f, h, w, device=dev)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(cfg["steps"]):
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = net(frames, c2w, K)
        loss = reconstruction_loss(out, depth, K, c2w, torch.tensor([True], device=dev))["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss)
    return {"checkpointing": cfg["checkpointing"], "wrapped": wrapped, "peak_mib": peak,
            "step_s": min(times[1:] or times), "params_m": sum(p.numel() for p in net.parameters()) / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=2)
    p.add_argument("--size", default="378x504")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--enc-dim", type=int, default=384)
    p.add_argument("--enc-layers", type=int, default=6)
    p.add_argument("--dec-dim", type=int, default=384)
    p.add_argument("--dec-depth", type=int, default=6)
    p.add_argument("--device", default="cpu")
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._one:
        print(json.dumps(one(json.loads(args._one))))
        return
    h, w = (int(v) for v in args.size.split("x"))
    rows = []
    for ckpt in (False, True):
        cfg = {"frames": args.frames, "size": [h, w], "steps": args.steps, "enc_dim": args.enc_dim,
               "enc_layers": args.enc_layers, "dec_dim": args.dec_dim, "dec_depth": args.dec_depth,
               "device": args.device, "checkpointing": ckpt}
        proc = subprocess.run([sys.executable, "-m", "benchmarks.fourd_checkpointing", "--_one", json.dumps(cfg)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"checkpointing={ckpt}: done", flush=True)
    print(f"512 DPT model, {rows[0]['params_m']:.1f} M params, {args.frames} frames of {h}x{w}, batch 1, {args.device}")
    print(f"{'activation checkpointing':26s} {'blocks':>6s} {'peak MiB':>9s} {'step s':>7s}")
    for r in rows:
        print(f"{'on' if r['checkpointing'] else 'off (baseline)':26s} {r['wrapped']:6d} {r['peak_mib']:9.0f} {r['step_s']:7.2f}")
    off, on = rows
    print(f"peak memory {100 * (1 - on['peak_mib'] / off['peak_mib']):.0f}% lower, step time x{on['step_s'] / off['step_s']:.2f}")


if __name__ == "__main__":
    main()
