"""Record sources: find WFDB records under a path and read them in physical units.

Three layouts are recognised (``detect_source_kind``):

- ``"record_list"``: a root folder holding ``record_list.csv`` with a ``path`` column (record path relative to the
  root, without extension) and, when present, ``subject_id`` and ``study_id`` columns. This is the layout of the
  MIMIC-IV-ECG diagnostic ECG module (Gow et al., PhysioNet) and of :mod:`kale_ext.loaddata.synthetic`.
- ``"header_tree"``: a folder tree of WFDB headers (``*.hea`` with ``.dat`` or ``.mat`` signal files), as in PTB-XL
  or the PhysioNet/Computing in Cardiology Challenge 2021 data. Header comments such as ``# Age: 61`` or
  ``# Dx: 426783006`` are kept as metadata (``Age``, ``Dx``).
- ``"manifest"``: a CSV file with a ``path`` column (relative to the CSV's folder, or absolute) and optional
  ``record_id``, ``subject_id`` and label columns; every other column is kept as metadata.

Record ids: ``study_id`` when present, else the manifest's ``record_id``, else the record path relative to the
root without extension. A record without a subject id is its own subject (``subject_id = record_id``), so grouped
splits stay correct.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

RECORD_LIST_NAME = "record_list.csv"
SOURCE_KINDS = ("record_list", "header_tree", "manifest")
_UNIT_SCALE = {"mv": 1.0, "uv": 1e-3, "\u00b5v": 1e-3, "\u03bcv": 1e-3, "v": 1e3, "nu": 1.0, "": 1.0}


@dataclass
class RecordRef:
    """Where one record lives and who it belongs to.

    Attributes:
        record_id: unique id of the record within its source.
        path: record path without extension (what ``wfdb.rdrecord`` takes).
        subject_id: id of the person (equals ``record_id`` when the source gives none).
        source_path: the record path as written in the source (relative to the root when possible).
        metadata: extra fields (manifest columns, header comments) as strings.
    """

    record_id: str
    path: str
    subject_id: str
    source_path: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class RawRecord:
    """One record as read from disk.

    Attributes:
        signals: (C, T) float64 physical signals in mV (NaN where the file marks missing samples).
        fs: sampling rate in Hz.
        channel_names: the C channel names as written in the header.
        comments: header comments parsed as ``key: value`` pairs.
    """

    signals: np.ndarray
    fs: float
    channel_names: tuple[str, ...]
    comments: dict[str, str]


def parse_header_comments(comments: list[str]) -> dict[str, str]:
    """Parse WFDB header comments of the form ``Key: value`` into a dict (other comments are ignored)."""
    out: dict[str, str] = {}
    for line in comments or []:
        key, sep, value = str(line).lstrip("#").partition(":")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


def detect_source_kind(source: str | Path) -> str:
    """Guess the layout of a record source.

    Args:
        source: a folder (with ``record_list.csv``, or a tree of ``.hea`` files) or a manifest ``.csv`` file.

    Returns:
        One of :data:`SOURCE_KINDS`.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the layout is not recognised.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"record source {path} does not exist; pass a folder of WFDB records or a manifest CSV")
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "manifest"
        raise ValueError(f"{path} is a file but not a CSV manifest; pass a folder or a CSV with a 'path' column")
    if (path / RECORD_LIST_NAME).is_file():
        return "record_list"
    if next(path.rglob("*.hea"), None) is not None:
        return "header_tree"
    raise ValueError(
        f"no {RECORD_LIST_NAME} and no .hea headers under {path}; point to a WFDB folder, a root with "
        f"{RECORD_LIST_NAME}, or a manifest CSV with a 'path' column"
    )


def _strip_ext(path: str) -> str:
    for ext in (".hea", ".dat", ".mat"):
        if path.lower().endswith(ext):
            return path[: -len(ext)]
    return path


def _id_text(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _from_table(table: pd.DataFrame, root: Path, use_study: bool) -> list[RecordRef]:
    if "path" not in table.columns:
        raise ValueError(f"the table under {root} has no 'path' column; add one with record paths relative to {root}")
    refs = []
    skip = {"path", "record_id", "subject_id"} | ({"study_id"} if use_study else set())
    extra = [c for c in table.columns if c not in skip]
    for row in table.to_dict("records"):
        rel = _strip_ext(str(row["path"]))
        full = Path(rel) if Path(rel).is_absolute() else root / rel
        if use_study and _id_text(row.get("study_id")):
            record_id = _id_text(row["study_id"])
        elif _id_text(row.get("record_id")):
            record_id = _id_text(row["record_id"])
        else:
            record_id = rel
        subject = _id_text(row.get("subject_id")) or record_id
        meta = {c: _id_text(row[c]) for c in extra}
        refs.append(RecordRef(record_id, str(full), subject, rel, meta))
    return refs


def list_records(source: str | Path, kind: str = "auto") -> list[RecordRef]:
    """List the records of a source in a deterministic order.

    Args:
        source: folder or manifest CSV (see the module docstring).
        kind: ``"auto"`` (detect) or one of :data:`SOURCE_KINDS`.

    Returns:
        Records in source order (table order for ``record_list``/``manifest``, sorted paths for ``header_tree``).

    Raises:
        ValueError: unknown kind, missing ``path`` column or duplicated record ids.
    """
    path = Path(source)
    kind = detect_source_kind(path) if kind == "auto" else kind
    if kind == "record_list":
        table = pd.read_csv(path / RECORD_LIST_NAME, dtype=str, keep_default_na=False)
        refs = _from_table(table, path, use_study=True)
    elif kind == "manifest":
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        refs = _from_table(table, path.parent, use_study=False)
    elif kind == "header_tree":
        refs = []
        for hea in sorted(path.rglob("*.hea")):
            rel = hea.relative_to(path).with_suffix("").as_posix()
            refs.append(RecordRef(rel, str(hea.with_suffix("")), rel, rel, {}))
    else:
        raise ValueError(f"unknown source kind {kind!r}; use 'auto' or one of {SOURCE_KINDS}")
    ids = [r.record_id for r in refs]
    if len(set(ids)) != len(ids):
        dup = pd.Series(ids)[pd.Series(ids).duplicated()].iloc[0]
        raise ValueError(f"record id {dup!r} appears twice in {path}; give each record a unique id")
    logger.info("found %d records in %s (%s)", len(refs), path, kind)
    return refs


def read_record(path: str | Path) -> RawRecord:
    """Read one WFDB record (``.hea`` + ``.dat``/``.mat``) in physical units (mV).

    Args:
        path: record path, with or without the ``.hea`` extension.

    Returns:
        :class:`RawRecord`; signals are (C, T) float64 in mV, NaN where the file marks samples missing.

    Raises:
        Exception: whatever ``wfdb`` raises for an unreadable or corrupt record (callers turn it into a QC reason).
    """
    import wfdb  # optional heavy import kept local: the datasets do not need it

    record = wfdb.rdrecord(_strip_ext(str(path)), physical=True)
    signals = np.asarray(record.p_signal, dtype=np.float64).T
    units = record.units or [""] * signals.shape[0]
    scale = np.array([_UNIT_SCALE.get(str(u).strip().lower(), 1.0) for u in units])
    if np.any(scale != 1.0):
        signals = signals * scale[:, None]
    return RawRecord(
        signals=signals,
        fs=float(record.fs),
        channel_names=tuple(str(n) for n in record.sig_name),
        comments=parse_header_comments(record.comments),
    )
