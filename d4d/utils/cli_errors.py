"""Turning jsonargparse's multi-line, nested validation errors into one line that names the key.

jsonargparse reports a bad value inside a ``class_path``/``init_args`` section as a tree of Union
alternatives; the useful part is the innermost reason. This module extracts the full dotted key,
the reason, and for a misspelled key the closest accepted names.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import re

_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:",
          "Given value type:", "Given value:", "- Expected a <class 'NoneType'>")


def _accepted_names(class_path: str) -> list[str]:
    try:
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    except Exception:  # noqa: BLE001 - suggestions are best effort
        return []


def summarize_argument_error(text: str) -> str:
    """One line ``key <dotted.key>: <reason>[; did you mean ...?]`` from a jsonargparse error."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    keys = re.findall(r'Parser key "([^"]+)"', text)
    class_paths = re.findall(r"Problem with given class_path '([^']+)'", text)
    unknown = re.findall(r"Option '([^']+)' is not accepted", text) or re.findall(
        r"Key '([^']+)' is not expected", text)
    key = keys[0] if keys else ""
    if class_paths and len(keys) > 1:
        key = f"{keys[0]}.init_args.{keys[1]}"
    group = re.search(r"Group '([^']+)' does not accept option '([^']+)'", text)
    if group:
        accepted = _accepted_names("lightning.Trainer") if group.group(1) == "trainer" else []
        close = difflib.get_close_matches(group.group(2), accepted, n=2)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"key {group.group(1)}.{group.group(2)}: unknown key{hint}"
    reason = ""
    for ln in (ln.lstrip("- ").strip() for ln in lines):
        if ln.startswith("Parser key") or ln.startswith("Problem with given class_path"):
            continue
        if any(ln.startswith(n) or ln == n.strip() for n in _NOISE):
            continue
        reason = ln
        break
    got = re.search(r"Got value: (.*)", text) or re.search(r"Given value: (.*)", text)
    if got and "Got value" not in reason and not got.group(1).startswith(("{", "NestedArg")):
        reason = f"{reason}, got {got.group(1).strip()!r}"
    if unknown:
        name = unknown[0]
        key = f"{keys[0]}.init_args.{name}" if class_paths and keys else (name if not key else f"{key}.{name}")
        accepted = _accepted_names(class_paths[0]) if class_paths else []
        close = difflib.get_close_matches(name.rsplit(".", 1)[-1], accepted, n=2)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        where = f" by {class_paths[0]}" if class_paths else ""
        return f"key {key}: unknown key {name!r}, not accepted{where}{hint}"
    if not key:
        return " ".join(lines[:2])
    return f"key {key}: {reason or 'invalid value'}"
