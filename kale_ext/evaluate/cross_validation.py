"""Cross-validation bookkeeping: stratified (and subject-grouped) folds and per-fold label statistics.

The evaluation protocol is stratified K-fold (default 5, i.e. 80:20), grouped by subject when subject
ids exist so that no subject contributes records to two folds. Anything derived from labels (class
weights, the focal-loss alpha, the decision threshold) must be computed on each fold's *training*
part only; :func:`fold_split` and :func:`class_balance_alpha` exist to make that the easy path.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)


def make_folds(
    labels: Sequence | np.ndarray,
    groups: Sequence | np.ndarray | None = None,
    n_splits: int = 5,
    seed: int = 42,
) -> np.ndarray:
    """Assign every sample to one test fold, stratified by label and optionally grouped by subject.

    Without groups this is scikit-learn's ``StratifiedKFold(n_splits, shuffle=True, random_state=seed)``
    (the authors' protocol with seed 42). With groups it is ``StratifiedGroupKFold`` with the same
    shuffle and seed: all samples of one group (subject) share a fold, and the class ratio is kept as
    close to the overall one as the group sizes allow.

    Args:
        labels: class label per sample, shape (N,); any hashable values.
        groups: subject id per sample, shape (N,), or None when every sample is its own subject.
        n_splits: number of folds K (>= 2).
        seed: shuffling seed; the same seed gives the same folds.

    Returns:
        Integer fold id in ``[0, n_splits)`` per sample, shape (N,).

    Raises:
        ValueError: when a class has fewer members (subjects, when grouped) than ``n_splits``, or the
            inputs have mismatched lengths.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional (one label per sample), got shape {labels.shape}")
    if n_splits < 2:
        raise ValueError(f"n_splits must be at least 2, got {n_splits}")
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise ValueError(
            f"stratified folds need at least two classes, found only {classes.tolist()}; check the label rule "
            "and the labels table"
        )
    unit = "samples"
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != labels.shape:
            raise ValueError(f"groups has shape {groups.shape} but labels has shape {labels.shape}; give one each")
        # Members of a class are counted as distinct subjects: a subject cannot be split across folds.
        counts = np.array([len(np.unique(groups[labels == c])) for c in classes])
        unit = "subjects"
    too_small = {c.item() if hasattr(c, "item") else c: int(n) for c, n in zip(classes, counts) if n < n_splits}
    if too_small:
        raise ValueError(
            f"class sizes {too_small} ({unit}) are smaller than n_splits={n_splits}; every test fold needs "
            f"each class. Lower the number of folds (at most {int(counts.min())}), collect more labelled data, "
            "or merge the rare class"
        )

    folds = np.full(len(labels), -1, dtype=np.int64)
    index = np.zeros(len(labels))  # sklearn only needs the sample count from X
    if groups is None:
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        splits = splitter.split(index, labels)
    else:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        splits = splitter.split(index, labels, groups)
    for k, (_, test_idx) in enumerate(splits):
        folds[test_idx] = k
    if (folds < 0).any():  # defensive: sklearn's splitters cover every sample exactly once
        raise RuntimeError("some samples were assigned to no fold; please report this with the label counts")
    logger.debug("made %d folds for %d samples (grouped=%s, seed=%d)", n_splits, len(labels), groups is not None, seed)
    return folds


def fold_split(folds: Sequence[int] | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and test parts of fold ``k``.

    Args:
        folds: fold id per sample, shape (N,), as returned by :func:`make_folds`.
        k: the test fold.

    Returns:
        ``(train_idx, test_idx)``: sorted integer index arrays that partition ``range(N)``.
    """
    folds = np.asarray(folds)
    if k not in set(np.unique(folds).tolist()):
        raise ValueError(f"fold {k} does not exist; folds present are {sorted(np.unique(folds).tolist())}")
    test = folds == k
    return np.flatnonzero(~test), np.flatnonzero(test)


def class_balance_alpha(train_labels: Sequence[int] | np.ndarray) -> float:
    """Focal-loss alpha for the positive class, from the labels of one fold's training part.

    Convention (Lin et al., 2017): the positive class (label 1) is weighted by ``alpha`` and the
    negative class (label 0) by ``1 - alpha``. Weighting each class inversely to its frequency gives
    ``alpha = n_negative / n``, so the minority class gets the larger weight and both classes contribute
    equally to the loss in expectation. The paper does not report alpha; this is our documented choice.

    Compute it on the training indices of each fold only (``train_labels = labels[train_idx]``): using
    all labels would leak the test fold's class balance into training.

    Args:
        train_labels: binary labels (0/1 or bool) of the training samples, shape (N_train,).

    Returns:
        alpha in (0, 1).

    Raises:
        ValueError: when the labels are not binary or one class is absent.
    """
    y = np.asarray(train_labels).astype(np.int64).ravel()
    values = set(np.unique(y).tolist())
    if not values <= {0, 1}:
        raise ValueError(f"class_balance_alpha expects binary 0/1 labels, got values {sorted(values)}")
    n_pos = int(y.sum())
    n_neg = int(len(y) - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"the training labels hold {n_pos} positives and {n_neg} negatives; both classes are needed. "
            "Check the folds (make_folds stratifies) or pass a fixed alpha"
        )
    return n_neg / len(y)
