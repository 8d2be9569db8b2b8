"""``python -m d4d.evaluate``: the Table 1 / Table 2 evaluation of the video modules and the 4D generator.

* :mod:`d4d.evaluation.generators` - what produces the videos: stage checkpoints (through the
  :class:`~d4d.video.interface.VideoGenerator` contract) and the ``repeat-first`` /
  ``real-frames`` baselines.
* :mod:`d4d.evaluation.fourd` - the 4D generator (the "+4d" rows): video -> :class:`~d4d.fourd.interface.Scene4D`
  -> renders from the requested cameras; per-scene optimisation settings (flag, else checkpoint).
* :mod:`d4d.evaluation.clips` - test clips as requests: first frame + caption in, the clip's own
  camera path (relative to frame 0, ``K`` from the shard) requested, covisibility masks.
* :mod:`d4d.evaluation.scoring` - the metrics of one generated clip against the real one.
* :mod:`d4d.evaluation.outputs` - per-clip CSV / JSON, aggregate JSON, wandb logging.
"""
