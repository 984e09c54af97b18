"""R-peak detection, template wave windows and wave shares, on synthetic beats with known times and on real records."""

import numpy as np
import pytest

from kale_ext.interpret.waves import (
    WAVES,
    detect_r_peaks,
    time_fraction,
    wave_attribution_table,
    wave_labels,
    wave_shares,
)

FS = 500
LIMB = ("I", "II", "III", "aVR", "aVL", "aVF")


def _synthetic_ecg(r_times: np.ndarray, seconds: float, seed: int = 0) -> np.ndarray:
    """(6, T) limb-lead ECG: P, QRS and T bumps around each R time, lead gains of both signs, noise and wander."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * FS)) / FS
    beat = np.zeros_like(t)
    for r in r_times:
        beat += 0.15 * np.exp(-0.5 * ((t - r + 0.16) / 0.02) ** 2)
        beat += 1.2 * np.exp(-0.5 * ((t - r) / 0.01) ** 2) - 0.3 * np.exp(-0.5 * ((t - r - 0.025) / 0.01) ** 2)
        beat += 0.35 * np.exp(-0.5 * ((t - r - 0.28) / 0.04) ** 2)
    gains = np.array([0.7, 1.0, 0.4, -0.8, 0.2, 0.6])
    wander = 0.2 * np.sin(2 * np.pi * 0.3 * t)
    return gains[:, None] * beat + wander + rng.normal(0, 0.03, (6, len(t)))


def test_r_peaks_match_known_beat_times():
    """Every beat is found within 20 ms, with no extra peak, at a varying rate (RR 0.55-1.1 s)."""
    rr = np.array([0.8, 0.55, 1.1, 0.9, 0.6, 0.75, 1.0, 0.7, 0.85, 0.65, 0.95])
    r_times = 0.4 + np.concatenate([[0], np.cumsum(rr)])
    x = _synthetic_ecg(r_times, seconds=10.0)
    peaks = detect_r_peaks(x, FS, LIMB)
    assert len(peaks) == len(r_times)
    np.testing.assert_array_less(np.abs(peaks / FS - r_times), 0.02)


def test_r_peaks_use_limb_leads_and_ignore_absent_ones():
    """A huge artefact on a precordial or an absent lead does not create beats."""
    r_times = np.arange(0.5, 9.5, 0.8)
    limb = _synthetic_ecg(r_times, 10.0)
    spikes = np.zeros((1, limb.shape[1]))
    spikes[0, ::700] = 50.0
    x = np.concatenate([limb, spikes])
    peaks = detect_r_peaks(x, FS, LIMB + ("V1",))
    assert len(peaks) == len(r_times)
    x[1] = spikes[0]  # lead II now holds the artefact, but it is marked absent
    mask = np.ones(7, dtype=bool)
    mask[1] = False
    peaks = detect_r_peaks(x, FS, LIMB + ("V1",), mask)
    assert len(peaks) == len(r_times)
    np.testing.assert_array_less(np.abs(peaks / FS - r_times), 0.02)
    assert len(detect_r_peaks(np.zeros((6, 5000)), FS, LIMB)) == 0


def test_window_positions():
    """At RR = 0.8 s: R is QRS, R - 0.1 s is P, R + 0.2 s is T, R + 0.08 s (ST segment) is other."""
    r = np.array([1000, 1400, 1800])
    labels = wave_labels(r, 2400, FS)
    assert labels[1400] == "QRS"
    assert labels[1400 - 50] == "P"
    assert labels[1400 + 100] == "T"
    assert labels[1400 + 40] == "other"
    assert labels[0] == "other"
    assert set(np.unique(labels)) <= set(WAVES)
    np.testing.assert_allclose(time_fraction(labels).sum(), 1.0)


def test_shares_follow_where_attribution_is():
    """Attribution placed only in T windows gives a T share of 1; shares sum to 1; absent leads are NaN."""
    r = np.array([400, 800, 1200])
    labels = wave_labels(r, 1600, FS)
    attr = np.zeros((3, 1600))
    attr[0, labels == "T"] = -1.0
    attr[1] = 1.0
    shares = wave_shares(attr, labels, mask=np.array([True, True, False]))
    np.testing.assert_allclose(shares[0], [0, 0, 1, 0])
    np.testing.assert_allclose(shares[1], time_fraction(labels))
    assert np.isnan(shares[2]).all()
    table = wave_attribution_table(shares[None], ["I", "II", "III"])
    assert list(table["lead"]) == ["I", "II"]
    np.testing.assert_allclose(table[[f"share_{w}" for w in WAVES]].sum(axis=1), 1.0)


def test_real_records_have_plausible_rates(cinc_dir):
    """On real 12-lead records labelled sinus rhythm, the rate is 40-150/min and the rhythm regular."""
    wfdb = pytest.importorskip("wfdb")
    checked = 0
    for header in sorted(cinc_dir.glob("*.hea")):
        record = wfdb.rdrecord(str(header.with_suffix("")))
        dx = next((c for c in record.comments if c.startswith("Dx")), "")
        if "426783006" not in dx:  # SNOMED code of sinus rhythm
            continue
        peaks = detect_r_peaks(record.p_signal.T, record.fs, record.sig_name)
        rr = np.diff(peaks) / record.fs
        assert len(peaks) >= 5, header.name
        assert 40 <= 60 / np.median(rr) <= 150, header.name
        assert np.std(rr) / np.mean(rr) < 0.2, header.name
        checked += 1
    assert checked >= 5
