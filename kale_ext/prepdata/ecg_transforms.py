"""Transforms of one ECG record, vectorised over leads, and the quality gates that reject records.

All transforms take and return numpy arrays of shape (L, T) (leads, samples). The full chain, driven by
:class:`PreprocessSpec`, is :func:`preprocess_record`:

1. map channels to the 12 canonical lead slots by name (absent leads: mask False, zeros); an inverted channel
   (``-aVR``, ``aVR-``) is negated and stored as its lead; channels that name no lead are ignored and noted;
2. per-lead quality checks on the raw leads (:func:`lead_quality`): all-NaN, too large a NaN fraction or too long
   a NaN gap, flat, saturated (too many samples at the lead's min/max rail) and implausible amplitude (a gain or
   unit error). A required lead that fails refuses the record; any other lead that fails is masked (mask False,
   zeros) and its reason is kept in :attr:`Preprocessed.lead_qc`. With ``mask_bad_leads`` the cache's leads are not
   all required: a bad or missing one is masked, and the record is refused only when fewer than ``min_good_leads``
   of them remain (or when a lead of ``required_leads`` fails);
3. linear interpolation of the remaining NaN gaps (edges take the nearest valid value);
4. optional derivation of absent limb leads from I and II;
5. resampling to ``target_fs`` with ``scipy.signal.resample_poly`` (rational approximation of the rate ratio);
6. cleaning equivalent to neurokit2's ``ecg_clean(method="neurokit")`` used by the reference code: a 0.5 Hz
   5th-order Butterworth high-pass applied forwards and backwards (``sosfiltfilt``), then powerline smoothing (a
   moving average of ``fs / 50`` samples applied forwards and backwards with ``filtfilt``);
7. crop to ``target_length`` samples (policy ``"start"``: the first samples; ``"center"``: the middle) after
   cleaning, so that filter edge effects of long records fall outside the kept window;
8. per-lead z-score (a lead with zero spread becomes zeros);
9. records shorter than ``min_length`` samples (default: ``target_length``) are rejected as too short; shorter
   records that pass are zero-padded at the end (after the z-score, so the padding equals the lead mean). Padding is
   not marked in the mask, which is per lead.
"""

import logging
from dataclasses import asdict, dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np
from scipy import signal as sps

from kale_ext.loaddata.leads import CANONICAL_LEADS, derive_limb_leads, map_channels, resolve_leads
from kale_ext.loaddata.wfdb_sources import MAX_FS_HZ, MIN_FS_HZ
from kale_ext.utils.files import short_hash

logger = logging.getLogger(__name__)

QC_REASONS = (
    "unreadable",
    "bad_sampling_rate",
    "missing_lead",
    "all_nan_lead",
    "nan_fraction",
    "nan_gap",
    "flat_lead",
    "saturated_lead",
    "implausible_amplitude",
    "too_few_leads",
    "too_short",
)
LEAD_QC_REASONS = ("all_nan_lead", "nan_fraction", "nan_gap", "flat_lead", "saturated_lead", "implausible_amplitude")
POWERLINE_CHOICES = (50.0, 60.0)


class QualityError(Exception):
    """A record rejected by a quality gate; ``reason`` is one of :data:`QC_REASONS`, ``detail`` says which lead."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def describe(self) -> str:
        """``"reason"`` or ``"reason: detail"`` as written to ``qc.csv``."""
        return str(self)


@dataclass(frozen=True)
class PreprocessSpec:
    """Every knob of the preprocessing chain; its :meth:`fingerprint` identifies a cache.

    Attributes:
        target_fs: output sampling rate in Hz.
        target_length: output samples per lead.
        crop: ``"start"`` (keep the first samples) or ``"center"``.
        min_length: records with fewer samples (after resampling) are rejected as too short; ``None`` means
            ``target_length`` (no padding). Shorter records that pass are zero-padded at the end.
        required_leads: leads a record must have, passing every per-lead check; ``None`` means the leads the
            cache is built for (or, with ``mask_bad_leads``, no lead in particular).
        interpolate_nan: linearly interpolate NaN gaps.
        derive_limb_leads: fill absent (or bad) III, aVR, aVL, aVF from sound I and II, so a 2- or 4-lead device
            record is usable for the limb leads (off by default).
        highpass_hz: high-pass cut-off in Hz; ``None`` or 0 skips it (0 is stored as ``None``).
        highpass_order: Butterworth order of the high-pass.
        powerline_hz: powerline frequency of the smoothing, 50 or 60 Hz; ``None`` or 0 skips it.
        zscore: per-lead z-score.
        flat_threshold_mv: a lead whose peak-to-peak range (mV) is at or below this is flat.
        resample_max_denominator: bound on the denominator of the rational rate ratio.
        zscore_eps: floor of the standard deviation in the z-score.
        max_nan_fraction: a lead with a larger fraction of NaN samples fails (``nan_fraction``); default 0.2.
        max_nan_gap_s: a lead with a longer run of NaN samples (seconds) fails (``nan_gap``); default 1.0 s.
        max_saturated_fraction: a lead with a larger fraction of its samples at its own minimum or maximum (a
            clipped amplifier rail) fails (``saturated_lead``); default 0.1 (real 10 s records stay below 0.03).
        min_amplitude_mv: a lead whose peak-to-peak range is below this (but above ``flat_threshold_mv``) has an
            implausible gain (``implausible_amplitude``); default 0.01 mV.
        max_amplitude_mv: a lead whose range between its 0.1th and 99.9th percentiles (single spikes ignored) is
            above this has an implausible gain (``implausible_amplitude``); default 20 mV.
        mask_bad_leads: mask a bad or missing lead of the cache instead of refusing the record (leads named in
            ``required_leads`` still refuse it); off by default (every cache lead is required, as before).
        min_good_leads: with ``mask_bad_leads``, the fewest usable cache leads a record must keep (``too_few_leads``).
    """

    target_fs: float = 500.0
    target_length: int = 5000
    crop: str = "start"
    min_length: int | None = None
    required_leads: tuple[str, ...] | None = None
    interpolate_nan: bool = True
    derive_limb_leads: bool = False
    highpass_hz: float | None = 0.5
    highpass_order: int = 5
    powerline_hz: float | None = 50.0
    zscore: bool = True
    flat_threshold_mv: float = 1e-3
    resample_max_denominator: int = 1000
    zscore_eps: float = 1e-8
    max_nan_fraction: float = 0.2
    max_nan_gap_s: float = 1.0
    max_saturated_fraction: float = 0.1
    min_amplitude_mv: float = 0.01
    max_amplitude_mv: float = 20.0
    mask_bad_leads: bool = False
    min_good_leads: int = 1

    def __post_init__(self):
        if self.crop not in ("start", "center"):
            raise ValueError(f"crop must be 'start' or 'center', got {self.crop!r}")
        if not self.target_fs > 0 or int(self.target_length) < 1:
            raise ValueError(
                f"target_fs must be > 0 and target_length >= 1, got {self.target_fs}, {self.target_length}"
            )
        if self.highpass_hz is not None and float(self.highpass_hz) == 0:
            object.__setattr__(self, "highpass_hz", None)
        if self.highpass_hz is not None and not 0 < float(self.highpass_hz) < self.target_fs / 2:
            raise ValueError(
                f"highpass_hz must be 0 (off) or between 0 and target_fs/2 = {self.target_fs / 2:g} Hz, "
                f"got {self.highpass_hz}"
            )
        if self.powerline_hz is not None and float(self.powerline_hz) == 0:
            object.__setattr__(self, "powerline_hz", None)
        if self.powerline_hz is not None and float(self.powerline_hz) not in POWERLINE_CHOICES:
            raise ValueError(f"powerline_hz must be 50, 60 or None/0 (off), got {self.powerline_hz}")
        for name in ("max_nan_fraction", "max_saturated_fraction"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"{name} must be a fraction in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.min_amplitude_mv < self.max_amplitude_mv or self.max_nan_gap_s < 0:
            raise ValueError(
                "need 0 <= min_amplitude_mv < max_amplitude_mv and max_nan_gap_s >= 0, got "
                f"{self.min_amplitude_mv}, {self.max_amplitude_mv}, {self.max_nan_gap_s}"
            )
        if int(self.min_good_leads) < 1:
            raise ValueError(f"min_good_leads must be >= 1, got {self.min_good_leads}")
        if self.required_leads is not None:
            object.__setattr__(self, "required_leads", resolve_leads(self.required_leads))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of the knobs (what :meth:`fingerprint` hashes)."""
        out = asdict(self)
        out["required_leads"] = list(self.required_leads) if self.required_leads is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessSpec":
        """Rebuild a spec from :meth:`to_dict` output."""
        data = dict(data)
        if data.get("required_leads") is not None:
            data["required_leads"] = tuple(data["required_leads"])
        return cls(**data)

    def fingerprint(self) -> str:
        """Short hex sha256 of the canonical JSON of the spec (16 characters)."""
        return short_hash({"preprocess_spec": self.to_dict()})

    @property
    def effective_min_length(self) -> int:
        """Minimum accepted length in samples."""
        return self.target_length if self.min_length is None else int(self.min_length)


def interpolate_nan(x: np.ndarray) -> np.ndarray:
    """Linearly interpolate NaN samples per lead; leading/trailing NaN take the nearest valid value.

    Args:
        x: (L, T) signals; a lead that is entirely NaN is returned unchanged.

    Returns:
        (L, T) array without NaN except in all-NaN leads.
    """
    nan = np.isnan(x)
    if not nan.any():
        return x
    x = np.array(x, dtype=np.float64, copy=True)
    grid = np.arange(x.shape[-1])
    for k in np.flatnonzero(nan.any(axis=-1)):
        good = ~nan[k]
        if good.any():
            x[k, ~good] = np.interp(grid[~good], grid[good], x[k, good])
    return x


def resample(x: np.ndarray, fs: float, target_fs: float, max_denominator: int = 1000) -> np.ndarray:
    """Resample (L, T) signals from ``fs`` to ``target_fs`` with a polyphase filter.

    The ratio ``target_fs / fs`` is approximated by a fraction up/down with ``down <= max_denominator``.

    Returns:
        (L, T') with T' = ceil(T * up / down).
    """
    if float(fs) == float(target_fs):
        return x
    ratio = Fraction(float(target_fs) / float(fs)).limit_denominator(max_denominator)
    return sps.resample_poly(x, ratio.numerator, ratio.denominator, axis=-1)


@lru_cache(maxsize=32)
def _butter_highpass(order: int, cutoff_hz: float, fs: float) -> np.ndarray:
    # designing the filter costs as much as applying it to a record: do it once per setting
    return sps.butter(order, cutoff_hz, btype="highpass", output="sos", fs=fs)


def highpass(x: np.ndarray, fs: float, cutoff_hz: float = 0.5, order: int = 5) -> np.ndarray:
    """Zero-phase Butterworth high-pass along time (``sosfiltfilt``), (L, T) -> (L, T)."""
    return sps.sosfiltfilt(_butter_highpass(int(order), float(cutoff_hz), float(fs)), x, axis=-1)


def powerline_smooth(x: np.ndarray, fs: float, powerline_hz: float = 50.0) -> np.ndarray:
    """Moving average of ``int(fs / powerline_hz)`` samples applied forwards and backwards, (L, T) -> (L, T).

    This follows neurokit2's ``signal_filter(method="powerline")``; below 100 Hz sampling it is skipped, as there.
    """
    if fs < 100:
        return x
    width = int(fs / powerline_hz)
    if width <= 1:
        return x
    # Same result as ``filtfilt(ones(width), [width], x, method="pad")`` (odd extension of 3 * width samples,
    # steady-state initial conditions), computed with window sums over all leads at once instead of per-lead lfilter.
    pad = 3 * width
    if x.shape[-1] <= pad:
        return sps.filtfilt(np.ones(width), [float(width)], x, axis=-1, method="pad")
    head = 2 * x[..., :1] - x[..., pad:0:-1]
    tail = 2 * x[..., -1:] - x[..., -2 : -pad - 2 : -1]
    y = _causal_mean(np.concatenate([head, x, tail], axis=-1), width)
    y = _causal_mean(y[..., ::-1], width)[..., ::-1]
    return np.ascontiguousarray(y[..., pad:-pad])


def _causal_mean(x: np.ndarray, width: int) -> np.ndarray:
    """Causal moving average with the past before the start held at the first sample (lfilter's steady state)."""
    csum = np.cumsum(x, axis=-1)
    out = np.empty_like(csum)
    out[..., width:] = csum[..., width:] - csum[..., :-width]
    # the first width samples also count (width - 1 - n) copies of x[0] from the steady-state past
    n = np.arange(min(width, x.shape[-1]))
    out[..., : n.size] = csum[..., : n.size] + (width - 1 - n) * x[..., :1]
    return out / width


def clean_ecg(x: np.ndarray, fs: float, spec: PreprocessSpec | None = None) -> np.ndarray:
    """High-pass then powerline smoothing as configured by ``spec`` (defaults: 0.5 Hz order 5, 50 Hz)."""
    spec = spec or PreprocessSpec()
    if spec.highpass_hz is not None:
        x = highpass(x, fs, spec.highpass_hz, spec.highpass_order)
    if spec.powerline_hz is not None:
        x = powerline_smooth(x, fs, spec.powerline_hz)
    return x


def crop_or_pad(x: np.ndarray, length: int, crop: str = "start") -> np.ndarray:
    """Crop (L, T) to ``length`` samples (``"start"`` or ``"center"`` window) or zero-pad at the end."""
    t = x.shape[-1]
    if t >= length:
        start = 0 if crop == "start" else (t - length) // 2
        return x[..., start : start + length]
    pad = np.zeros(x.shape[:-1] + (length - t,), dtype=x.dtype)
    return np.concatenate([x, pad], axis=-1)


def zscore(x: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Per-lead z-score along time, (L, T) -> (L, T); leads with zero spread become zeros."""
    mean = x.mean(axis=-1, keepdims=True)
    std = x.std(axis=-1, keepdims=True)
    return np.where(std > eps, (x - mean) / np.maximum(std, eps), 0.0)


class Preprocessed(NamedTuple):
    """Output of :func:`preprocess_record`.

    Attributes:
        signals: (12, target_length) float64 in canonical lead order; absent leads are zeros.
        mask: (12,) bool, True = lead present.
        lead_qc: lead name -> ``"reason: detail"`` for every recorded lead that failed a per-lead check and was
            masked (or replaced by a derived lead, then noted so).
        notes: other remarks on the record (inverted channels negated, unrecognised channel names).
    """

    signals: np.ndarray
    mask: np.ndarray
    lead_qc: dict[str, str] = {}
    notes: tuple[str, ...] = ()


def _longest_true_run(flags: np.ndarray) -> int:
    """Length of the longest run of True in a 1-D bool array."""
    if not flags.any():
        return 0
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    return int((np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).max())


def lead_quality(x: np.ndarray, fs: float, spec: PreprocessSpec | None = None) -> list[tuple[str, str] | None]:
    """Per-lead quality checks on raw physical signals.

    Checks, in order (the first failing one is reported): all NaN; NaN fraction above ``max_nan_fraction``; a NaN
    run longer than ``max_nan_gap_s``; flat (peak-to-peak <= ``flat_threshold_mv``); saturated (fraction of samples
    at the lead's own minimum or maximum above ``max_saturated_fraction``); implausible amplitude (peak-to-peak below
    ``min_amplitude_mv``, or 0.1-99.9 percentile range above ``max_amplitude_mv``).

    Args:
        x: (L, T) raw signals in mV (NaN = missing sample).
        fs: sampling rate in Hz (for the gap length).
        spec: thresholds; default :class:`PreprocessSpec`.

    Returns:
        For each of the L leads, ``None`` when it passes, else ``(reason, detail)`` with ``reason`` in
        :data:`LEAD_QC_REASONS` and a one-line ``detail`` with the measured value and the limit.
    """
    spec = spec or PreprocessSpec()
    out: list[tuple[str, str] | None] = []
    n = x.shape[-1]
    nan = np.isnan(x)
    for k in range(x.shape[0]):
        lead, bad = x[k], nan[k]
        n_nan = int(bad.sum())
        if n_nan == n:
            out.append(("all_nan_lead", ""))
            continue
        if n_nan:
            frac = n_nan / n
            if frac > spec.max_nan_fraction:
                out.append(("nan_fraction", f"{100 * frac:.2f}% NaN > {100 * spec.max_nan_fraction:g}%"))
                continue
            gap = _longest_true_run(bad) / fs
            if gap > spec.max_nan_gap_s:
                out.append(("nan_gap", f"{gap:.2f} s NaN gap > {spec.max_nan_gap_s:g} s"))
                continue
            lead = lead[~bad]
        hi, lo = float(lead.max()), float(lead.min())
        ptp = hi - lo
        if ptp <= spec.flat_threshold_mv:
            out.append(("flat_lead", ""))
            continue
        tol = 1e-6 * ptp
        rail = (np.count_nonzero(lead >= hi - tol) + np.count_nonzero(lead <= lo + tol)) / lead.size
        if rail > spec.max_saturated_fraction:
            out.append(
                (
                    "saturated_lead",
                    f"{100 * rail:.1f}% of samples at the min/max rail > {100 * spec.max_saturated_fraction:g}%",
                )
            )
            continue
        if ptp < spec.min_amplitude_mv:
            out.append(
                (
                    "implausible_amplitude",
                    f"{ptp:.3g} mV peak-to-peak < {spec.min_amplitude_mv:g} mV; check the gain and units",
                )
            )
            continue
        if ptp > spec.max_amplitude_mv:
            low, high = np.percentile(lead, [0.1, 99.9])
            if high - low > spec.max_amplitude_mv:
                out.append(
                    (
                        "implausible_amplitude",
                        f"{high - low:.3g} mV range > {spec.max_amplitude_mv:g} mV; check the gain and units",
                    )
                )
                continue
        out.append(None)
    return out


def _qc_text(name: str, problem: tuple[str, str]) -> str:
    reason, detail = problem
    return f"{reason}: {name} ({detail})" if detail else f"{reason}: {name}"


def preprocess_record(
    signals: np.ndarray,
    fs: float,
    channel_names: tuple[str, ...] | list[str],
    spec: PreprocessSpec | None = None,
    leads: str | tuple[str, ...] = "12L",
) -> Preprocessed:
    """Run the whole chain of the module docstring on one record.

    Args:
        signals: (C, T) raw physical signals of the record's channels.
        fs: sampling rate in Hz.
        channel_names: the C channel names (any spelling and order; mapped by name; ``-aVR`` is negated).
        spec: preprocessing knobs; default :class:`PreprocessSpec`.
        leads: leads the cache is built for; they are the required leads unless ``spec.required_leads`` is set or
            ``spec.mask_bad_leads`` is on.

    Returns:
        :class:`Preprocessed` with (12, target_length) signals, the (12,) presence mask and per-lead QC reasons.

    Raises:
        QualityError: the record fails a quality gate (reason in :data:`QC_REASONS`).
    """
    spec = spec or PreprocessSpec()
    if not (np.isfinite(fs) and fs > 0):
        raise QualityError("bad_sampling_rate", f"{fs} Hz is not a positive sampling rate; fix the record header")
    if not MIN_FS_HZ <= fs <= MAX_FS_HZ:  # e.g. 0.002 Hz would be upsampled 250,000x: memory, not an ECG
        raise QualityError(
            "bad_sampling_rate",
            f"{fs:g} Hz is outside the plausible {MIN_FS_HZ:g}-{MAX_FS_HZ:g} Hz of an ECG (a value in kHz?); fix the "
            "record header",
        )
    cache_leads = resolve_leads(leads)
    if spec.required_leads is not None:
        required = spec.required_leads
    else:
        required = () if spec.mask_bad_leads else cache_leads
    cmap = map_channels(list(channel_names))
    slots = cmap.slots
    notes = []
    inverted = [name for name, sign in cmap.signs.items() if sign < 0]
    if inverted:
        notes.append("inverted channels negated: " + ", ".join(inverted))
    if cmap.unrecognised:
        notes.append("ignored channels: " + ", ".join(cmap.unrecognised))
        logger.debug("channels %s name no standard lead; ignored", list(cmap.unrecognised))
    signals = np.asarray(signals)
    n_leads, n_samples = len(CANONICAL_LEADS), signals.shape[-1]
    raw = np.zeros((n_leads, n_samples), dtype=np.float64)
    mask = np.zeros(n_leads, dtype=bool)
    for k, name in enumerate(CANONICAL_LEADS):
        if name in slots:
            raw[k] = signals[slots[name]]
            if cmap.signs[name] < 0:
                raw[k] = -raw[k]
            mask[k] = True
    if n_samples == 0:
        raise QualityError("too_short", "record has no samples")
    present = np.flatnonzero(mask)
    problems: dict[int, tuple[str, str]] = {}
    for k, problem in zip(present, lead_quality(raw[present], fs, spec)):
        if problem is not None:
            problems[int(k)] = problem
    can_derive = spec.derive_limb_leads and all(mask[i] and i not in problems for i in (0, 1))
    derivable = {"III", "aVR", "aVL", "aVF"} if can_derive else set()
    for name in required:
        k = CANONICAL_LEADS.index(name)
        if name in derivable and (not mask[k] or k in problems):
            continue
        if not mask[k]:
            raise QualityError("missing_lead", name)
        if k in problems:
            reason, detail = problems[k]
            raise QualityError(reason, f"{name} ({detail})" if detail else name)
    lead_qc = {CANONICAL_LEADS[k]: _qc_text(CANONICAL_LEADS[k], p) for k, p in sorted(problems.items())}
    if problems:
        bad = np.zeros(n_leads, dtype=bool)
        bad[list(problems)] = True
        logger.debug("leads %s failed QC; masked", list(lead_qc.values()))
        mask = mask & ~bad
        raw[bad] = 0.0
    if np.isnan(raw).any():
        if not spec.interpolate_nan:
            raise QualityError("all_nan_lead", "NaN samples and interpolate_nan is off")
        raw = interpolate_nan(raw)
    if spec.derive_limb_leads:
        before = mask.copy()
        raw, mask = derive_limb_leads(raw, mask)
        for k in np.flatnonzero(mask & ~before):
            name = CANONICAL_LEADS[k]
            if name in lead_qc:
                lead_qc[name] += "; derived from I and II"
    if spec.mask_bad_leads:
        good = [name for name in cache_leads if mask[CANONICAL_LEADS.index(name)]]
        if len(good) < spec.min_good_leads:
            failed = "; ".join(lead_qc.values()) or "the others are missing"
            raise QualityError(
                "too_few_leads",
                f"{len(good)} of {len(cache_leads)} leads usable, need {spec.min_good_leads} ({failed})",
            )
    x = resample(raw, fs, spec.target_fs, spec.resample_max_denominator)
    if x.shape[-1] < spec.effective_min_length:
        raise QualityError("too_short", f"{x.shape[-1]} samples at {spec.target_fs:g} Hz < {spec.effective_min_length}")
    x = clean_ecg(x, spec.target_fs, spec)
    x = crop_or_pad(x, spec.target_length, spec.crop) if x.shape[-1] >= spec.target_length else x
    if spec.zscore:
        x = zscore(x, spec.zscore_eps)
    x = crop_or_pad(x, spec.target_length, spec.crop)
    x[~mask] = 0.0
    return Preprocessed(signals=x, mask=mask, lead_qc=lead_qc, notes=tuple(notes))
