"""From out-of-fold record predictions to subject-level results and per-fold metrics.

A subject may own several records; all of them sit in one fold (folds are subject-grouped), so a subject's
probability is the mean over its records and the subject, not the record, is the unit of every metric.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from kale_ext.evaluate.metrics import binary_metrics

OOF_COLUMNS = ("record_id", "subject_id", "label", "fold", "threshold", "probability")


def subject_level(oof: pd.DataFrame) -> pd.DataFrame:
    """One row per subject: mean probability of its records, its label, fold and threshold.

    Args:
        oof: one row per record with the columns of ``OOF_COLUMNS``.

    Returns:
        DataFrame ``subject_id, record_id`` (``;``-joined) ``, label, probability, fold, threshold`` in the order the
        subjects first appear.
    """
    missing = [c for c in OOF_COLUMNS if c not in oof.columns]
    if missing:
        raise ValueError(f"out-of-fold table lacks columns {missing}; rerun the fine-tuning stage")
    grouped = oof.groupby("subject_id", sort=False)
    return pd.DataFrame(
        {
            "subject_id": grouped["subject_id"].first().astype(str),
            "record_id": grouped["record_id"].agg(lambda s: ";".join(map(str, s))),
            "label": grouped["label"].first().astype(int),
            "probability": grouped["probability"].mean(),
            "fold": grouped["fold"].first().astype(int),
            "threshold": grouped["threshold"].first(),
        }
    ).reset_index(drop=True)


def per_fold_metrics(subjects: pd.DataFrame) -> list[dict[str, float]]:
    """``binary_metrics`` of every fold (in fold order) at that fold's own threshold.

    Args:
        subjects: output of :func:`subject_level`.

    Returns:
        list of metric dicts, one per fold.
    """
    y, p = subjects["label"].to_numpy(), subjects["probability"].to_numpy()
    folds, thr = subjects["fold"].to_numpy(), subjects["threshold"].to_numpy()
    out = []
    for k in sorted(np.unique(folds)):
        sel = folds == k
        out.append(binary_metrics(y[sel], p[sel], float(thr[sel][0])))
    return out
