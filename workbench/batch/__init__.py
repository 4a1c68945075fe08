"""The batch layer: many runs planned, executed, resumed and summarized.

* :mod:`workbench.batch.protocol`: the fine-tune protocol's plan (parents, arms, PTQ settings,
  the noise-multiplier search), read from a YAML file.
* :mod:`workbench.batch.members`: one member of it (fine-tune, PTQ settings, curvature),
  resumable setting by setting.
* :mod:`workbench.batch.finetune_study`: runs a protocol (members in parallel processes) and
  gathers the tidy tables.
* :mod:`workbench.batch.finetune_report`: paired differences with intervals, figures and the
  Markdown report.
* :mod:`workbench.batch.execute`, :mod:`~workbench.batch.sweep` (with
  :mod:`~workbench.batch.sweep_job` and :mod:`~workbench.batch.dask_engine`),
  :mod:`~workbench.batch.report` and :mod:`~workbench.batch.clean`: the notebooks run headless, one
  at a time, over a grid, locally or on Dask, and summarized.
* ``scratch_member``, ``scratch_study``, ``scratch_summary``, ``scratch_report``: the from-scratch
  study (notebook 06 over seeds and methods).
"""
