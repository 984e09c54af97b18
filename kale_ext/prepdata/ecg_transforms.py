"""Transforms of one ECG record, vectorised over leads, and the quality gates that reject records.

All transforms take and return numpy arrays of shape (L, T) (leads, samples). The full chain, driven by
:class:`PreprocessSpec`, is :func:`preprocess_record`:

1. map channels to the 12 canonical lead slots by name (absent leads: mask False, zeros);
2. quality gates on the raw leads: a required lead missing, all-NaN or flat rejects the record; an optional lead that
   is all-NaN or flat is marked absent;
3. linear interpolation of NaN gaps (edges take the nearest valid value);
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

from kale_ext.loaddata.leads import CANONICAL_LEADS, derive_limb_leads, match_channels, resolve_leads
from kale_ext.utils.files import short_hash

logger = logging.getLogger(__name__)

QC_REASONS = ("unreadable", "missing_lead", "all_nan_lead", "flat_lead", "too_short")


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
        required_leads: leads a record must have (present, not all-NaN, not flat); ``None`` means the leads the
            cache is built for.
        interpolate_nan: linearly interpolate NaN gaps.
        derive_limb_leads: fill absent III, aVR, aVL, aVF from I and II (off by default).
        highpass_hz: high-pass cut-off in Hz; ``None`` skips it.
        highpass_order: Butterworth order of the high-pass.
        powerline_hz: powerline frequency of the smoothing; ``None`` skips it.
        zscore: per-lead z-score.
        flat_threshold_mv: a lead whose peak-to-peak range (mV) is at or below this is flat.
        resample_max_denominator: bound on the denominator of the rational rate ratio.
        zscore_eps: floor of the standard deviation in the z-score.
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

    def __post_init__(self):
        if self.crop not in ("start", "center"):
            raise ValueError(f"crop must be 'start' or 'center', got {self.crop!r}")
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
    """

    signals: np.ndarray
    mask: np.ndarray


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
        channel_names: the C channel names (any spelling and order; mapped by name).
        spec: preprocessing knobs; default :class:`PreprocessSpec`.
        leads: leads the cache is built for; they are the required leads unless ``spec.required_leads`` is set.

    Returns:
        :class:`Preprocessed` with (12, target_length) signals and the (12,) presence mask.

    Raises:
        QualityError: the record fails a quality gate (reason in :data:`QC_REASONS`).
    """
    spec = spec or PreprocessSpec()
    required = spec.required_leads if spec.required_leads is not None else resolve_leads(leads)
    slots = match_channels(list(channel_names))
    n_leads, n_samples = len(CANONICAL_LEADS), signals.shape[-1]
    raw = np.zeros((n_leads, n_samples), dtype=np.float64)
    mask = np.zeros(n_leads, dtype=bool)
    for k, name in enumerate(CANONICAL_LEADS):
        if name in slots:
            raw[k] = signals[slots[name]]
            mask[k] = True
    if n_samples == 0:
        raise QualityError("too_short", "record has no samples")
    present = np.flatnonzero(mask)
    all_nan = np.zeros(n_leads, dtype=bool)
    all_nan[present] = np.isnan(raw[present]).all(axis=-1)
    flat = np.zeros(n_leads, dtype=bool)
    for k in present:
        if not all_nan[k]:
            flat[k] = np.nanmax(raw[k]) - np.nanmin(raw[k]) <= spec.flat_threshold_mv
    can_derive = spec.derive_limb_leads and all(
        mask[i] and not all_nan[i] and not flat[i] for i in (0, 1)
    )  # derivation needs sound I and II
    derivable = {"III", "aVR", "aVL", "aVF"} if can_derive else set()
    for name in required:
        k = CANONICAL_LEADS.index(name)
        if name in derivable and (not mask[k] or all_nan[k] or flat[k]):
            continue
        if not mask[k]:
            raise QualityError("missing_lead", name)
        if all_nan[k]:
            raise QualityError("all_nan_lead", name)
        if flat[k]:
            raise QualityError("flat_lead", name)
    bad = all_nan | flat
    if bad.any():
        names = [CANONICAL_LEADS[k] for k in np.flatnonzero(bad)]
        logger.debug("optional leads %s all-NaN or flat; marked absent", names)
        mask = mask & ~bad
        raw[bad] = 0.0
    if np.isnan(raw).any():
        if not spec.interpolate_nan:
            raise QualityError("all_nan_lead", "NaN samples and interpolate_nan is off")
        raw = interpolate_nan(raw)
    if spec.derive_limb_leads:
        raw, mask = derive_limb_leads(raw, mask)
    x = resample(raw, fs, spec.target_fs, spec.resample_max_denominator)
    if x.shape[-1] < spec.effective_min_length:
        raise QualityError("too_short", f"{x.shape[-1]} samples at {spec.target_fs:g} Hz < {spec.effective_min_length}")
    x = clean_ecg(x, spec.target_fs, spec)
    x = crop_or_pad(x, spec.target_length, spec.crop) if x.shape[-1] >= spec.target_length else x
    if spec.zscore:
        x = zscore(x, spec.zscore_eps)
    x = crop_or_pad(x, spec.target_length, spec.crop)
    x[~mask] = 0.0
    return Preprocessed(signals=x, mask=mask)
