"""Metrics against hand-computed values, thresholds, fold summaries and bootstrap intervals."""

import numpy as np
import pytest
from sklearn.metrics import f1_score, matthews_corrcoef, roc_auc_score, roc_curve

from kale_ext.evaluate.metrics import (
    METRIC_NAMES,
    auroc,
    binary_metrics,
    bootstrap_ci,
    bootstrap_cis,
    choose_threshold,
    summarise_folds,
)

Y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
P = np.array([0.9, 0.8, 0.4, 0.3, 0.6, 0.1, 0.2, 0.7])


def _scores(n: int, seed: int, shift: float = 1.0):
    """Labels and probabilities of a noisy but informative classifier."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    logits = rng.normal(size=n) + shift * (2 * y - 1)
    return y, 1 / (1 + np.exp(-logits))


def test_binary_metrics_match_hand_computed_values():
    # threshold 0.5: TP=3 (0.9, 0.8, 0.7), FN=1 (0.4), FP=1 (0.6), TN=3
    m = binary_metrics(Y, P, 0.5)
    assert list(m) == list(METRIC_NAMES)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(6 / 8)
    assert m["mcc"] == pytest.approx((3 * 3 - 1 * 1) / np.sqrt(4 * 4 * 4 * 4))
    assert m["auroc"] == pytest.approx(15 / 16)  # only the pair (0.4 positive, 0.6 negative) is misordered


def test_per_sample_thresholds_apply_to_their_own_samples():
    thr = np.array([0.5] * 4 + [0.65] * 4)  # the 0.6 negative now falls below its fold's threshold
    m = binary_metrics(Y, P, thr)
    assert m["accuracy"] == pytest.approx(7 / 8)
    assert m["specificity"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one per sample"):
        binary_metrics(Y, P, [0.5, 0.5])


def test_metrics_agree_with_sklearn_on_random_data():
    y, p = _scores(300, seed=4)
    y[:3] = [0, 0, 1]
    p[:3] = 0.5  # ties at the threshold and across classes
    m = binary_metrics(y, p, 0.5)
    pred = (p >= 0.5).astype(int)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))


def test_one_class_gives_nan_auroc_with_warning():
    with pytest.warns(UserWarning, match="one class"):
        m = binary_metrics([1, 1, 1], [0.2, 0.7, 0.9], 0.5)
    assert np.isnan(m["auroc"]) and np.isnan(m["specificity"])
    assert m["sensitivity"] == pytest.approx(2 / 3)
    with pytest.warns(UserWarning):
        assert np.isnan(auroc([0, 0], [0.1, 0.2]))


def test_bad_inputs_are_refused_with_advice():
    with pytest.raises(ValueError, match="binary"):
        binary_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="positive-class column"):
        binary_metrics([0, 1], np.array([[0.9, 0.1], [0.2, 0.8]]))


def test_youden_threshold_separates_a_separable_example():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8])
    t = choose_threshold(y, p, "youden")
    assert 0.3 < t <= 0.6
    assert t == pytest.approx(0.45)
    m = binary_metrics(y, p, t)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 1.0


def test_youden_maximises_j_like_a_brute_force_search():
    y, p = _scores(200, seed=9, shift=0.6)
    t = choose_threshold(y, p, "youden")
    fpr, tpr, _ = roc_curve(y, p)
    best_j = np.max(tpr - fpr)
    m = binary_metrics(y, p, t)
    assert m["sensitivity"] + m["specificity"] - 1 == pytest.approx(best_j)


def test_other_threshold_methods():
    assert choose_threshold(Y, P, "argmax") == 0.5
    assert choose_threshold(Y, P, 0.3) == 0.3
    with pytest.raises(ValueError, match="youden"):
        choose_threshold(Y, P, "median")
    with pytest.warns(UserWarning, match="both classes"):
        assert choose_threshold([1, 1], [0.2, 0.9], "youden") == 0.5


def test_summarise_folds_uses_population_std_and_skips_nan():
    folds = [{"accuracy": 1.0, "auroc": float("nan")}, {"accuracy": 3.0, "auroc": 2.0}]
    s = summarise_folds(folds)
    assert s["accuracy"] == {"mean": pytest.approx(2.0), "std": pytest.approx(1.0)}  # ddof=1 would be 1.414
    assert s["auroc"]["mean"] == pytest.approx(2.0) and s["auroc"]["std"] == pytest.approx(0.0)
    with pytest.raises(ValueError):
        summarise_folds([])


def test_bootstrap_ci_contains_estimate_narrows_and_is_seeded():
    y_small, p_small = _scores(80, seed=1)
    y_big, p_big = _scores(800, seed=2)
    lo_s, hi_s = bootstrap_ci(y_small, p_small, "auroc", n_boot=300, seed=0)
    lo_b, hi_b = bootstrap_ci(y_big, p_big, "auroc", n_boot=300, seed=0)
    assert lo_s <= auroc(y_small, p_small) <= hi_s
    assert lo_b <= auroc(y_big, p_big) <= hi_b
    assert (hi_b - lo_b) < 0.6 * (hi_s - lo_s)  # width shrinks roughly as 1/sqrt(n)
    assert bootstrap_ci(y_small, p_small, "auroc", n_boot=300, seed=0) == (lo_s, hi_s)
    assert bootstrap_ci(y_small, p_small, "auroc", n_boot=300, seed=1) != (lo_s, hi_s)


def test_bootstrap_cis_share_resamples_and_accept_per_sample_thresholds():
    y, p = _scores(150, seed=5)
    thr = np.where(np.arange(150) % 2 == 0, 0.4, 0.6)
    cis = bootstrap_cis(y, p, thr, n_boot=200, seed=3)
    assert set(cis) == set(METRIC_NAMES)
    point = binary_metrics(y, p, thr)
    for name, (lo, hi) in cis.items():
        assert lo <= point[name] <= hi, name
    assert cis["accuracy"] == bootstrap_ci(y, p, "accuracy", thr, n_boot=200, seed=3)


def test_bootstrap_skips_one_class_resamples_and_resamples_whole_subjects():
    y = np.array([1] + [0] * 9)

    def positives(yb, pb, tb):
        return float(yb.sum())

    lo, _ = bootstrap_ci(y, np.linspace(0, 1, 10), positives, n_boot=200, seed=0)
    assert lo >= 1.0  # resamples without the positive were skipped

    def size(yb, pb, tb):
        return float(len(yb))

    groups = np.repeat(np.arange(10), 2)  # two rows per subject
    yy, pp = np.repeat(y, 2), np.repeat(np.linspace(0, 1, 10), 2)
    assert bootstrap_ci(yy, pp, size, n_boot=50, seed=0, groups=groups) == (20.0, 20.0)
    groups = np.array([0, 0, 0] + list(range(1, 18)))  # one subject with three rows
    lo, hi = bootstrap_ci(yy, pp, size, n_boot=200, seed=0, groups=groups)
    assert lo >= 18 and hi > 18  # 18 subjects drawn; the 3-row subject adds rows when drawn
