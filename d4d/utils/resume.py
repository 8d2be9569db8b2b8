"""Where a run continues from: ``resume: auto | PATH | none``, ``init_from: PATH`` (weights only)
and the wandb run id kept in the run directory.

Checkpoint kinds understood everywhere here:

* a Lightning ``.ckpt`` file (a torch zip archive; its ``state_dict`` holds the LightningModule's
  weights, keys as in ``module.state_dict()``);
* a DeepSpeed checkpoint directory written by Lightning's DeepSpeed strategy (``<name>.ckpt/`` with
  ``latest`` and ``checkpoint/*model_states.pt``);
* for ``init_from`` also a consolidated ``.pt``/``.pth`` (``d4d.export_checkpoint``) or a
  ``.safetensors`` file.

A checkpoint is *valid* when it was written completely: a zip archive whose central directory (at
its end) reads back, or a DeepSpeed directory whose model-state files do. Checkpoints are written to
a temporary name and renamed (:mod:`d4d.callbacks.checkpointing`), so a kill during a save leaves
only a ``*.tmp*`` that is never picked up.
"""
from __future__ import annotations

import os
import pickle
import uuid
import zipfile
from pathlib import Path
from typing import Any

from d4d.utils.errors import UserError
from d4d.utils.safe_load import load_tensors, refused, weights_only_loads
from d4d.utils.logging import get_logger

log = get_logger(__name__)

WANDB_ID_FILE = "wandb_run_id"
RESUME_CHOICES = ("auto", "none")


def is_valid_checkpoint(path: str | os.PathLike) -> bool:
    """True for a complete Lightning checkpoint file or DeepSpeed checkpoint directory."""
    path = Path(path)
    if ".tmp" in path.name:
        return False
    if path.is_dir():
        states = sorted(path.glob("checkpoint/*model_states.pt")) + sorted(path.glob("*/*model_states.pt"))
        return bool(states) and all(is_valid_checkpoint(p) for p in states)
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def checkpoint_candidates(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints of a run, oldest first: ``checkpoints/*.ckpt`` (not the ``last.ckpt`` link) and
    Lightning's Slurm requeue checkpoints ``hpc_ckpt_*.ckpt`` in the run directory."""
    run_dir = Path(run_dir)
    found = [p for p in (run_dir / "checkpoints").glob("*.ckpt") if not p.is_symlink()]
    found += list(run_dir.glob("hpc_ckpt_*.ckpt"))
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The most recently written valid checkpoint of ``run_dir`` (incomplete ones are skipped with
    a warning), or None."""
    for path in reversed(checkpoint_candidates(run_dir)):
        if is_valid_checkpoint(path):
            return path
        log.warning("skipping incomplete checkpoint %s", path)
    return None


def resolve_resume(spec: str | None, run_dir: str | os.PathLike) -> str | None:
    """The checkpoint to resume from for ``resume: spec`` (``auto``, ``none`` or a path), or None.

    Raises UserError for a path that does not exist or is not a complete checkpoint.
    """
    if spec is None or spec == "none":
        return None
    if spec == "auto":
        found = latest_checkpoint(run_dir)
        if found is None:
            log.info("resume: auto: no checkpoint in %s, starting from scratch", run_dir)
        return None if found is None else str(found)
    if not os.path.exists(spec):
        raise UserError(f"resume: {spec!r} does not exist (give auto, none or a checkpoint path)")
    if not is_valid_checkpoint(spec):
        raise UserError(f"resume: {spec!r} is not a complete Lightning or DeepSpeed checkpoint")
    return str(spec)


def _model_states_file(path: Path) -> Path | None:
    tag = (path / "latest").read_text().strip() if (path / "latest").is_file() else "checkpoint"
    files = sorted((path / tag).glob("*model_states.pt")) or sorted(path.glob("*/*model_states.pt"))
    return files[0] if files else None


def check_resume_stage(path: str | os.PathLike, model_class_path: str) -> None:
    """Refuse, as one line and before any logger starts, a ``resume`` checkpoint that another stage
    wrote (or that is not a training checkpoint at all, e.g. an exported weights file). The file is
    read weights-only and memory-mapped: only its small entries are touched."""
    path = Path(path)
    source = _model_states_file(path) if path.is_dir() else path
    blob = None if source is None else load_tensors(source, mmap=True, what="resume")
    if not isinstance(blob, dict) or "loops" not in blob or ("state_dict" not in blob and "module" not in blob):
        raise UserError(f"resume: {path} is not a Lightning training checkpoint (no training state; "
                        "to start from its weights use init_from)")
    hparams = blob.get("hyper_parameters")
    theirs = hparams.get("_class_path") if isinstance(hparams, dict) else None
    if theirs and theirs != model_class_path:
        stage = f", d4d_stage {blob['d4d_stage']!r}" if blob.get("d4d_stage") else ""
        raise UserError(f"resume: {path} was written by {theirs}{stage}, but this recipe trains "
                        f"{model_class_path}; resume a checkpoint of the same stage, or use init_from "
                        "to start from its weights")


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Delete what writes killed half-way left in ``run_dir`` (``*.ckpt.tmp<pid>`` files, DeepSpeed
    ``*.ckpt.tmp`` directories, the wandb id's temporary). Called with the run-directory lock held,
    so no live writer owns them. Returns what was removed."""
    import shutil

    run_dir = Path(run_dir)
    found = [*(run_dir / "checkpoints").glob("*.ckpt.tmp*"), *run_dir.glob("hpc_ckpt_*.ckpt.tmp*"),
             *run_dir.glob(f".{WANDB_ID_FILE}.tmp*")]
    for stale in found:
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    if found:
        log.warning("removed %d temporary file(s) left by an interrupted write in %s: %s", len(found), run_dir,
                    ", ".join(p.name for p in found[:4]) + (" ..." if len(found) > 4 else ""))
    return found


def wandb_run_id(run_dir: str | os.PathLike, resuming: bool, write: bool = True) -> str:
    """The wandb run id of this run: the one stored in ``<run_dir>/wandb_run_id`` when resuming,
    otherwise a new one, stored there (by global rank 0, ``write=True``) for the next resume."""
    path = Path(run_dir) / WANDB_ID_FILE
    if resuming and path.is_file():
        stored = path.read_text().strip()
        if stored:
            return stored
    run_id = uuid.uuid4().hex[:8]
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{WANDB_ID_FILE}.tmp{os.getpid()}")
        tmp.write_text(run_id + "\n")
        os.replace(tmp, path)
    return run_id


# ------------------------------------------------------------------------------ weights only
def clean_key(name: str) -> str:
    """A parameter or state-dict name as the plain module names it: without the activation-checkpoint
    wrapper's ``_checkpoint_wrapped_module.`` segment and Lightning-DeepSpeed's ``_forward_module.``
    prefix."""
    return name.removeprefix("_forward_module.").replace("_checkpoint_wrapped_module.", "")


def clean_state_dict_keys(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with every key through :func:`clean_key`."""
    return {clean_key(k): v for k, v in state.items()}


def _deepspeed_state_dict(path: Path) -> dict[str, Any]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = None
    if not (path / "latest").is_file():
        tags = [p.name for p in path.iterdir() if p.is_dir()]
        tag = tags[0] if len(tags) == 1 else None
    try:
        with weights_only_loads():  # DeepSpeed's reader asks for unrestricted unpickling
            state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)
    except pickle.UnpicklingError as exc:
        raise refused(path, exc, "init_from") from None
    return clean_state_dict_keys(state)


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Model weights from any checkpoint kind listed in the module docstring (on CPU), read
    weights-only (:mod:`d4d.utils.safe_load`): a file that would run code is refused."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"init_from: {str(path)!r} does not exist")
    try:
        if path.is_dir():
            return _deepspeed_state_dict(path)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
    except UserError:
        raise
    except (OSError, RuntimeError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(f"init_from: cannot read {str(path)!r}: {str(exc).splitlines()[0]}") from None
    obj = load_tensors(path, what="init_from")
    for key in ("state_dict", "module", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise UserError(f"init_from: {str(path)!r} holds no state dict of weights")
    return clean_state_dict_keys(obj)


def init_weights_from(module, path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Load the weights of ``path`` into ``module`` non-strictly (no optimizer, step or data state:
    that is ``resume``). Returns and logs ``(missing, unexpected)`` keys. Tensors whose shape differs
    are left out and reported as missing. Raises UserError when not a single key matches."""
    state = read_state_dict(path)
    own = module.state_dict()
    mismatched = [k for k, v in state.items() if k in own and hasattr(v, "shape") and v.shape != own[k].shape]
    state = {k: v for k, v in state.items() if k not in mismatched}
    result = module.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    loaded = len(state) - len(unexpected)
    if loaded == 0:
        raise UserError(f"init_from: no weight of {str(path)!r} matches the model "
                        f"(checkpoint keys like {next(iter(state), '-')!r}, model keys like {next(iter(own), '-')!r})")
    log.info("init_from %s: loaded %d tensors; %d missing, %d unexpected, %d shape mismatches",
             path, loaded, len(missing), len(unexpected), len(mismatched))
    for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if keys:
            log.warning("init_from: %s keys (%d): %s%s", name, len(keys), ", ".join(keys[:8]),
                        " ..." if len(keys) > 8 else "")
    hook = getattr(module, "on_init_from", None)
    if callable(hook):  # lets a module re-derive parts that are built from others (e.g. copies of loaded weights)
        hook(missing + mismatched)
    return missing + mismatched, unexpected
