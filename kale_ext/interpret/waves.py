"""Offline wave windows (P, QRS, T) and the share of attribution that falls in each.

Delineation here is deliberately simple and dependency-free (numpy and scipy only), so that it runs offline on any
record:

1. **R peaks.** The limb leads (I, II, III, aVR, aVL, aVF; all given leads when none of them is present) are
   band-passed at 5-15 Hz (the QRS band used by Pan and Tompkins, IEEE TBME 1985), differentiated and squared; the
   squared slopes are summed over leads, integrated over a 120 ms moving window and log-compressed. Peaks of that
   energy are found with ``scipy.signal.find_peaks`` with a refractory distance (default 250 ms, i.e. at most 240
   beats/min) and kept when they rise half-way from the energy's median to the typical beat height (a robust
   median of the larger peaks, so that a few large ectopic beats do not hide the others). Each peak is then moved
   to the sample of largest absolute band-passed amplitude (summed over leads) within +-100 ms, which lands on the
   R (or S) deflection.
2. **Template windows** around each R peak, using the beat's RR interval (the median RR for the first and last beat):

   =====  ==================================================  ==========================================
   wave   window (seconds, relative to the R peak)             basis
   =====  ==================================================  ==========================================
   QRS    [-0.05, +0.05]                                      normal QRS duration <= 100-120 ms, not
                                                               rate-dependent
   P      [-min(0.25 * RR_before, 0.30), -0.06]               PR interval 120-200 ms and P duration
                                                               <= 120 ms at normal rates, scaled by RR
   T      [+0.12 * sqrt(RR_after), +0.40 * sqrt(RR_after)]    QT ~ 0.40 * sqrt(RR) (Bazett, 1920); T wave
                                                               in the last part of QT
   =====  ==================================================  ==========================================

   Overlaps resolve QRS > T > P; every other sample is ``"other"`` (baseline, ST segment, signal edges).

Limits: these are template windows, not a true delineator. They do not find wave onsets or offsets; they assume
sinus rhythm with a normal PR interval and QRS width. They fail or mislead on atrial fibrillation or flutter (no
P wave: the "P" window then holds fibrillatory baseline), paced rhythms (pacing spikes are detected as QRS), wide
QRS (bundle branch block, ventricular beats: QRS spills into the "other" and "T" windows), long QT, high-grade AV
block (P waves not tied to the next R) and very noisy records (missed or extra peaks). Read wave shares as a coarse
summary across many records, and check the per-subject figures.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

WAVES = ("P", "QRS", "T", "other")
LIMB_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF")
_CODE = {"other": 0, "P": 1, "QRS": 2, "T": 3}


def detect_r_peaks(
    signals: np.ndarray,
    fs: float,
    lead_names: Sequence[str] | None = None,
    mask: np.ndarray | None = None,
    refractory_s: float = 0.25,
    height_fraction: float = 0.5,
) -> np.ndarray:
    """Find R peaks of one multi-lead record.

    Args:
        signals: (leads, time) or (time,) signal.
        fs: sampling frequency in Hz.
        lead_names: names of the leads; the limb leads among them are used when present.
        mask: (leads,) bool, True = present; absent leads are ignored.
        refractory_s: minimum distance between two beats in seconds.
        height_fraction: peak height threshold, as a fraction of the way from the (log) energy's median to the
            typical beat height.

    Returns:
        Sorted int array of R-peak sample indices (possibly empty for a flat or very short record).
    """
    from scipy.signal import butter, find_peaks, sosfiltfilt

    x = np.atleast_2d(np.asarray(signals, dtype=np.float64))
    keep = np.ones(x.shape[0], dtype=bool) if mask is None else np.asarray(mask, dtype=bool).copy()
    if lead_names is not None:
        limb = np.array([name in LIMB_LEADS for name in lead_names])
        if (limb & keep).any():
            keep &= limb
    x = x[keep]
    n = x.shape[-1]
    if x.shape[0] == 0 or n < int(fs):
        return np.zeros(0, dtype=int)
    x = np.nan_to_num(x - np.median(x, axis=-1, keepdims=True))
    high = min(15.0, 0.45 * fs)
    sos = butter(3, [5.0, high], btype="bandpass", fs=fs, output="sos")
    band = sosfiltfilt(sos, x, axis=-1)
    # Each lead weighs the same whatever its amplitude: scale by its robust spread.
    scale = np.median(np.abs(band), axis=-1, keepdims=True)
    band = band / np.where(scale > 0, scale, 1.0)
    energy = (np.gradient(band, axis=-1) ** 2).sum(axis=0)
    width = max(1, int(round(0.12 * fs)))
    energy = np.convolve(energy, np.ones(width) / width, mode="same")
    floor = np.median(energy)
    if floor <= 0:
        return np.zeros(0, dtype=int)
    # Log compression keeps a few large ectopic beats from setting the scale for all the others.
    energy = np.log1p(energy / floor)
    candidates, props = find_peaks(energy, height=0.0, distance=max(1, int(refractory_s * fs)))
    if len(candidates) == 0:
        return np.zeros(0, dtype=int)
    heights = props["peak_heights"]
    # Typical beat height: the median of the candidates reaching half of a running reference (twice), which
    # discards the small noise peaks between beats and is insensitive to a minority of very large beats.
    reference = np.percentile(heights, 90)
    for _ in range(2):
        reference = np.median(heights[heights >= 0.5 * reference])
    baseline = np.median(energy)
    peaks = candidates[heights >= baseline + height_fraction * (reference - baseline)]
    amplitude = np.abs(band).sum(axis=0)
    half = int(round(0.1 * fs))
    refined = [max(0, p - half) + int(np.argmax(amplitude[max(0, p - half) : p + half + 1])) for p in peaks]
    return np.unique(np.asarray(refined, dtype=int))


def wave_labels(r_peaks: np.ndarray, n_samples: int, fs: float) -> np.ndarray:
    """Label every sample of a record as P, QRS, T or other from template windows around the R peaks.

    Args:
        r_peaks: sorted R-peak sample indices.
        n_samples: record length T.
        fs: sampling frequency in Hz.

    Returns:
        (T,) array of wave names (``"P"``, ``"QRS"``, ``"T"``, ``"other"``); the window rules are in the module
        docstring.
    """
    code = np.zeros(n_samples, dtype=np.int8)
    r = np.asarray(r_peaks, dtype=int)
    if len(r):
        rr = np.diff(r) / fs
        median_rr = float(np.median(rr)) if len(rr) else 0.8
        rr_before = np.concatenate([[median_rr], rr])
        rr_after = np.concatenate([rr, [median_rr]])
        # Write the lowest priority first so that later windows overwrite it: P < T < QRS.
        for peak, before in zip(r, rr_before):
            start = peak - int(round(min(0.25 * before, 0.30) * fs))
            _fill(code, start, peak - int(round(0.06 * fs)), _CODE["P"])
        for peak, after in zip(r, rr_after):
            root = np.sqrt(after)
            _fill(code, peak + int(round(0.12 * root * fs)), peak + int(round(0.40 * root * fs)), _CODE["T"])
        for peak in r:
            _fill(code, peak - int(round(0.05 * fs)), peak + int(round(0.05 * fs)), _CODE["QRS"])
    names = np.array(["other", "P", "QRS", "T"])
    return names[code]


def _fill(code: np.ndarray, start: int, stop: int, value: int) -> None:
    """Set ``code[start:stop + 1]`` to ``value``, clipped to the record."""
    start, stop = max(0, start), min(len(code) - 1, stop)
    if stop >= start:
        code[start : stop + 1] = value


def wave_shares(attributions: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Share of each lead's absolute attribution falling in the P, QRS, T and other windows of one record.

    Args:
        attributions: (leads, time) signed attributions.
        labels: (time,) wave names from :func:`wave_labels`.
        mask: (leads,) bool, True = present; absent leads (and leads with zero attribution) get NaN.

    Returns:
        (leads, 4) shares in the order of ``WAVES``, each present row summing to 1.
    """
    a = np.abs(np.asarray(attributions, dtype=np.float64))
    labels = np.asarray(labels)
    sums = np.stack([a[:, labels == wave].sum(axis=1) for wave in WAVES], axis=1)
    total = sums.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.where(total > 0, sums / total, np.nan)
    if mask is not None:
        shares[~np.asarray(mask, dtype=bool)] = np.nan
    return shares


def wave_attribution_table(
    shares: np.ndarray, lead_names: Sequence[str], time_fraction: np.ndarray | None = None
) -> pd.DataFrame:
    """One row per lead in use: the mean over records of the per-record wave shares.

    Args:
        shares: (N, leads, 4) from :func:`wave_shares` for N records (NaN rows skipped).
        lead_names: names of the leads.
        time_fraction: (N, 4) fraction of each record's samples in each window; when given, its mean is reported as
            ``time_<wave>`` columns, the share a lead would get if its attribution were spread evenly in time.

    Returns:
        DataFrame with lead, share_P, share_QRS, share_T, share_other (summing to 1), n_records and optionally
        time_P ... time_other.
    """
    shares = np.asarray(shares, dtype=np.float64)
    rows = []
    for j, lead in enumerate(lead_names):
        valid = ~np.isnan(shares[:, j, 0])
        if not valid.any():
            continue
        mean = shares[valid, j].mean(axis=0)
        row = {"lead": lead, **{f"share_{w}": float(v) for w, v in zip(WAVES, mean)}, "n_records": int(valid.sum())}
        if time_fraction is not None:
            row.update({f"time_{w}": float(v) for w, v in zip(WAVES, np.asarray(time_fraction)[valid].mean(axis=0))})
        rows.append(row)
    columns = ["lead", *[f"share_{w}" for w in WAVES], "n_records"]
    if time_fraction is not None:
        columns += [f"time_{w}" for w in WAVES]
    return pd.DataFrame(rows, columns=columns)


def time_fraction(labels: np.ndarray) -> np.ndarray:
    """(4,) fraction of samples in each wave window (order of ``WAVES``)."""
    labels = np.asarray(labels)
    return np.array([(labels == wave).mean() for wave in WAVES])
