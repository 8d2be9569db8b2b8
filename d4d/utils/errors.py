"""User-facing errors: a mistake in a recipe, a path or a value, reported as one line."""
from __future__ import annotations

import sys
from typing import NoReturn


class UserError(ValueError):
    """A problem the user can fix (bad path, key or value). Entry points print it as one line
    ``error: <message>`` and exit with status 2 instead of showing a traceback."""


def exit_with_error(message: str, prog: str = "d4d", status: int = 2) -> NoReturn:
    """Print ``<prog>: error: <message>`` on stderr as a single line and exit."""
    one_line = " ".join(str(message).split())
    print(f"{prog}: error: {one_line}", file=sys.stderr)
    sys.exit(status)
