"""argparse pieces shared by every d4d / data_prep command: number types and a one-line-error parser.

Types (``type=`` of ``add_argument``) check a value where it is parsed, so a bad number stops the
command before any work starts, with the flag and the value as typed::

    p.add_argument("--fov", type=float_in(0, 180, lo_open=True, hi_open=True), default=60.0)
    p.add_argument("--steps", type=positive_int)

    $ python -m d4d.sample_video ... --fov 0
    d4d.sample_video: error: --fov 0: must be > 0 and < 180

Every float type refuses ``nan`` and ``inf``. :class:`OneLineParser` prints argparse's errors as the
single line ``prog: error: message`` (no usage block) and exits 2, as
:func:`d4d.utils.errors.exit_with_error` does for the commands' own errors.
"""
from __future__ import annotations

import argparse
import math
import re
from typing import Callable

from d4d.utils.errors import exit_with_error

__all__ = [
    "OneLineParser", "one_line_argument_error", "int_at_least", "int_in", "positive_int", "nonneg_int",
    "finite_float", "positive_float", "nonneg_float", "float_in", "size_hw", "torch_device",
]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: not an integer") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text}: must be a finite number")
    return value


def _named(fn: Callable, name: str) -> Callable:
    fn.__name__ = name  # argparse shows a type's __name__ in some messages and in --help errors
    return fn


def int_at_least(lo: int) -> Callable[[str], int]:
    """An integer ``>= lo``."""
    def check(text: str) -> int:
        value = _int(text)
        if value < lo:
            raise argparse.ArgumentTypeError(f"{text}: must be >= {lo}")
        return value
    return _named(check, f"int>={lo}")


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    """An integer in ``[lo, hi]``."""
    def check(text: str) -> int:
        value = _int(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text}: must be in [{lo}, {hi}]")
        return value
    return _named(check, f"int in [{lo}, {hi}]")


positive_int = _named(int_at_least(1), "positive_int")
positive_int.__doc__ = "An integer >= 1."
nonneg_int = _named(int_at_least(0), "nonneg_int")
nonneg_int.__doc__ = "An integer >= 0."


def finite_float(text: str) -> float:
    """A finite float (no nan, no inf)."""
    return _float(text)


def positive_float(text: str) -> float:
    """A finite float > 0."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be > 0")
    return value


def nonneg_float(text: str) -> float:
    """A finite float >= 0."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 0")
    return value


def float_in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable[[str], float]:
    """A finite float between ``lo`` and ``hi`` (each bound included unless ``*_open``)."""
    def check(text: str) -> float:
        value = _float(text)
        ok_lo = value > lo if lo_open else value >= lo
        ok_hi = value < hi if hi_open else value <= hi
        if not (ok_lo and ok_hi):
            raise argparse.ArgumentTypeError(
                f"{text}: must be {'>' if lo_open else '>='} {lo:g} and {'<' if hi_open else '<='} {hi:g}")
        return value
    return _named(check, f"float in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")


def size_hw(min_side: int = 1, even: bool = False) -> Callable[[str], tuple[int, int]]:
    """``"HxW"`` (or ``"S"`` for a square) -> ``(H, W)``, both ``>= min_side`` (and even if ``even``)."""
    def check(text: str) -> tuple[int, int]:
        parts = text.lower().split("x")
        try:
            if len(parts) not in (1, 2):
                raise ValueError
            h, w = int(parts[0]), int(parts[-1])
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: expected HxW, e.g. 96x128") from None
        if min(h, w) < min_side:
            raise argparse.ArgumentTypeError(f"{text}: both sides must be >= {min_side}")
        if even and (h % 2 or w % 2):
            raise argparse.ArgumentTypeError(f"{text}: both sides must be even")
        return h, w
    return _named(check, "HxW")


# argparse's own per-argument messages; a type's message ("VALUE: reason") follows the flag directly.
_ARGPARSE_PHRASES = ("invalid ", "expected ", "not allowed", "ignored explicit")


def one_line_argument_error(message: str) -> str:
    """argparse's ``argument --fov: 0: must be > 0`` -> ``--fov 0: must be > 0`` (and
    ``argument --frames: invalid int value: 'x'`` -> ``--frames: invalid int value: 'x'``); other
    messages are returned as they are, joined into one line."""
    m = re.fullmatch(r"argument (\S+?): (.*)", message.strip(), re.S)
    if not m:
        return " ".join(message.split())
    flag = m.group(1).split("/")[-1]
    rest = " ".join(m.group(2).split())
    return f"{flag}: {rest}" if rest.startswith(_ARGPARSE_PHRASES) else f"{flag} {rest}"


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line ``<error_prog>: error: <message>`` on stderr, exit 2.

    ``error_prog`` is the name the command uses for its other errors (``d4d.sample_video``); default
    ``prog``. ``--help`` is unchanged."""

    def __init__(self, *args, error_prog: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.error_prog = error_prog

    def error(self, message: str) -> None:  # type: ignore[override]
        exit_with_error(one_line_argument_error(message), self.error_prog or self.prog)


def torch_device(text: str) -> str:
    """A torch device for ``--device``: ``auto`` (this process's GPU when CUDA is available, else
    ``cpu``), ``cpu``, ``cuda``, ``cuda:1`` ...; returns the resolved device string."""
    from d4d.utils.devices import command_device  # imports torch: only when a value is parsed

    try:
        return command_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc) if str(exc).startswith(text) else f"{text}: {exc}") from None
