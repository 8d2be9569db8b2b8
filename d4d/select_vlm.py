"""``python -m d4d.select_vlm IMAGE --model DIR_OR_ID``: choose the camera motion with Qwen2.5-VL.

Scores the eight motions by the log-likelihood of each as the answer to an instruction about the
image (never by parsing generated text), encoding the image and prompt once for all eight
(:mod:`d4d.selectors.vlm`). Prints the chosen motion and the probability of each (softmax over the
total answer log-likelihoods), or one JSON line with ``--json`` (also the log-likelihoods and token
counts). ``--model`` is a local directory (``save_pretrained`` layout with tokenizer and
``preprocessor_config.json``) or a hub id such as ``Qwen/Qwen2.5-VL-3B-Instruct``.
"""
from __future__ import annotations

import argparse
import json

from d4d.utils.cli_args import OneLineParser, torch_device
from d4d.utils.errors import UserError, exit_with_error

PROG = "d4d.select_vlm"


def _positive_pixels(text: str) -> int:
    value = int(text)
    if value < 56 * 56:
        raise argparse.ArgumentTypeError(f"{value} is below the processor's minimum of {56 * 56} (56x56)")
    return value


def main(argv: list[str] | None = None) -> None:
    from d4d.selectors.vlm import DEFAULT_MAX_PIXELS

    parser = OneLineParser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0], error_prog=PROG)
    parser.add_argument("image", help="input image (any format PIL reads)")
    parser.add_argument("--model", required=True, help="Qwen2.5-VL weights: local directory or hub id")
    parser.add_argument("--prompt", default=None,
                        help="text prompt of the video, given to the VLM as context")
    parser.add_argument("--instruction", default=None,
                        help="replace the question; '{options}' is filled with the eight answer phrases")
    parser.add_argument("--device", type=torch_device, default="auto",
                        help="torch device: auto (this process's GPU when CUDA is available, else cpu), "
                             "cpu, cuda[:N]")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU) | float32 | "
                        "bfloat16 | float16")
    parser.add_argument("--max-pixels", type=_positive_pixels, default=DEFAULT_MAX_PIXELS,
                        help=f"image area budget of the processor (default {DEFAULT_MAX_PIXELS} = 448x448)")
    parser.add_argument("--length-normalize", action="store_true",
                        help="softmax over the per-token mean log-likelihood instead of the total")
    parser.add_argument("--naive", action="store_true",
                        help="score the eight full sequences independently (reference; slower)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    try:
        from d4d.select import read_image
        from d4d.selectors.vlm import VLMSelector

        image = read_image(args.image)
        selector = VLMSelector.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                               max_pixels=args.max_pixels)
        scores = selector.scores(image, prompt=args.prompt, instruction=args.instruction,
                                 length_normalize=args.length_normalize, shared_prefix=not args.naive)
    except UserError as exc:
        exit_with_error(str(exc), PROG)
    probs = scores.as_dict()
    if args.json:
        print(json.dumps({
            "image": args.image, "model": args.model, "motion": scores.best, "probabilities": probs,
            "log_likelihood": dict(zip(scores.labels, map(float, scores.log_likelihood))),
            "num_tokens": dict(zip(scores.labels, map(int, scores.num_tokens))),
            "length_normalized": scores.length_normalized,
        }))
        return
    print(f"motion: {scores.best}")
    for label, p in sorted(probs.items(), key=lambda kv: -kv[1]):
        i = scores.labels.index(label)
        bar = "#" * round(40 * p)
        print(f"  {label:<11s} {p:6.3f} {bar:<40s} log-lik {float(scores.log_likelihood[i]):8.3f} "
              f"({int(scores.num_tokens[i])} tokens)")


if __name__ == "__main__":
    main()
