"""Folds are stratified, grouped by subject, deterministic per seed; label statistics come from training parts."""

import numpy as np
import pytest

from kale_ext.evaluate.cross_validation import class_balance_alpha, fold_split, make_folds


def _imbalanced(n: int = 200, pos_rate: float = 0.25, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = np.zeros(n, dtype=int)
    labels[rng.choice(n, size=int(n * pos_rate), replace=False)] = 1
    return labels


def test_folds_are_stratified_and_cover_every_sample():
    labels = _imbalanced()
    folds = make_folds(labels, n_splits=5, seed=42)
    assert folds.shape == labels.shape
    assert sorted(np.unique(folds).tolist()) == [0, 1, 2, 3, 4]
    overall = labels.mean()
    for k in range(5):
        part = labels[folds == k]
        assert len(part) == 40  # 80:20 split of 200
        assert abs(part.mean() - overall) <= 0.03


def test_grouped_folds_keep_each_subject_in_one_fold_and_stay_balanced():
    rng = np.random.default_rng(3)
    subjects = np.repeat(np.arange(120), rng.integers(1, 4, size=120))  # 1-3 records per subject
    subject_label = (rng.random(120) < 0.3).astype(int)
    labels = subject_label[subjects]
    folds = make_folds(labels, groups=subjects, n_splits=5, seed=7)
    for s in np.unique(subjects):
        assert len(np.unique(folds[subjects == s])) == 1, f"subject {s} is in two folds"
    for k in range(5):
        assert abs(labels[folds == k].mean() - labels.mean()) <= 0.1


def test_folds_are_deterministic_per_seed_and_differ_across_seeds():
    labels = _imbalanced()
    a = make_folds(labels, seed=11)
    b = make_folds(labels, seed=11)
    c = make_folds(labels, seed=12)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    groups = np.arange(len(labels)) // 2
    np.testing.assert_array_equal(make_folds(labels, groups, seed=5), make_folds(labels, groups, seed=5))
    assert (make_folds(labels, groups, seed=5) != make_folds(labels, groups, seed=6)).any()


def test_too_small_class_raises_with_advice():
    labels = np.array([0] * 20 + [1] * 3)
    with pytest.raises(ValueError, match="Lower the number of folds"):
        make_folds(labels, n_splits=5)
    # Grouped: three positive records but from only two subjects.
    labels = np.array([0] * 20 + [1] * 6)
    groups = np.array(list(range(20)) + [100, 100, 100, 101, 101, 101])
    with pytest.raises(ValueError, match="subjects"):
        make_folds(labels, groups=groups, n_splits=3)


def test_fold_split_partitions_indices():
    labels = _imbalanced(50, 0.4)
    folds = make_folds(labels, n_splits=5, seed=0)
    seen = []
    for k in range(5):
        train, test = fold_split(folds, k)
        assert set(train).isdisjoint(test)
        assert len(train) + len(test) == 50
        assert (folds[test] == k).all() and (folds[train] != k).all()
        seen.extend(test.tolist())
    assert sorted(seen) == list(range(50))
    with pytest.raises(ValueError, match="does not exist"):
        fold_split(folds, 9)


def test_class_balance_alpha_weights_the_minority():
    assert class_balance_alpha([1, 0, 0, 0]) == pytest.approx(0.75)
    assert class_balance_alpha([1, 1, 1, 0]) == pytest.approx(0.25)
    assert class_balance_alpha(np.array([True, False])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="both classes"):
        class_balance_alpha([1, 1, 1])
    with pytest.raises(ValueError, match="binary"):
        class_balance_alpha([0, 1, 2])
