"""User-facing errors: a mistake in a recipe, a path or a value, reported as one line."""
from __future__ import annotations

import sys
from typing import NoReturn


class UserError(ValueError):
    """A problem the user can fix (bad path, key or value). Entry points print it as one line
    ``error: <message>`` and exit with status 2 instead of showing a traceback.

    Raised in a DataLoader worker, torch re-raises it in the main process as ``type(err)(msg)`` with
    ``msg`` = "Caught ... in DataLoader worker process N.\nOriginal Traceback ...": the constructor
    keeps only the original message of such a text, so the user still gets their one line."""

    def __init__(self, *args: object):
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith("Caught ") \
                and "\nOriginal Traceback" in args[0]:
            marker = f"{type(self).__qualname__}: "
            at = args[0].rfind(marker)
            if at >= 0:
                args = (args[0][at + len(marker):].strip(),)
        super().__init__(*args)


def exit_with_error(message: str, prog: str = "d4d", status: int = 2) -> NoReturn:
    """Print ``<prog>: error: <message>`` on stderr as a single line and exit."""
    one_line = " ".join(str(message).split())
    print(f"{prog}: error: {one_line}", file=sys.stderr)
    sys.exit(status)
