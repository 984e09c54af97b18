"""Tests of kale_ext.loaddata.synthetic: lead relations, determinism, layout and learnability of the labels."""

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from kale_ext.loaddata.leads import CANONICAL_LEADS
from kale_ext.loaddata.synthetic import (
    ARCHIVE_LEAD_ORDER,
    draw_subject,
    generate_cohort_arrays,
    synthesize_ecg,
    write_synthetic_archive,
    write_synthetic_cohort,
)
from kale_ext.loaddata.wfdb_sources import list_records, read_record


def _relations(x):
    lead = dict(zip(CANONICAL_LEADS, x))
    i, ii = lead["I"], lead["II"]
    return [lead["III"] - (ii - i), lead["aVR"] + (i + ii) / 2, lead["aVL"] - (i - ii / 2), lead["aVF"] - (ii - i / 2)]


def test_lead_relations_exact_before_noise():
    rng = np.random.default_rng(0)
    x = synthesize_ecg(draw_subject(rng, mpap=35.0), 250.0, 4.0, rng, noise=False)
    assert x.shape == (12, 1000) and np.ptp(x[1]) > 0.3
    for residual in _relations(x):
        assert np.abs(residual).max() < 1e-12
    noisy = synthesize_ecg(draw_subject(rng, mpap=35.0), 250.0, 4.0, rng, noise=True)
    assert np.abs(_relations(noisy)[0]).max() > 1e-3  # noise is per lead


def test_written_cohort_layout_and_determinism(tmp_path):
    a = write_synthetic_cohort(tmp_path / "a", n_subjects=3, seed=11, fs=100.0, duration_s=2.0, noise=False)
    b = write_synthetic_cohort(tmp_path / "b", n_subjects=3, seed=11, fs=100.0, duration_s=2.0, noise=False)
    c = write_synthetic_cohort(tmp_path / "c", n_subjects=3, seed=12, fs=100.0, duration_s=2.0, noise=False)
    rl = pd.read_csv(a.record_list, dtype=str)
    assert list(rl.columns) == ["subject_id", "study_id", "path"] and a.n_records == 3
    assert rl.path.iloc[0] == "files/p1000/p10000000/s40000000/40000000"
    assert list(pd.read_csv(a.haemodynamics).columns) == ["subject_id", "mPAP", "PAWP"]
    assert "SYNTHETIC" in (a.root / "README.txt").read_text()
    dat = [(x.root / rl.path.iloc[1]).with_suffix(".dat").read_bytes() for x in (a, b, c)]
    assert dat[0] == dat[1] and dat[0] != dat[2]
    raw = read_record(list_records(a.root)[1].path)
    assert raw.channel_names == ARCHIVE_LEAD_ORDER
    canon = raw.signals[[ARCHIVE_LEAD_ORDER.index(n) for n in CANONICAL_LEADS]]
    for residual in _relations(canon):  # holds in the files up to 16-bit quantisation
        assert np.abs(residual).max() < 0.02
    arch = write_synthetic_archive(
        tmp_path / "arch", n_subjects=2, seed=1, records_per_subject=2, fs=100.0, duration_s=1.0
    )
    refs = list_records(arch.root)
    assert (
        arch.haemodynamics is None and len(refs) == 4 and refs[0].subject_id == refs[1].subject_id != refs[2].subject_id
    )


def _features(x):
    return np.concatenate([np.percentile(x, 99, axis=-1), np.percentile(x, 1, axis=-1), x.mean(-1)], axis=1)


@pytest.fixture(scope="module")
def small_cohort():
    return generate_cohort_arrays(300, seed=2, fs=200.0, duration_s=8.0)


def test_prevalence_and_labels(small_cohort):
    _, table = small_cohort
    non_ph = (table.mPAP <= 20).mean()
    assert 0.2 < non_ph < 0.4
    post = (table.PAWP > 15)[table.mPAP > 20].mean()
    assert 0.1 < post < 0.5
    assert np.corrcoef(table.mPAP, table.PAWP)[0, 1] > 0.2


def test_linear_model_learns_labels_12l_beats_6l(small_cohort):
    signals, table = small_cohort
    y = (table.mPAP > 20).to_numpy().astype(int)
    feats = _features(signals)
    scores = {}
    for name, leads in (("6L", range(6)), ("12L", range(12))):
        cols = np.concatenate([np.array(list(leads)) + 12 * j for j in range(3)])
        aucs = []
        for seed in range(3):
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
            cv = StratifiedKFold(5, shuffle=True, random_state=seed)
            prob = cross_val_predict(model, feats[:, cols], y, cv=cv, method="predict_proba")[:, 1]
            aucs.append(roc_auc_score(y, prob))
        scores[name] = float(np.mean(aucs))
    assert 0.6 < scores["6L"] < scores["12L"] < 0.97, scores
    single = [abs(roc_auc_score(y, feats[:, j]) - 0.5) + 0.5 for j in range(feats.shape[1])]
    assert max(single) < 0.85  # no single feature separates the classes


def test_direct_wfdb_writer_matches_wrsamp(tmp_path):
    import wfdb

    from kale_ext.loaddata.synthetic import write_wfdb_record

    x = np.random.default_rng(0).normal(size=(3, 500))
    write_wfdb_record(tmp_path / "a", x, 250.0, ["I", "aVF", "V1"], comments=["Age: 50"])
    wfdb.wrsamp(
        "b",
        fs=250,
        units=["mV"] * 3,
        sig_name=["I", "aVF", "V1"],
        p_signal=x.T,
        fmt=["16"] * 3,
        adc_gain=[200.0] * 3,
        baseline=[0] * 3,
        write_dir=str(tmp_path),
    )
    assert (tmp_path / "a.dat").read_bytes() == (tmp_path / "b.dat").read_bytes()
    a, b = wfdb.rdrecord(str(tmp_path / "a")), wfdb.rdrecord(str(tmp_path / "b"))
    assert a.sig_name == b.sig_name and a.fs == b.fs and a.checksum == b.checksum and a.comments == ["Age: 50"]
    np.testing.assert_array_equal(a.p_signal, b.p_signal)


@pytest.mark.parametrize("seed", [0, 2])
def test_three_task_class_proportions_from_csv(tmp_path, seed):
    """PH, phenotype (among PH) and elevated PAWP each have both classes at >= 20 % in a 300-subject cohort."""
    from kale_ext.loaddata.ecg_dataset import detection_label, elevated_label, phenotype_label

    cohort = write_synthetic_cohort(tmp_path, n_subjects=300, seed=seed, fs=50.0, duration_s=1.0, noise=False)
    table = pd.read_csv(cohort.haemodynamics)
    assert len(table) == 300 and table.notna().all().all()
    ph = detection_label(table.mPAP, 20.0)
    pheno = phenotype_label(table.mPAP, table.PAWP, 20.0, 15.0)
    pawp = elevated_label(table.PAWP, 15.0)
    # the labels follow the written haemodynamics: phenotype is defined exactly on the PH subjects
    np.testing.assert_array_equal(np.isnan(pheno), ph == 0)
    np.testing.assert_array_equal(pheno[ph == 1], pawp[ph == 1])
    for name, label in (("ph", ph), ("phenotype", pheno[~np.isnan(pheno)]), ("pawp", pawp)):
        share = label.mean()
        assert 0.2 <= share <= 0.8, (name, share)
    assert (~np.isnan(pheno)).sum() >= 150  # enough PH subjects for the phenotype task


def _p_terminal_v1(x, fs):
    """Beat-averaged V1 in the 60-250 ms before each QRS, summed over its second half (negative = P terminal force)."""
    from scipy.signal import find_peaks

    energy = np.abs(np.diff(x, axis=-1)).sum(0)
    peaks, _ = find_peaks(energy, distance=int(0.35 * fs), height=0.5 * np.percentile(energy, 98))
    start, stop = int(0.25 * fs), int(0.06 * fs)
    v1 = x[CANONICAL_LEADS.index("V1")]
    template = np.stack([v1[p - start : p - stop] for p in peaks if p > start]).mean(0)
    template = template - template[0]
    return template[len(template) // 2 :].sum()


def test_ecg_carries_pawp_signal(small_cohort):
    """Among PH subjects a left-atrial P-wave feature in V1 ranks PAWP, and follows PAWP more than mPAP."""
    from scipy.stats import spearmanr

    signals, table = small_cohort
    ph = (table.mPAP > 20).to_numpy()
    feature = np.array([_p_terminal_v1(x, 200.0) for x in signals[ph]])
    post = (table.PAWP > 15).to_numpy()[ph]
    assert roc_auc_score(post, -feature) > 0.75
    rho_pawp = spearmanr(feature, table.PAWP[ph])[0]
    rho_mpap = spearmanr(feature, table.mPAP[ph])[0]
    assert rho_pawp < -0.5 and abs(rho_pawp) > abs(rho_mpap) + 0.2, (rho_pawp, rho_mpap)


def test_left_atrial_lobe_grows_with_pawp():
    """Same subject, same beats and noise: a higher PAWP changes only the P wave, deepening its V1 terminal part."""
    fs = 250.0
    ecgs, las = [], []
    for pawp in (6.0, 14.0, 24.0):
        rng = np.random.default_rng(5)
        params = draw_subject(rng, mpap=30.0, pawp=pawp, atrial_rng=np.random.default_rng(6))
        las.append(params["la_severity"])
        ecgs.append(synthesize_ecg(params, fs, 4.0, rng, noise=False))
    assert las[0] == 0.0 < las[1] < las[2]
    terminal = [_p_terminal_v1(x, fs) for x in ecgs]
    assert terminal[0] > terminal[1] > terminal[2]
    diff = np.abs(ecgs[2] - ecgs[0]).max(axis=0)
    assert diff.max() > 0.08  # a visible change (mV)
    # the change lives before the QRS: at lead II's R peaks the difference is small
    r_peaks = np.argsort(ecgs[0][1])[-3:]
    assert diff[r_peaks].max() < 0.1 * diff.max()
