"""Camera geometry in full precision whatever the autocast state.

Under ``bf16-mixed`` (autocast) a matmul of two float32 camera tensors returns bf16, and the next
op then mixes bf16 and float32 (``torch.linalg.cross`` refuses that) or silently loses the 8 bits
that decide which side of an epipolar line a token lies on. :func:`full_precision` makes a geometry
function run with autocast off, with 16-bit floating tensor arguments raised to float32 (float64
inputs stay float64), so its result is what it is without autocast.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])
_LOW = (torch.float16, torch.bfloat16)


def autocast_off() -> contextlib.AbstractContextManager:
    """A context with CPU and CUDA autocast disabled (a no-op when neither is on)."""
    stack = contextlib.ExitStack()
    for device in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device):
            stack.enter_context(torch.autocast(device_type=device, enabled=False))
    return stack


def _raise(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype in _LOW:
        return value.float()
    if isinstance(value, dict):  # e.g. a network's output dict handed to a loss
        return {k: _raise(v) for k, v in value.items()}
    return value


def full_precision(fn: F) -> F:
    """Decorator: run ``fn`` with autocast off and its bf16/fp16 tensor arguments as float32
    (generator functions too, around each step)."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            with autocast_off():
                inner = fn(*[_raise(a) for a in args], **{k: _raise(v) for k, v in kwargs.items()})
            while True:
                with autocast_off():
                    try:
                        item = next(inner)
                    except StopIteration:
                        return
                yield item
        return generator  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with autocast_off():
            return fn(*[_raise(a) for a in args], **{k: _raise(v) for k, v in kwargs.items()})
    return wrapper  # type: ignore[return-value]
