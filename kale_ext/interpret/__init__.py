"""Attribution, gate weights, lead ablation and wave-level attribution.

- :mod:`~kale_ext.interpret.attribution`: integrated gradients (captum) of a ``model(x, mask) -> logits``
  classifier, the per-lead attribution ratio and its share across leads, tidy per-class per-fold tables.
- :mod:`~kale_ext.interpret.gates`: fusion (HiME gate) weights per lead and for the shared PoE expert.
- :mod:`~kale_ext.interpret.ablation`: AUROC drop when a lead is masked out at inference.
- :mod:`~kale_ext.interpret.waves`: offline R-peak detection, P/QRS/T template windows, wave shares.
- :mod:`~kale_ext.interpret.figures`: the Fig.-3-style per-subject plot and bar charts (matplotlib, Agg).

See ``docs/interpretation.md`` for the choices and limits.
"""
