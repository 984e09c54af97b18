"""Tests of kale_ext.evaluate.aggregate: subject-level means and per-fold metrics."""

import numpy as np
import pandas as pd
import pytest

from kale_ext.evaluate.aggregate import per_fold_metrics, subject_level
from kale_ext.evaluate.metrics import binary_metrics


def _oof():
    return pd.DataFrame(
        {
            "record_id": ["r1", "r2", "r3", "r4", "r5", "r6"],
            "subject_id": ["a", "a", "b", "c", "d", "d"],
            "label": [1, 1, 0, 1, 0, 0],
            "fold": [0, 0, 0, 1, 1, 1],
            "threshold": [0.5, 0.5, 0.5, 0.3, 0.3, 0.3],
            "probability": [0.9, 0.5, 0.2, 0.4, 0.1, 0.5],
        }
    )


def test_subject_level_averages_records_of_a_subject():
    subjects = subject_level(_oof())
    assert list(subjects["subject_id"]) == ["a", "b", "c", "d"]
    assert np.allclose(subjects["probability"], [0.7, 0.2, 0.4, 0.3])
    assert list(subjects["record_id"]) == ["r1;r2", "r3", "r4", "r5;r6"]
    with pytest.raises(ValueError, match="fine-tuning"):
        subject_level(_oof().drop(columns="threshold"))


def test_per_fold_metrics_use_each_folds_threshold():
    subjects = subject_level(_oof())
    folds = per_fold_metrics(subjects)
    assert len(folds) == 2
    expected = binary_metrics(np.array([1, 0]), np.array([0.7, 0.2]), 0.5)
    assert folds[0] == expected
    # fold 1 at its own threshold 0.3: subject c (0.4) positive, d (0.3) positive (>= threshold)
    assert folds[1] == binary_metrics(np.array([1, 0]), np.array([0.4, 0.3]), 0.3)
