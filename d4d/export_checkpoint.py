"""``python -m d4d.export_checkpoint RUN_OR_CKPT OUT.pt``: one consolidated fp32 weights file.

Input (``RUN_OR_CKPT``):

* a run directory: its newest complete checkpoint (as ``resume: auto`` picks it);
* a DeepSpeed checkpoint directory, from Lightning's DeepSpeed strategy (``step00001000.ckpt/``) or
  from a raw ``engine.save_checkpoint(dir)``: the ZeRO-2/3 shards of every rank are merged with
  DeepSpeed's ``zero_to_fp32`` (via Lightning's ``convert_zero_checkpoint_to_fp32_state_dict`` for
  Lightning checkpoints, which keeps ``global_step``, ``epoch`` and hyper-parameters);
* a Lightning ``.ckpt`` file: optimizer and loop state are dropped.

Output: ``torch.save({"state_dict": {name: fp32 tensor}, "source": str, ...})`` written atomically,
with the EMA weights (``ema_state_dict``, ``ema``) when the run kept them (``ema`` key of ``d4d.fit``);
``init_from: OUT.pt`` (or ``torch.load(OUT.pt)["state_dict"]``) loads it. Runs on CPU, one process,
no GPU needed; memory: the full fp32 model.
"""
from __future__ import annotations

import argparse
import pickle
import os
import sys
from pathlib import Path

from d4d.utils.cli_args import OneLineParser
from d4d.utils.errors import UserError, exit_with_error
from d4d.utils.paths import check_output_file
from d4d.utils.safe_load import load_tensors, refused, weights_only_loads

PROG = "d4d.export_checkpoint"
EMA_KEYS = ("ema_state_dict", "ema")  # kept as they are: sampling reads them (d4d.callbacks.ema)


def _lightning_deepspeed_dir(path: Path) -> bool:
    """Lightning's DeepSpeed checkpoints hold a ``checkpoint/`` tag whose model states carry Lightning's
    client state (``global_step`` etc.)."""
    return (path / "checkpoint").is_dir() and any((path / "checkpoint").glob("*model_states.pt"))


def _deepspeed_tag(path: Path) -> str | None:
    if (path / "latest").is_file():
        return None  # zero_to_fp32 reads it
    tags = sorted(p.name for p in path.iterdir() if p.is_dir() and any(p.glob("*model_states.pt")))
    if len(tags) != 1:
        raise UserError(f"{path}: no 'latest' file and {len(tags)} checkpoint tags ({', '.join(tags) or 'none'})")
    return tags[0]


def export(source: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write the consolidated weights of ``source`` to ``out``; returns what was written."""

    from d4d.callbacks.checkpointing import atomic_torch_save
    from d4d.utils.resume import is_valid_checkpoint, latest_checkpoint

    source, out = Path(source), Path(out)
    if not source.exists():
        raise UserError(f"{source}: no such run directory or checkpoint")
    if source.is_dir() and not (source / "latest").is_file() and not _lightning_deepspeed_dir(source) \
            and not any(source.glob("*/*model_states.pt")):
        found = latest_checkpoint(source)
        if found is None:
            raise UserError(f"{source}: a run directory without a complete checkpoint "
                            "(looked in checkpoints/ and hpc_ckpt_*.ckpt)")
        print(f"{PROG}: newest checkpoint of {source}: {found}", file=sys.stderr)
        source = found
    if not is_valid_checkpoint(source):
        raise UserError(f"{source}: incomplete or unreadable checkpoint")
    out.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        if _lightning_deepspeed_dir(source):
            from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

            tmp = out.with_name(out.name + f".tmp{os.getpid()}")
            try:
                with weights_only_loads():  # Lightning's and DeepSpeed's readers ask for unrestricted unpickling
                    convert_zero_checkpoint_to_fp32_state_dict(str(source), str(tmp))
                result = load_tensors(tmp, what="checkpoint")
            except pickle.UnpicklingError as exc:
                raise refused(source, exc, "checkpoint") from None
            finally:
                tmp.unlink(missing_ok=True)
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            try:
                with weights_only_loads():
                    state = get_fp32_state_dict_from_zero_checkpoint(str(source), tag=_deepspeed_tag(source))
            except pickle.UnpicklingError as exc:
                raise refused(source, exc, "checkpoint") from None
            result = {"state_dict": state}
    else:
        ckpt = load_tensors(source, what="checkpoint")
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
            raise UserError(f"{source}: not a Lightning checkpoint (no 'state_dict')")
        result = {k: ckpt[k] for k in ("state_dict", "global_step", "epoch", "hyper_parameters", *EMA_KEYS)
                  if k in ckpt}
    from d4d.utils.resume import clean_state_dict_keys

    for key in ("state_dict", "ema_state_dict"):  # the EMA of the trainable weights: d4d.callbacks.ema
        if isinstance(result.get(key), dict):
            result[key] = {k: v.float() if v.is_floating_point() else v
                           for k, v in clean_state_dict_keys(result[key]).items()}
    result["source"] = str(source)
    atomic_torch_save(result, out)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__, error_prog=PROG)
    parser.add_argument("source", help="run directory, DeepSpeed checkpoint directory or .ckpt file")
    parser.add_argument("out", help="output .pt file")
    args = parser.parse_args(argv)
    try:
        check_output_file(args.out, "OUT")
        result = export(args.source, args.out)
    except UserError as exc:
        exit_with_error(str(exc), PROG)
    n = sum(v.numel() for v in result["state_dict"].values())
    print(f"{PROG}: wrote {args.out}: {len(result['state_dict'])} tensors, {n:,} parameters "
          f"{'and their EMA ' if result.get('ema_state_dict') else ''}(from {result['source']})")


if __name__ == "__main__":
    main()
