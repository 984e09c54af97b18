"""Metrics, cross-validation bookkeeping and result tables.

- :mod:`kale_ext.evaluate.cross_validation`: stratified, subject-grouped folds; per-fold label statistics.
- :mod:`kale_ext.evaluate.metrics`: binary metrics, thresholds, fold summaries, bootstrap intervals.
- :mod:`kale_ext.evaluate.reports`: ``metrics.json``, ``predictions.csv``, result tables, ROC figure.
"""

from kale_ext.evaluate.cross_validation import class_balance_alpha, fold_split, make_folds
from kale_ext.evaluate.metrics import (
    METRIC_NAMES,
    binary_metrics,
    bootstrap_ci,
    bootstrap_cis,
    choose_threshold,
    summarise_folds,
)

__all__ = [
    "METRIC_NAMES",
    "binary_metrics",
    "bootstrap_ci",
    "bootstrap_cis",
    "choose_threshold",
    "class_balance_alpha",
    "fold_split",
    "make_folds",
    "summarise_folds",
]
