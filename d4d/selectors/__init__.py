"""Camera-motion selectors other than the trained classifier (:mod:`d4d.select`).

:mod:`d4d.selectors.vlm` scores the eight motions of :data:`d4d.geometry.motions.MOTIONS` with a
vision-language model (Qwen2.5-VL) by their log-likelihood as answers; the CLI is
``python -m d4d.select_vlm``.
"""
