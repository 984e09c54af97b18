"""Probe protocol: subject-level stratified repeated folds, no leakage, AUROC summaries, generation metrics."""

import numpy as np
import pytest
import torch

from kale_ext.evaluate.probe import (
    cross_validated_probe,
    fit_linear_lead_map,
    generation_metrics,
    intervals_overlap,
    make_probe,
    probe_to_torch,
    repeated_folds,
    summarise_probe,
)


def _cohort(n_subjects=60, per_subject=2, seed=0):
    rng = np.random.default_rng(seed)
    subject_label = (rng.random(n_subjects) < 0.3).astype(int)
    subject_label[:10] = 1
    groups = np.repeat(np.arange(n_subjects), per_subject).astype(str)
    labels = np.repeat(subject_label, per_subject)
    return labels, groups


def test_folds_are_subject_level_and_stratified():
    labels, groups = _cohort()
    folds = repeated_folds(labels, groups, n_splits=5, repeats=3, seed=0)
    assert folds.shape == (3, len(labels))
    overall = labels.mean()
    for row in folds:
        for g in np.unique(groups):
            assert len(np.unique(row[groups == g])) == 1  # a subject never spans two folds
        for k in range(5):
            assert abs(labels[row == k].mean() - overall) < 0.12
            assert labels[row == k].sum() > 0
    assert not np.array_equal(folds[0], folds[1])  # repeats use different partitions


def test_probe_does_not_see_the_held_out_sample():
    # One-hot identity features with random labels: a probe that trained on a sample would recall its label.
    rng = np.random.default_rng(1)
    n = 80
    labels = rng.integers(0, 2, n)
    features = np.eye(n)
    folds = repeated_folds(labels, None, n_splits=5, repeats=1, seed=0)
    out = cross_validated_probe(features, labels, folds)
    summary = summarise_probe(labels, out.prob["train"], out.folds, n_boot=100)
    assert summary.auroc < 0.75
    assert not np.isnan(out.prob["train"]).any()


def test_separable_features_and_eval_sets():
    rng = np.random.default_rng(2)
    labels, groups = _cohort(80, 1, seed=3)
    signal = labels[:, None] * 2.0 + rng.normal(0, 0.5, (len(labels), 1))
    features = np.hstack([signal, rng.normal(size=(len(labels), 4))])
    masked = features.copy()
    masked[:, 0] = 0.0  # the informative feature removed at test time
    folds = repeated_folds(labels, groups, repeats=2, seed=0)
    out = cross_validated_probe(features, labels, folds, {"masked": masked})
    good = summarise_probe(labels, out.prob["train"], out.folds, groups=groups, n_boot=200)
    bad = summarise_probe(labels, out.prob["masked"], out.folds, groups=groups, n_boot=200)
    assert good.auroc > 0.95 and good.ci[0] <= good.auroc <= good.ci[1]
    assert bad.auroc < 0.8
    assert good.fold_auroc.shape == (2, 5) and good.n_pos == labels.sum()
    mlp = cross_validated_probe(features, labels, folds, kind="mlp", hidden_dim=8)
    assert summarise_probe(labels, mlp.prob["train"], folds, n_boot=50).auroc > 0.9


def test_probe_to_torch_matches_predict_proba():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(60, 5)) * [1, 3, 0.5, 2, 1] + [0, 1, 2, 3, 4]
    y = (x[:, 0] + 0.3 * x[:, 1] > 0.3).astype(int)
    for kind in ("logistic", "mlp"):
        probe = make_probe(kind, hidden_dim=6).fit(x, y)
        logit = probe_to_torch(probe)(torch.as_tensor(x, dtype=torch.float32))
        np.testing.assert_allclose(torch.sigmoid(logit[:, 0]).numpy(), probe.predict_proba(x)[:, 1], atol=1e-5)


def test_generation_metrics_equal_a_hand_computation():
    pred = np.array([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    true = np.array([[[1.0, 2.0, 4.0], [1.0, -1.0, 0.0]]])
    m = generation_metrics(pred, true)
    # lead 0: centred pred (-1, 0, 1), centred true (-4/3, -1/3, 5/3): r = 3 / sqrt(2 * 42/9)
    assert m.pearson[0, 0] == pytest.approx(3 / np.sqrt(2 * 42 / 9))
    assert m.rmse[0, 0] == pytest.approx(np.sqrt(1 / 3))
    assert np.isnan(m.pearson[0, 1])  # constant prediction
    assert m.rmse[0, 1] == pytest.approx(np.sqrt(2 / 3))
    table = m.table(["V1", "V2"])
    assert table.set_index("lead").loc["V1", "pearson_r"] == pytest.approx(m.pearson[0, 0])
    assert table.set_index("lead").loc["all", "n"] == 1


def test_linear_lead_map_recovers_a_planted_map():
    rng = np.random.default_rng(5)
    lead_i, lead_ii = rng.normal(size=(2, 10, 1, 50))
    limb = np.concatenate([lead_i, lead_ii, lead_ii - lead_i], axis=1)  # rank 2, like real limb leads
    target = 0.7 * lead_i - 1.2 * lead_ii + 0.3
    fitted = fit_linear_lead_map(limb, target)
    np.testing.assert_allclose(fitted.predict(limb), target, atol=1e-8)
    ridge = fit_linear_lead_map(limb, target, ridge=1e-6)
    np.testing.assert_allclose(ridge.predict(limb), target, atol=1e-4)


def test_intervals_overlap():
    assert intervals_overlap((0.5, 0.7), (0.69, 0.9))
    assert not intervals_overlap((0.5, 0.6), (0.61, 0.9))
    assert not intervals_overlap((np.nan, 0.6), (0.5, 0.9))


def test_inner_cv_probe_picks_strong_regularisation_for_noise_and_rejects_bad_c():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(60, 40))
    y = np.r_[np.ones(20, dtype=int), np.zeros(40, dtype=int)]
    x[:, 0] += 3 * y
    probe = make_probe(c="cv", c_grid=(1e-3, 1e-1, 10.0)).fit(x, y)
    assert probe[-1].C_[0] in (1e-3, 1e-1, 10.0)
    assert probe.predict_proba(x)[:, 1][y == 1].mean() > probe.predict_proba(x)[:, 1][y == 0].mean()
    with pytest.raises(ValueError, match="'cv'"):
        make_probe("mlp", c="cv")


def test_generate_leads_tiles_windows_and_equals_the_whole_record_pass_for_an_unwindowed_model():
    import torch

    from kale_ext.embed.zoo import build_model
    from kale_ext.evaluate.probe import generate_leads

    leads, limb = ("I", "II", "V1"), ("I", "II")
    torch.manual_seed(0)
    whole = build_model("lsemvae", leads, 40, 4).eval()
    x = np.random.default_rng(0).standard_normal((3, 2, 40)).astype(np.float32)
    with torch.no_grad():
        direct = whole(torch.as_tensor(x), leads=limb, sample=False).recon.numpy()
    assert np.allclose(generate_leads(whole, x, limb), direct, atol=1e-6)
    # a model of 16-sample windows on 40-sample records: windows at 0, 16, 24; the overlap 24..31 is averaged
    torch.manual_seed(0)
    windowed = build_model("lsemvae", leads, 16, 4).eval()
    out = generate_leads(windowed, x, limb, window=16)
    with torch.no_grad():
        parts = {
            s: windowed(torch.as_tensor(x[..., s : s + 16]), leads=limb, sample=False).recon.numpy()
            for s in (0, 16, 24)
        }
    assert out.shape == (3, 3, 40)
    assert np.allclose(out[..., :16], parts[0], atol=1e-6)
    assert np.allclose(out[..., 16:24], parts[16][..., :8], atol=1e-6)
    assert np.allclose(out[..., 24:32], (parts[16][..., 8:] + parts[24][..., :8]) / 2, atol=1e-6)
    assert np.allclose(out[..., 32:], parts[24][..., 8:], atol=1e-6)
