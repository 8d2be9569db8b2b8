"""``python -m d4d.report``: compare runs (evaluation JSON, local wandb runs, the wandb API, baseline
CSVs) as Markdown + HTML with Table 1 / Table 2 and pictures; optionally publish a W&B report.

* :mod:`d4d.reporting.sources` - loading runs into :class:`~d4d.reporting.sources.RunData`.
* :mod:`d4d.reporting.wandb_offline` - reading wandb's local ``.wandb`` transaction log.
* :mod:`d4d.reporting.tables`, :mod:`d4d.reporting.figures`, :mod:`d4d.reporting.document` - output.
* :mod:`d4d.reporting.publish` - the W&B report.
"""
