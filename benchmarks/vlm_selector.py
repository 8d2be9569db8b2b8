"""Speed of the VLM motion selector: shared image+prompt prefix vs naive scoring of eight sequences.

``python -m benchmarks.vlm_selector [--hidden 256 --layers 4 --vision-depth 4 --max-pixels 200704]``

Builds a small random Qwen2.5-VL (:mod:`d4d.selectors.tiny`, real architecture, toy width), encodes
one image, and times in the same run (median of ``--repeats``):
  * naive: eight independent full forwards (vision tower + prefix + answer each time), the baseline;
  * shared: one prefix forward with KV cache, repeated to batch 8, one short batched forward.
Prints both times, the speed-up and the largest difference between the two sets of scores.
The speed-up grows with the prefix length (image tokens) and the depth of the model.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def _time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> None:
    from d4d.selectors.tiny import tiny_image_processor, tiny_qwen2_5_vl, tiny_tokenizer
    from d4d.selectors.vlm import VLMSelector, score_naive, score_shared_prefix

    parser = argparse.ArgumentParser(prog="python -m benchmarks.vlm_selector",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vision-depth", type=int, default=4)
    parser.add_argument("--max-pixels", type=int, default=224 * 224,
                        help="image area budget (sets the number of image tokens)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = tiny_tokenizer()
    model = tiny_qwen2_5_vl(tokenizer, hidden=args.hidden, layers=args.layers, heads=args.heads,
                            vision_depth=args.vision_depth)
    selector = VLMSelector(model, tokenizer, tiny_image_processor(max_pixels=args.max_pixels))
    image = (np.random.default_rng(0).random((480, 640, 3)) * 255).astype(np.uint8)
    inputs = selector.encode(image, prompt="a bright living room with a sofa and a plant")
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: hidden {args.hidden}, {args.layers} text layers, {args.vision_depth} vision blocks, "
          f"{params:.1f}M params, {torch.get_num_threads()} threads")
    print(f"prompt: {inputs['input_ids'].shape[1]} tokens ({int(inputs['mm_token_type_ids'].sum())} image), "
          f"answers {sorted(len(c) for c in selector.candidates)} tokens")

    t_naive, naive = _time(lambda: score_naive(model, inputs, selector.candidates), args.repeats)
    t_shared, shared = _time(lambda: score_shared_prefix(model, inputs, selector.candidates), args.repeats)
    print(f"naive  (8 full sequences): {1000 * t_naive:8.1f} ms  (baseline)")
    print(f"shared (prefix once + KV): {1000 * t_shared:8.1f} ms")
    diff = float((shared - naive).abs().max())
    print(f"speed-up: {t_naive / t_shared:.2f}x   max |score difference|: {diff:.2e} nats")


if __name__ == "__main__":
    main()
