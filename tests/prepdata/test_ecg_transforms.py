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
    lead_quality,
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


def test_inverted_channel_is_negated_and_stored_under_its_lead():
    x = _record()
    names = list(CANONICAL_LEADS)
    ref = preprocess_record(x, 100.0, names, SMALL)
    for spelling in ("-aVR", "aVR-", "-avr", "-AVR"):
        flipped = x.copy()
        flipped[3] = -x[3]
        names[3] = spelling
        out = preprocess_record(flipped, 100.0, names, SMALL)
        np.testing.assert_allclose(out.signals, ref.signals, atol=1e-12)
        assert out.mask.all() and out.notes == ("inverted channels negated: aVR",)
    out = preprocess_record(np.vstack([x, x[:1]]), 100.0, list(CANONICAL_LEADS) + ["Resp"], SMALL)
    assert out.notes == ("ignored channels: Resp",)


def test_nan_limits_refuse_a_mostly_nan_lead_instead_of_a_ramp():
    x = _record(n=5000)
    x[6, 2:] = np.nan  # 99.96% NaN: interpolation would turn it into a constant ramp marked present
    with pytest.raises(QualityError, match=r"nan_fraction: V1 \(99.96% NaN > 20%\)"):
        preprocess_record(x, 100.0, CANONICAL_LEADS, SMALL)
    out = preprocess_record(x, 100.0, CANONICAL_LEADS, SMALL, leads="6L")
    assert not out.mask[6] and out.mask.sum() == 11 and (out.signals[6] == 0).all()
    assert out.lead_qc == {"V1": "nan_fraction: V1 (99.96% NaN > 20%)"}
    y = _record(n=5000)
    y[7, 1000:1150] = np.nan  # 3% NaN but one 1.5 s gap
    with pytest.raises(QualityError, match=r"nan_gap: V2 \(1.50 s NaN gap > 1 s\)"):
        preprocess_record(y, 100.0, CANONICAL_LEADS, SMALL)
    loose = PreprocessSpec(target_fs=100.0, target_length=300, max_nan_gap_s=2.0)
    assert preprocess_record(y, 100.0, CANONICAL_LEADS, loose).mask.all()
    y[7, 1000:1050] = np.nan
    y[7, 1050:1150] = 0.5  # a short gap is still interpolated
    assert preprocess_record(y, 100.0, CANONICAL_LEADS, SMALL).mask.all()


def test_saturated_and_implausible_gain_leads_are_flagged():
    x = _record(n=1000)
    rail = np.quantile(x[8], [1 / 3, 2 / 3])
    x[8] = np.clip(x[8], *rail)  # two thirds of the samples on a rail
    x[9] = x[9] * 1e-3  # a uV signal declared as mV: about 0.003 mV peak-to-peak
    x[10] = x[10] * 1e3  # a V signal declared as mV
    problems = dict(zip(CANONICAL_LEADS, lead_quality(x, 100.0, SMALL)))
    assert problems["V3"][0] == "saturated_lead" and problems["V3"][1].startswith("66.")
    assert problems["V4"][0] == "implausible_amplitude" and "< 0.01 mV" in problems["V4"][1]
    assert problems["V5"][0] == "implausible_amplitude" and "> 20 mV" in problems["V5"][1]
    assert all(problems[n] is None for n in CANONICAL_LEADS if n not in ("V3", "V4", "V5"))
    spike = _record(n=1000)
    spike[0, 500] = 40.0  # a single artefact spike is no gain error
    assert lead_quality(spike[:1], 100.0, SMALL) == [None]
    with pytest.raises(QualityError, match="saturated_lead: V3"):
        preprocess_record(x, 100.0, CANONICAL_LEADS, SMALL)


def test_mask_bad_leads_keeps_the_record_and_required_leads_still_refuse():
    x = _record()
    x[7] = 0.3  # flat V2
    x[8] = np.clip(x[8], *np.quantile(x[8], [0.3, 0.7]))  # saturated V3
    with pytest.raises(QualityError, match="flat_lead: V2"):
        preprocess_record(x, 100.0, CANONICAL_LEADS, SMALL)  # default: every cache lead is required
    spec = PreprocessSpec(target_fs=100.0, target_length=300, mask_bad_leads=True, min_good_leads=8)
    out = preprocess_record(x, 100.0, CANONICAL_LEADS, spec)
    assert out.mask.tolist() == [True] * 7 + [False, False] + [True] * 3
    assert set(out.lead_qc) == {"V2", "V3"} and out.lead_qc["V2"] == "flat_lead: V2"
    assert out.lead_qc["V3"].startswith("saturated_lead: V3 (")
    strict = PreprocessSpec(target_fs=100.0, target_length=300, mask_bad_leads=True, required_leads=("I", "V2"))
    with pytest.raises(QualityError, match="flat_lead: V2"):
        preprocess_record(x, 100.0, CANONICAL_LEADS, strict)
    few = PreprocessSpec(target_fs=100.0, target_length=300, mask_bad_leads=True, min_good_leads=11)
    with pytest.raises(QualityError, match="too_few_leads: 10 of 12 leads usable, need 11"):
        preprocess_record(x, 100.0, CANONICAL_LEADS, few)
    # a device record with 4 leads is kept with the limb leads derived, the missing chest leads masked
    dev = PreprocessSpec(target_fs=100.0, target_length=300, mask_bad_leads=True, derive_limb_leads=True)
    out = preprocess_record(x[[0, 1, 6, 9]], 100.0, ["I", "II", "V1", "V4"], dev)
    assert out.mask.tolist() == [True] * 7 + [False, False, True, False, False]


def test_powerline_highpass_options_and_fingerprints():
    x = _record(n=1000, fs=500.0)
    base = dict(target_fs=500.0, target_length=800)
    off = PreprocessSpec(**base, highpass_hz=0, powerline_hz=0)
    assert off.highpass_hz is None and off.powerline_hz is None
    assert off == PreprocessSpec(**base, highpass_hz=None, powerline_hz=None)
    raw = preprocess_record(x, 500.0, CANONICAL_LEADS, off).signals
    np.testing.assert_allclose(raw, zscore(x[:, :800]), atol=1e-12)
    sixty = PreprocessSpec(**base, powerline_hz=60)
    np.testing.assert_allclose(
        preprocess_record(x, 500.0, CANONICAL_LEADS, sixty).signals,
        zscore(powerline_smooth(highpass(x, 500.0), 500.0, 60.0)[:, :800]),
        atol=1e-9,
    )
    prints = {
        PreprocessSpec(**kw).fingerprint()
        for kw in (
            base,
            {**base, "powerline_hz": 60},
            {**base, "powerline_hz": None},
            {**base, "highpass_hz": 0.67},
            {**base, "derive_limb_leads": True},
            {**base, "mask_bad_leads": True},
            {**base, "max_nan_fraction": 0.5},
        )
    }
    assert len(prints) == 7
    for bad in ({"powerline_hz": 55}, {"highpass_hz": 300}, {"max_nan_fraction": 1.5}, {"min_good_leads": 0}):
        with pytest.raises(ValueError):
            PreprocessSpec(**{**base, **bad})


@pytest.mark.parametrize("fs", [0.0, -250.0, float("nan")])
def test_non_positive_sampling_rate_is_a_quality_error(fs):
    with pytest.raises(QualityError, match="bad_sampling_rate"):
        preprocess_record(_record(), fs, CANONICAL_LEADS, SMALL)


@pytest.mark.parametrize("fs", [0.002, 0.5, 49.0, 25_000.0])
def test_an_implausible_sampling_rate_is_refused_before_resampling(fs):
    with pytest.raises(QualityError) as err:  # 0.002 Hz to 100 Hz would be a 50,000x upsampling
        preprocess_record(_record(n=50), fs, CANONICAL_LEADS, SMALL)
    assert err.value.reason == "bad_sampling_rate" and "plausible 50-20000 Hz" in str(err.value)
