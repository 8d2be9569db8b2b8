"""Which per-scene 4D optimisation settings a run uses, and where each came from.

The rule for consumers of a 4D generator checkpoint (``d4d.generate``, ``d4d.evaluate``):
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

from typing import Any


def resolve_optim_config(flags: dict[str, Any], stored: dict[str, Any], checkpoint: str = "--fourd"):
    """``(OptimConfig, {field: "flag" | "checkpoint" | "default"})``: the shared rule of
    :func:`d4d.modules.fourdgen.resolve_scene_optimisation`, errors naming ``checkpoint``."""
    from d4d.modules.fourdgen import resolve_scene_optimisation

    return resolve_scene_optimisation(flags, stored, f"{checkpoint}: scene_optimisation")


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
