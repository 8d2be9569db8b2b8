"""``python -m d4d.evaluate``: the Table 1 / Table 2 evaluation of the video modules and the 4D generator.

* :mod:`d4d.evaluation.generators` - what produces the videos: stage checkpoints (through the
  :class:`~d4d.video.interface.VideoGenerator` contract), the 4D generator (through
  :class:`~d4d.fourd.interface.Scene4D`) and the ``repeat-first`` baseline.
* :mod:`d4d.evaluation.clips` - test clips as requests: first frame + caption in, the clip's own
  camera path (relative to frame 0, ``K`` from the shard) requested, covisibility masks.
* :mod:`d4d.evaluation.scoring` - the metrics of one generated clip against the real one.
* :mod:`d4d.evaluation.outputs` - per-clip CSV / JSON, aggregate JSON, wandb logging.
"""
