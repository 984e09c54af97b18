"""Manually marked wave boundaries (P, QRS, T onset / peak / offset per lead) and their sample masks.

Delineation databases mark, for every lead of a record, the onset, peak and offset of each P wave, QRS complex and T
wave (for example the Lobachevsky University Electrocardiography Database, Kalyakulina et al., IEEE Access 2020).
This module reads such marks from a tidy table, one row per marked wave::

    record_id, lead, wave, onset, peak, offset

with sample indices at the rate the marks were made (``source_fs``); ``onset`` / ``offset`` may be empty where the
annotator marked only the peak. Lead names are mapped to the canonical names by
:func:`kale_ext.loaddata.leads.canonical_lead_name` (``"avr"`` -> ``"aVR"``), wave names are case-insensitive and
``"N"`` (the WFDB symbol of a QRS peak) is read as ``"QRS"``.

:func:`wave_windows` turns one record's marks into boolean masks over the samples of a resampled signal: index ``i``
at ``source_fs`` maps to ``i * target_fs / source_fs``; a window covers ``floor(onset')`` to ``ceil(offset')``
inclusive, clipped to the signal. It also returns each lead's *annotated span* (first onset to last offset), because
annotators usually leave the first and last beats of a strip unmarked: comparisons of "inside a wave" with "outside"
should be made within that span.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from kale_ext.loaddata.leads import canonical_lead_name

logger = logging.getLogger(__name__)

WAVE_TYPES: tuple[str, ...] = ("P", "QRS", "T")
ANNOTATION_COLUMNS: tuple[str, ...] = ("record_id", "lead", "wave", "onset", "peak", "offset")
_WAVE_ALIASES = {"p": "P", "qrs": "QRS", "n": "QRS", "t": "T"}


class WaveWindows(NamedTuple):
    """Boolean sample masks of the marked waves of one record.

    Attributes:
        masks: (W, L, T) bool, True where a sample lies inside a marked wave of type ``waves[w]`` in lead ``l``.
        span: (L, T) bool, the annotated span of each lead (first marked onset to last marked offset); all False for
            a lead without marks.
        waves: the W wave types, in mask order.
        n_incomplete: marks skipped because their onset or offset was empty.
    """

    masks: np.ndarray
    span: np.ndarray
    waves: tuple[str, ...]
    n_incomplete: int


def _wave_name(value) -> str:
    name = _WAVE_ALIASES.get(str(value).strip().lower())
    if name is None:
        raise ValueError(f"unknown wave type {value!r}; use one of {WAVE_TYPES} (or 'N' for a QRS peak)")
    return name


def read_wave_annotations(source: str | Path | pd.DataFrame) -> pd.DataFrame:
    """Read and normalise a wave-annotation table.

    Args:
        source: CSV path or DataFrame with the columns of :data:`ANNOTATION_COLUMNS`.

    Returns:
        DataFrame with ``record_id`` (str), ``lead`` (canonical name), ``wave`` (one of :data:`WAVE_TYPES`) and
        ``onset``, ``peak``, ``offset`` as nullable integers (``pd.NA`` where empty), sorted by record, lead and peak.

    Raises:
        ValueError: a column is missing, or a lead or wave name is not recognised.
    """
    if isinstance(source, pd.DataFrame):
        table = source.copy()
    else:
        table = pd.read_csv(source, dtype={"record_id": str, "lead": str, "wave": str})
    missing = [c for c in ANNOTATION_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(
            f"wave annotation table lacks columns {missing}; it needs {list(ANNOTATION_COLUMNS)} (one row per marked "
            f"wave, sample indices), it has {list(table.columns)}"
        )
    table = table[list(ANNOTATION_COLUMNS)].copy()
    table["record_id"] = table["record_id"].astype(str).str.strip()
    leads = {name: canonical_lead_name(name) for name in table["lead"].astype(str).unique()}
    table["lead"] = table["lead"].astype(str).map(leads)
    waves = {name: _wave_name(name) for name in table["wave"].astype(str).unique()}
    table["wave"] = table["wave"].astype(str).map(waves)
    for col in ("onset", "peak", "offset"):
        values = pd.to_numeric(table[col], errors="coerce")
        if values.dropna().lt(0).any():
            raise ValueError(f"column {col!r} holds negative sample indices; marks must be sample numbers >= 0")
        table[col] = values.round().astype("Int64")
    if table["peak"].isna().any():
        raise ValueError("some marks have no peak; every row must give the peak sample of its wave")
    table = table.sort_values(["record_id", "lead", "peak"], kind="stable").reset_index(drop=True)
    logger.info("read %d wave marks of %d records", len(table), table["record_id"].nunique())
    return table


def wave_windows(
    table: pd.DataFrame,
    record_id: str,
    lead_names: Sequence[str],
    n_samples: int,
    source_fs: float,
    target_fs: float | None = None,
    waves: Sequence[str] = WAVE_TYPES,
) -> WaveWindows:
    """Sample masks of one record's marked waves at the rate of the signal they are compared with.

    Args:
        table: normalised table from :func:`read_wave_annotations`.
        record_id: the record (as written in the table's ``record_id`` column).
        lead_names: the L leads of the signal, in its channel order (canonical names).
        n_samples: T, samples of the signal.
        source_fs: sampling rate of the marks in Hz.
        target_fs: sampling rate of the signal in Hz (default ``source_fs``).
        waves: wave types to mask (default P, QRS, T).

    Returns:
        :class:`WaveWindows` with masks (W, L, T), the annotated span (L, T) and the count of incomplete marks
        (empty onset or offset; they are left out of the masks and of the span).
    """
    target_fs = float(source_fs if target_fs is None else target_fs)
    if source_fs <= 0 or target_fs <= 0 or n_samples < 1:
        raise ValueError("source_fs and target_fs must be positive and n_samples at least 1")
    scale = target_fs / float(source_fs)
    waves = tuple(_wave_name(w) for w in waves)
    lead_names = tuple(lead_names)
    masks = np.zeros((len(waves), len(lead_names), n_samples), dtype=bool)
    span = np.zeros((len(lead_names), n_samples), dtype=bool)
    rows = table[table["record_id"] == str(record_id)]
    if rows.empty:
        logger.warning("record %s has no wave marks; its masks are empty", record_id)
    complete = rows["onset"].notna() & rows["offset"].notna()
    n_incomplete = int((~complete).sum())
    rows = rows[complete]
    for j, lead in enumerate(lead_names):
        mine = rows[rows["lead"] == lead]
        if mine.empty:
            continue
        start = np.floor(mine["onset"].to_numpy(dtype=np.float64) * scale).astype(int)
        stop = np.ceil(mine["offset"].to_numpy(dtype=np.float64) * scale).astype(int)
        start, stop = np.clip(start, 0, n_samples - 1), np.clip(stop, 0, n_samples - 1)
        kinds = mine["wave"].to_numpy()
        for w, wave in enumerate(waves):
            for a, b in zip(start[kinds == wave], stop[kinds == wave]):
                masks[w, j, a : b + 1] = True
        span[j, start.min() : stop.max() + 1] = True
    return WaveWindows(masks, span, waves, n_incomplete)
