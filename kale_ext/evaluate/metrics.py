"""Binary classification metrics, decision thresholds, fold summaries and bootstrap confidence intervals.

All functions take the probability of the positive class, shape (N,), and binary labels (0/1). A
sample is predicted positive when ``prob >= threshold``; the threshold may be one number or one value
per sample (each out-of-fold prediction scored at the threshold chosen on its own fold's training part).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

#: Metrics returned by :func:`binary_metrics`, in reporting order.
METRIC_NAMES: tuple[str, ...] = ("accuracy", "auroc", "mcc", "sensitivity", "specificity", "f1")

MetricFn = Callable[[np.ndarray, np.ndarray, "np.ndarray | float"], float]


def _as_binary(y_true) -> np.ndarray:
    y = np.asarray(y_true).ravel()
    if y.dtype == bool:
        return y.astype(np.int64)
    values = set(np.unique(y).tolist())
    if not values <= {0, 1}:
        raise ValueError(f"labels must be binary 0/1, got values {sorted(values)}; map the classes to 0/1 first")
    return y.astype(np.int64)


def _as_prob(prob, n: int) -> np.ndarray:
    p = np.asarray(prob, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] == 2:
        raise ValueError("prob has two columns; pass the positive-class column, e.g. softmax(logits)[:, 1]")
    p = p.ravel()
    if len(p) != n:
        raise ValueError(f"prob has {len(p)} values but there are {n} labels")
    return p


def _as_threshold(threshold, n: int) -> np.ndarray | float:
    t = np.asarray(threshold, dtype=np.float64)
    if t.ndim == 0:
        return float(t)
    t = t.ravel()
    if len(t) != n:
        raise ValueError(f"threshold has {len(t)} values; give one number or one per sample ({n})")
    return t


def auroc(y_true, prob) -> float:
    """Area under the ROC curve via the Mann-Whitney statistic (ties count one half).

    Args:
        y_true: binary labels, shape (N,).
        prob: scores, shape (N,).

    Returns:
        AUROC in [0, 1], or nan (with a warning) when only one class is present.
    """
    from scipy.stats import rankdata

    y = _as_binary(y_true)
    p = _as_prob(prob, len(y))
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        warnings.warn("AUROC is undefined when only one class is present; returning nan", UserWarning, stacklevel=2)
        return float("nan")
    ranks = rankdata(p)  # average ranks: a tie between classes counts 1/2
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _confusion(y: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, int]:
    tp = int(np.sum((pred == 1) & (y == 1)))
    tn = int(np.sum((pred == 0) & (y == 0)))
    fp = int(np.sum((pred == 1) & (y == 0)))
    fn = int(np.sum((pred == 0) & (y == 1)))
    return tp, tn, fp, fn


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def _from_confusion(tp: int, tn: int, fp: int, fn: int) -> dict[str, float]:
    n = tp + tn + fp + fn
    den = np.sqrt(float(tp + fp) * float(tp + fn) * float(tn + fp) * float(tn + fn))
    # MCC is 0 when a marginal is empty (scikit-learn's convention): no better than chance.
    mcc = float((tp * tn - fp * fn) / den) if den > 0 else 0.0
    # F1 is 0 when there are no true positives (no predicted and/or no actual positives).
    f1 = _ratio(2 * tp, 2 * tp + fp + fn) if tp > 0 else 0.0
    return {
        "accuracy": _ratio(tp + tn, n),
        "mcc": mcc,
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "f1": f1,
    }


def binary_metrics(y_true, prob, threshold: float | Sequence[float] | np.ndarray = 0.5) -> dict[str, float]:
    """Accuracy, AUROC, MCC, sensitivity, specificity and F1 of binary predictions.

    Args:
        y_true: binary labels (0/1 or bool), shape (N,).
        prob: probability of the positive class, shape (N,).
        threshold: decision threshold, one number or one per sample, shape (N,); predicted positive when
            ``prob >= threshold``.

    Returns:
        ``{metric: value}`` with the keys of :data:`METRIC_NAMES`. AUROC is nan (with a warning) when only
        one class is present; sensitivity (specificity) is nan without positives (negatives); MCC is 0
        when undefined.
    """
    y = _as_binary(y_true)
    p = _as_prob(prob, len(y))
    if len(y) == 0:
        raise ValueError("binary_metrics needs at least one sample")
    t = _as_threshold(threshold, len(y))
    pred = (p >= t).astype(np.int64)
    out = _from_confusion(*_confusion(y, pred))
    out["auroc"] = auroc(y, p) if 0 < y.sum() < len(y) else _warn_one_class()
    return {name: out[name] for name in METRIC_NAMES}


def _warn_one_class() -> float:
    warnings.warn("AUROC is undefined when only one class is present; returning nan", UserWarning, stacklevel=3)
    return float("nan")


def choose_threshold(y_true, prob, method: str | float = "youden") -> float:
    """Pick a decision threshold on probabilities, from training labels only.

    Args:
        y_true: binary labels of the samples the threshold is chosen on (a fold's training part), shape (N,).
        prob: positive-class probabilities of the same samples, shape (N,).
        method: ``"youden"``: maximise sensitivity + specificity - 1 over the ROC curve; the returned
            threshold is the midpoint between the chosen score and the next lower score, so that it
            separates them with a margin. ``"argmax"`` (or ``"0.5"``): 0.5, the class with the larger
            probability of a two-class softmax (the authors' rule). A float: that threshold.

    Returns:
        The threshold (a sample is positive when ``prob >= threshold``).
    """
    if isinstance(method, (int, float)) and not isinstance(method, bool):
        return float(method)
    if method in ("argmax", "0.5"):
        return 0.5
    if method != "youden":
        raise ValueError(f"unknown threshold method {method!r}; use 'youden', 'argmax' or a number such as 0.5")
    y = _as_binary(y_true)
    p = _as_prob(prob, len(y))
    if y.sum() == 0 or y.sum() == len(y):
        warnings.warn("Youden threshold needs both classes; falling back to 0.5", UserWarning, stacklevel=2)
        return 0.5
    scores = np.unique(p)[::-1]  # distinct candidate thresholds, high to low
    pos = np.sort(p[y == 1])
    neg = np.sort(p[y == 0])
    # Fraction of each class scoring >= every candidate: O(N log N), no N x N comparison matrix.
    tpr = 1.0 - np.searchsorted(pos, scores, side="left") / len(pos)
    fpr = 1.0 - np.searchsorted(neg, scores, side="left") / len(neg)
    best = int(np.argmax(tpr - fpr))  # first maximum = highest such threshold
    if best + 1 < len(scores):
        return float((scores[best] + scores[best + 1]) / 2)
    return float(scores[best])


def summarise_folds(fold_metrics: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation of each metric over folds.

    The standard deviation is the population one (``ddof=0``), as the authors report ``mean +- std``.
    A nan value (e.g. AUROC of a one-class fold) is left out of that metric's mean and std, with a log
    message; a metric that is nan in every fold summarises to nan.

    Args:
        fold_metrics: one ``{metric: value}`` dict per fold; non-numeric values are ignored.

    Returns:
        ``{metric: {"mean": float, "std": float}}`` in the order metrics first appear.
    """
    if not fold_metrics:
        raise ValueError("summarise_folds needs at least one fold's metrics")
    names: list[str] = []
    for fold in fold_metrics:
        for name, value in fold.items():
            if name not in names and isinstance(value, (int, float, np.floating, np.integer)):
                if not isinstance(value, bool):
                    names.append(name)
    summary = {}
    for name in names:
        values = np.array([float(f.get(name, np.nan)) for f in fold_metrics], dtype=np.float64)
        finite = values[~np.isnan(values)]
        if len(finite) < len(values):
            logger.info(
                "%s is nan in %d of %d folds; summarising the rest", name, len(values) - len(finite), len(values)
            )
        if len(finite) == 0:
            summary[name] = {"mean": float("nan"), "std": float("nan")}
        else:
            summary[name] = {"mean": float(finite.mean()), "std": float(finite.std(ddof=0))}
    return summary


def _metric_fn(metric: str | MetricFn) -> MetricFn:
    if callable(metric):
        return metric
    if metric not in METRIC_NAMES:
        raise ValueError(f"unknown metric {metric!r}; use one of {list(METRIC_NAMES)} or a callable")
    if metric == "auroc":
        return lambda y, p, t: auroc(y, p)
    return lambda y, p, t: binary_metrics(y, p, t)[metric]


def bootstrap_cis(
    y_true,
    prob,
    threshold: float | Sequence[float] | np.ndarray = 0.5,
    metrics: Sequence[str | MetricFn] = METRIC_NAMES,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: Sequence | np.ndarray | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals of several metrics, from the same resamples.

    Units (subjects) are resampled with replacement; a resample that holds only one class is skipped
    (AUROC, sensitivity and specificity are undefined on it), and the interval uses the remaining ones.

    Args:
        y_true: binary labels, shape (N,): pooled out-of-fold predictions, one row per subject.
        prob: positive-class probabilities, shape (N,).
        threshold: one number or one per sample, shape (N,) (each fold's own threshold).
        metrics: names from :data:`METRIC_NAMES` or callables ``fn(y_true, prob, threshold) -> float``;
            the result is keyed by the name, or the callable's ``__name__``.
        n_boot: number of resamples.
        seed: seed of the resampling generator (no global random state is touched).
        alpha: 1 - confidence level (0.05 gives a 95% interval).
        groups: optional subject id per row when a subject has several rows: whole subjects are then
            resampled. None treats each row as one subject.

    Returns:
        ``{metric: (lo, hi)}``; ``(nan, nan)`` when no resample held both classes.
    """
    y = _as_binary(y_true)
    p = _as_prob(prob, len(y))
    t = _as_threshold(threshold, len(y))
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    names = [m if isinstance(m, str) else getattr(m, "__name__", f"metric_{i}") for i, m in enumerate(metrics)]
    named_only = all(isinstance(m, str) for m in metrics)
    fns = [_metric_fn(m) for m in metrics]

    if groups is None:
        units = [np.array([i]) for i in range(len(y))]
    else:
        groups = np.asarray(groups)
        if len(groups) != len(y):
            raise ValueError(f"groups has {len(groups)} values but there are {len(y)} labels")
        _, inverse = np.unique(groups, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.flatnonzero(np.diff(inverse[order])) + 1
        units = np.split(order, bounds)
    rng = np.random.default_rng(seed)
    samples: list[list[float]] = [[] for _ in metrics]
    skipped = 0
    for _ in range(n_boot):
        pick = rng.integers(0, len(units), size=len(units))
        idx = np.concatenate([units[i] for i in pick]) if groups is not None else pick
        yb = y[idx]
        if yb.sum() == 0 or yb.sum() == len(yb):
            skipped += 1
            continue
        pb = p[idx]
        tb = t if isinstance(t, float) else t[idx]
        if named_only:  # one pass computes every named metric of this resample
            values = binary_metrics(yb, pb, tb)
            for j, name in enumerate(names):
                samples[j].append(values[name])
        else:
            for j, fn in enumerate(fns):
                samples[j].append(float(fn(yb, pb, tb)))
    if skipped:
        logger.info("bootstrap: skipped %d of %d resamples holding one class", skipped, n_boot)
    out = {}
    for name, values in zip(names, samples):
        v = np.asarray(values, dtype=np.float64)
        v = v[~np.isnan(v)]
        if len(v) == 0:
            warnings.warn(f"no usable bootstrap resample for {name}; its interval is nan", UserWarning, stacklevel=2)
            out[name] = (float("nan"), float("nan"))
        else:
            lo, hi = np.quantile(v, [alpha / 2, 1 - alpha / 2])
            out[name] = (float(lo), float(hi))
    return out


def bootstrap_ci(
    y_true,
    prob,
    metric: str | MetricFn = "auroc",
    threshold: float | Sequence[float] | np.ndarray = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: Sequence | np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of one metric on pooled out-of-fold predictions.

    Args:
        y_true: binary labels, shape (N,).
        prob: positive-class probabilities, shape (N,).
        metric: a name from :data:`METRIC_NAMES` or ``fn(y_true, prob, threshold) -> float``.
        threshold: one number or one per sample, shape (N,).
        n_boot: number of resamples.
        seed: seed of the resampling generator.
        alpha: 1 - confidence level.
        groups: optional subject id per row (see :func:`bootstrap_cis`).

    Returns:
        ``(lo, hi)``.
    """
    cis = bootstrap_cis(y_true, prob, threshold, [metric], n_boot=n_boot, seed=seed, alpha=alpha, groups=groups)
    return next(iter(cis.values()))
