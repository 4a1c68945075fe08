"""The batch layer: many runs planned, executed, resumed and summarized.

* :mod:`workbench.batch.protocol`: the fine-tune protocol's plan (parents, arms, PTQ settings,
  the noise-multiplier search), read from a YAML file.
* :mod:`workbench.batch.members`: one member of it (fine-tune, PTQ settings, curvature),
  resumable setting by setting.
* :mod:`workbench.batch.finetune_study`: runs a protocol (members in parallel processes) and
  gathers the tidy tables.
* :mod:`workbench.batch.finetune_report`: paired differences with intervals, figures and the
  Markdown report.

Older batch code (notebook runs, sweeps, the from-scratch study) still sits in
``workbench.runner`` and ``workbench.study``.
"""
