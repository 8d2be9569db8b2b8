"""Which per-scene 4D optimisation settings a run uses, and where each came from.

The lead's contract for consumers of a 4D generator checkpoint (``d4d.generate``, ``d4d.evaluate``):
each field of :class:`d4d.fourd.optimise.OptimConfig` is taken from, in order,

1. an explicit command-line flag (e.g. ``--pose-steps 10``),
2. the checkpoint's ``scene_optimisation`` hparam (``FourDGenModule(scene_optimisation={pose_steps:
   5, steps: 20})`` in the recipe; :func:`d4d.modules.fourdgen.load_network` returns it in its
   ``meta``; checkpoints written before it existed count as ``{}``),
3. the :class:`OptimConfig` default.

The values are checked by :func:`d4d.modules.fourdgen.validate_scene_optimisation` (the same
checks as :func:`~d4d.modules.fourdgen.scene_optimisation_config`); this module adds the record of
where each value came from, which ``d4d.generate`` prints and writes to ``run.json``.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def resolve_optim_config(flags: dict[str, Any], stored: dict[str, Any], checkpoint: str = "--fourd"):
    """``(OptimConfig, {field: "flag" | "checkpoint" | "default"})``.

    ``flags``: ``{field: value or None}`` from the command line (None = not given); ``stored``: the
    checkpoint's ``scene_optimisation``. An unknown field or a bad value is a
    :class:`~d4d.utils.errors.UserError` naming ``checkpoint`` and the key."""
    from d4d.fourd.optimise import OptimConfig
    from d4d.modules.fourdgen import validate_scene_optimisation

    stored = validate_scene_optimisation(stored, f"{checkpoint}: scene_optimisation")
    given = validate_scene_optimisation(
        {k: v for k, v in flags.items() if v is not None}, "scene optimisation flags"
    )
    sources = {
        f.name: "flag" if f.name in given else "checkpoint" if f.name in stored else "default"
        for f in dataclasses.fields(OptimConfig)
    }
    return OptimConfig(**{**stored, **given}), sources


def describe(config, sources: dict[str, str]) -> str:
    """One line: the two step counts and where they came from, then any other field not at its
    default (``pose_steps=5 (checkpoint), steps=20 (checkpoint)``)."""
    from d4d.fourd.optimise import OptimConfig

    default = OptimConfig()
    main = ("pose_steps", "steps")
    parts = [f"{n}={getattr(config, n)} ({sources[n]})" for n in main]
    parts += [
        f"{n}={getattr(config, n)} ({s})"
        for n, s in sources.items()
        if n not in main and getattr(config, n) != getattr(default, n)
    ]
    return ", ".join(parts)
