"""Tests of kale_ext.prepdata.ecg_transforms: each transform, the quality gates and the spec fingerprint."""

import numpy as np
import pytest

from kale_ext.loaddata.leads import CANONICAL_LEADS
from kale_ext.prepdata.ecg_transforms import (
    PreprocessSpec,
    QualityError,
    clean_ecg,
    crop_or_pad,
    highpass,
    interpolate_nan,
    powerline_smooth,
    preprocess_record,
    resample,
    zscore,
)


def test_interpolate_nan_linear_and_edges():
    x = np.array([[np.nan, 1.0, np.nan, 3.0, np.nan], [0.0, 1.0, 2.0, 3.0, 4.0], [np.nan] * 5])
    y = interpolate_nan(x)
    np.testing.assert_allclose(y[0], [1.0, 1.0, 2.0, 3.0, 3.0])
    np.testing.assert_allclose(y[1], x[1])
    assert np.isnan(y[2]).all()


def test_resample_keeps_a_sine():
    fs, f = 1000.0, 5.0
    t = np.arange(2000) / fs
    x = np.stack([np.sin(2 * np.pi * f * t), np.cos(2 * np.pi * f * t)])
    y = resample(x, fs, 500.0)
    t2 = np.arange(1000) / 500.0
    assert y.shape == (2, 1000)
    np.testing.assert_allclose(
        y[:, 100:-100], np.stack([np.sin(2 * np.pi * f * t2), np.cos(2 * np.pi * f * t2)])[:, 100:-100], atol=1e-2
    )
    assert resample(x, 257.0, 500.0).shape[-1] == int(np.ceil(2000 * 500 / 257))


def test_highpass_removes_drift_and_keeps_qrs_band():
    fs = 500.0
    t = np.arange(5000) / fs
    drift = 2.0 + 1.0 * np.sin(2 * np.pi * 0.1 * t)
    band = np.sin(2 * np.pi * 10 * t)
    y = highpass((drift + band)[None], fs)[0]
    assert np.abs(y[1500:-1500] - band[1500:-1500]).max() < 0.03
    assert np.abs(highpass(drift[None], fs)[0][1500:-1500]).max() < 0.05 * np.ptp(drift)


def test_powerline_smoothing_kills_50hz():
    fs = 500.0
    t = np.arange(5000) / fs
    hum = np.sin(2 * np.pi * 50 * t)
    slow = np.sin(2 * np.pi * 2 * t)
    y = powerline_smooth((slow + hum)[None], fs)[0]
    assert np.abs(y[100:-100] - slow[100:-100]).max() < 0.05
    # equivalent chain: high-pass then smoothing
    np.testing.assert_allclose(clean_ecg(slow[None], fs), powerline_smooth(highpass(slow[None], fs), fs))


def test_crop_pad_zscore():
    x = np.arange(20, dtype=float).reshape(2, 10)
    np.testing.assert_array_equal(crop_or_pad(x, 4), x[:, :4])
    np.testing.assert_array_equal(crop_or_pad(x, 4, "center"), x[:, 3:7])
    padded = crop_or_pad(x, 12)
    assert padded.shape == (2, 12) and (padded[:, 10:] == 0).all()
    z = zscore(np.stack([x[0], np.full(10, 3.0)]))
    np.testing.assert_allclose([z[0].mean(), z[0].std()], [0.0, 1.0], atol=1e-12)
    assert (z[1] == 0).all()


def _record(n=400, fs=100.0, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / fs
    return np.stack([np.sin(2 * np.pi * (1 + k) * t) + 0.1 * rng.normal(size=n) for k in range(12)])


SMALL = PreprocessSpec(target_fs=100.0, target_length=300)


def test_preprocess_maps_by_name_and_outputs_canonical_slots():
    x = _record()
    out = preprocess_record(x, 100.0, CANONICAL_LEADS, SMALL)
    perm = np.random.default_rng(1).permutation(12)
    names = [CANONICAL_LEADS[k].lower() for k in perm]
    out2 = preprocess_record(x[perm], 100.0, names, SMALL)
    np.testing.assert_allclose(out.signals, out2.signals)
    assert out.signals.shape == (12, 300) and out.mask.all()
    np.testing.assert_allclose(out.signals.mean(-1), 0.0, atol=1e-9)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda x, n: (x, [m for m in n if m != "aVL"] + ["resp"]), "missing_lead: aVL"),
        (lambda x, n: (np.where(np.arange(12)[:, None] == 2, np.nan, x), n), "all_nan_lead: III"),
        (lambda x, n: (np.where(np.arange(12)[:, None] == 7, 0.3, x), n), "flat_lead: V2"),
        (lambda x, n: (x[:, :250], n), "too_short"),
    ],
)
def test_quality_gates(mutate, reason):
    x, names = mutate(_record(), list(CANONICAL_LEADS))
    with pytest.raises(QualityError) as err:
        preprocess_record(x, 100.0, names, SMALL)
    assert err.value.describe().startswith(reason)


def test_optional_bad_lead_is_masked_and_derivation_fills_limb_leads():
    x = _record()
    x[7] = 0.0  # flat V2 is fine when only 6 leads are required
    out = preprocess_record(x, 100.0, CANONICAL_LEADS, SMALL, leads="6L")
    assert not out.mask[7] and out.mask.sum() == 11 and (out.signals[7] == 0).all()
    names = ["I", "II", "V1"]
    with pytest.raises(QualityError, match="missing_lead"):
        preprocess_record(x[[0, 1, 6]], 100.0, names, SMALL, leads="6L")
    spec = PreprocessSpec(target_fs=100.0, target_length=300, derive_limb_leads=True)
    out = preprocess_record(x[[0, 1, 6]], 100.0, names, spec, leads="6L")
    assert out.mask[:7].all() and not out.mask[7:].any()


def test_short_records_can_be_padded():
    spec = PreprocessSpec(target_fs=100.0, target_length=300, min_length=200)
    out = preprocess_record(_record(n=250), 100.0, CANONICAL_LEADS, spec)
    assert out.signals.shape == (12, 300) and (out.signals[:, 250:] == 0).all()


def test_fingerprint_stable_and_sensitive():
    a = PreprocessSpec()
    assert a.fingerprint() == PreprocessSpec().fingerprint() and len(a.fingerprint()) == 16
    assert a.fingerprint() != PreprocessSpec(highpass_hz=0.67).fingerprint()
    assert a.fingerprint() != PreprocessSpec(target_length=4096).fingerprint()
    b = PreprocessSpec(required_leads=["avl", "i"])
    assert b.required_leads == ("aVL", "I")
    assert (
        PreprocessSpec.from_dict(b.to_dict()) == b
        and PreprocessSpec.from_dict(b.to_dict()).fingerprint() == b.fingerprint()
    )
    with pytest.raises(ValueError):
        PreprocessSpec(crop="end")


@pytest.mark.parametrize("fs", [100.0, 250.0, 500.0, 1000.0])
def test_powerline_smoothing_equals_filtfilt_moving_average(fs):
    from scipy import signal as sps

    x = np.random.default_rng(0).normal(size=(3, 1200)) + np.linspace(0, 3, 1200)
    width = int(fs / 50)
    expected = sps.filtfilt(np.ones(width), [float(width)], x, axis=-1, method="pad")
    np.testing.assert_allclose(powerline_smooth(x, fs), expected, atol=1e-10)
