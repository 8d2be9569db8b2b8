"""Which torch device a process runs on: ``auto`` is this process's GPU when CUDA is available, else the CPU.

Shared by the commands' ``--device`` flags (``d4d.generate``, ``d4d.evaluate``, ``d4d.sample_video``:
default ``auto``) and by the dynamic stage's backbone loading (``load_device``).
"""
from __future__ import annotations

import os

import torch


def resolve_device(spec: str = "auto") -> torch.device:
    """``"auto"`` -> this process's GPU (``cuda:LOCAL_RANK``, else ``SLURM_LOCALID``, else 0) when CUDA
    is available, else the CPU; anything else is taken as a device string (``cpu``, ``cuda``, ``cuda:1``).

    Raises:
        ValueError: ``spec`` is not a device string torch knows.
    """
    if spec != "auto":
        try:
            return torch.device(spec)
        except RuntimeError as exc:  # "Expected one of cpu, cuda, ... device type at start of device string"
            raise ValueError(str(exc).splitlines()[0]) from None
    if not torch.cuda.is_available():
        return torch.device("cpu")
    rank = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    return torch.device("cuda", int(rank) % max(1, torch.cuda.device_count()))


def command_device(spec: str) -> str:
    """A command's ``--device`` value -> the device string it runs on (``auto`` resolved). A CUDA device
    on a machine without CUDA, or one past the GPUs there, is refused here rather than at the first
    tensor moved.

    Raises:
        ValueError: a one-line reason, for ``argparse.ArgumentTypeError``.
    """
    device = resolve_device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{spec}: CUDA is not available here (torch {torch.__version__}); "
                             "use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{spec}: there are {torch.cuda.device_count()} CUDA devices")
    return str(device)
