"""Parts of ``python -m d4d.generate`` (:mod:`d4d.generate`): the summary picture."""
