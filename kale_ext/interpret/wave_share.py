"""Where attribution falls relative to annotated waves: share of |attribution| inside P, QRS and T windows.

For one record and lead, with a boolean window mask of a wave type (e.g. from
:func:`kale_ext.loaddata.wave_annotations.wave_windows`) and the lead's annotated span:

- *attribution share* = sum of ``|attr|`` over the window's samples / sum of ``|attr|`` over the span;
- *time share* = number of window samples / number of span samples, the attribution share an attribution spread
  evenly in time would get;
- *ratio* = attribution share / time share: above 1 means the model's attribution concentrates on that wave.

Both shares are computed within the annotated span so that unmarked beats at the strip's edges count neither as
inside nor as outside a wave. Summaries average the per-(record, lead) shares and report the ratio of the averages,
with a percentile bootstrap interval over records.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd


class WaveShares(NamedTuple):
    """Per-record, per-lead shares of attribution and of time inside each wave window.

    Attributes:
        attribution: (N, L, W) share of |attribution| inside each window (NaN where the span is empty or the
            attribution is zero on it).
        time: (N, L, W) share of the span's samples inside each window (NaN where the span is empty).
    """

    attribution: np.ndarray
    time: np.ndarray


def window_shares(attributions: np.ndarray, windows: np.ndarray, span: np.ndarray | None = None) -> WaveShares:
    """Shares of |attribution| and of time inside wave windows.

    Args:
        attributions: (N, L, T) or (L, T) signed attributions.
        windows: (N, W, L, T) or (W, L, T) bool window masks.
        span: (N, L, T) or (L, T) bool region the shares are taken within; None = the whole record.

    Returns:
        :class:`WaveShares` with (N, L, W) arrays (N = 1 for unbatched inputs).
    """
    a = np.abs(np.asarray(attributions, dtype=np.float64))
    w = np.asarray(windows, dtype=bool)
    if a.ndim == 2:
        a, w = a[None], w[None]
        span = None if span is None else np.asarray(span, dtype=bool)[None]
    if a.ndim != 3 or w.ndim != 4 or w.shape[0] != a.shape[0] or w.shape[2:] != a.shape[1:]:
        raise ValueError(
            f"attributions must be (N, L, T) and windows (N, W, L, T) with matching N, L, T; got {a.shape} and "
            f"{w.shape}"
        )
    s = np.ones(a.shape, dtype=bool) if span is None else np.asarray(span, dtype=bool)
    if s.shape != a.shape:
        raise ValueError(f"span must be (N, L, T) = {a.shape}, got {s.shape}")
    inside = w & s[:, None]  # (N, W, L, T)
    a_span = (a * s).sum(-1)  # (N, L)
    n_span = s.sum(-1).astype(np.float64)  # (N, L)
    a_in = (a[:, None] * inside).sum(-1)  # (N, W, L)
    n_in = inside.sum(-1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        attr_share = np.where(a_span[:, None] > 0, a_in / a_span[:, None], np.nan)
        time_share = np.where(n_span[:, None] > 0, n_in / n_span[:, None], np.nan)
    return WaveShares(attr_share.transpose(0, 2, 1), time_share.transpose(0, 2, 1))


def _ratio_of_means(attr: np.ndarray, time: np.ndarray) -> float:
    ok = ~(np.isnan(attr) | np.isnan(time))
    if not ok.any() or time[ok].mean() <= 0:
        return float("nan")
    return float(attr[ok].mean() / time[ok].mean())


def wave_share_table(
    shares: WaveShares,
    lead_names: Sequence[str],
    waves: Sequence[str],
    n_boot: int = 500,
    seed: int = 0,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Mean attribution and time shares per wave type, for every lead and pooled over leads.

    Args:
        shares: output of :func:`window_shares` (N records).
        lead_names: the L lead names.
        waves: the W wave names.
        n_boot: bootstrap resamples of records for the ratio's interval (0 = none).
        seed: seed of the bootstrap generator.
        alpha: 1 - confidence level.

    Returns:
        DataFrame with columns wave, lead (a lead name or ``"all"``), attribution_share, time_share, ratio,
        ratio_lo, ratio_hi, n (record-lead pairs used).
    """
    attr, time = np.asarray(shares.attribution), np.asarray(shares.time)
    if attr.shape[1:] != (len(lead_names), len(waves)):
        raise ValueError(f"shares are {attr.shape}; expected (N, {len(lead_names)} leads, {len(waves)} waves)")
    rng = np.random.default_rng(seed)
    n = attr.shape[0]
    picks = [rng.integers(0, n, n) for _ in range(n_boot)] if n > 0 else []
    rows = []
    for w, wave in enumerate(waves):
        for j, lead in [*enumerate(lead_names), (None, "all")]:
            sel = slice(None) if j is None else slice(j, j + 1)
            a, t = attr[:, sel, w], time[:, sel, w]  # (N, l)
            ok = ~(np.isnan(a) | np.isnan(t))
            ratio = _ratio_of_means(a, t)
            boots = [_ratio_of_means(a[p], t[p]) for p in picks]
            boots = np.asarray([b for b in boots if not np.isnan(b)])
            lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2]) if len(boots) else (np.nan, np.nan)
            rows.append(
                {
                    "wave": wave,
                    "lead": lead,
                    "attribution_share": float(a[ok].mean()) if ok.any() else float("nan"),
                    "time_share": float(t[ok].mean()) if ok.any() else float("nan"),
                    "ratio": ratio,
                    "ratio_lo": float(lo),
                    "ratio_hi": float(hi),
                    "n": int(ok.sum()),
                }
            )
    return pd.DataFrame(rows)
