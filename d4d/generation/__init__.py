"""Parts of ``python -m d4d.generate`` (:mod:`d4d.generate`): the summary picture
(:mod:`~d4d.generation.summary`) and the per-scene optimisation settings with their sources
(:mod:`~d4d.generation.optimisation`)."""
