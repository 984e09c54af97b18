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

Listing a header tree follows symbolic links to folders (each real folder is visited once, so a link loop ends) and
matches the header suffix in any case (``.hea``, ``.HEA``). Reading checks the header before ``wfdb`` sees it: an empty
or garbled header, and a header without a positive sampling frequency, raise :class:`RecordReadError` with a reason
(``wfdb`` itself would assume 250 Hz for a missing frequency and fail with an ``IndexError`` on an empty file).
"""

import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

RECORD_LIST_NAME = "record_list.csv"
SOURCE_KINDS = ("record_list", "header_tree", "manifest")
HEADER_SUFFIX = ".hea"
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


class RecordReadError(ValueError):
    """A record refused while reading; ``reason`` is ``"unreadable"`` or ``"bad_sampling_rate"``.

    Attributes:
        reason: short machine-readable reason (the first field of the QC reason).
        detail: one line saying what is wrong and what to do.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


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
    if next(iter_headers(path), None) is not None:
        return "header_tree"
    raise ValueError(
        f"no {RECORD_LIST_NAME} and no .hea headers under {path}; point to a WFDB folder, a root with "
        f"{RECORD_LIST_NAME}, or a manifest CSV with a 'path' column"
    )


def iter_headers(root: str | Path) -> Iterator[Path]:
    """Yield every WFDB header under ``root``, following folder symlinks once per real folder.

    The suffix is matched in any case (``.hea``, ``.HEA``). Each real folder (device and inode) is visited at most
    once, so a symlink loop or two links to the same folder do not repeat records. The order is sorted by path within
    each folder and folders are walked in sorted order, so it is deterministic.

    Args:
        root: folder to walk.

    Yields:
        Header paths as spelled under ``root`` (through the links).
    """
    seen: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        try:
            info = os.stat(folder)
        except OSError:
            dirs[:] = []
            continue
        key = (info.st_dev, info.st_ino)
        if key in seen:
            logger.warning("folder %s was already listed (symlink loop or duplicate link); skipped", folder)
            dirs[:] = []
            continue
        seen.add(key)
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(HEADER_SUFFIX):
                yield Path(folder) / name


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
        for hea in sorted(iter_headers(path), key=lambda p: p.relative_to(path).parts):  # as Path sorting
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


def find_header(path: str | Path) -> Path:
    """The header file of a record path, matching the ``.hea`` suffix in any case.

    Args:
        path: record path with or without the header suffix.

    Returns:
        Path of the existing header file.

    Raises:
        RecordReadError: no header file exists (reason ``unreadable``).
    """
    stem = Path(_strip_ext(str(path)))
    exact = stem.with_name(stem.name + HEADER_SUFFIX)
    if exact.is_file():
        return exact
    folder = stem.parent
    if folder.is_dir():
        for candidate in sorted(folder.iterdir()):
            if candidate.name.lower() == exact.name.lower() and candidate.is_file():
                return candidate
    raise RecordReadError("unreadable", f"no header {exact} (any case of {HEADER_SUFFIX}); check the record path")


_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def header_sampling_rate(header: str | Path) -> float:
    """Check a header's record line and return its sampling frequency.

    The record line is ``name[/segments] n_signals [fs[/counter_fs[(base)]] [n_samples ...]]``.

    Args:
        header: path of the ``.hea`` file.

    Returns:
        The sampling frequency in Hz (finite and > 0).

    Raises:
        RecordReadError: ``unreadable`` for an empty or garbled header, ``bad_sampling_rate`` when the frequency is
            missing, not a number, zero or negative.
    """
    header = Path(header)
    data = header.read_bytes()
    if not data.strip():
        raise RecordReadError("unreadable", f"header {header.name} is empty ({len(data)} bytes); re-export the record")
    if b"\x00" in data:
        raise RecordReadError("unreadable", f"header {header.name} holds binary data, not WFDB text; re-export it")
    lines = [ln.strip() for ln in data.decode("latin-1").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise RecordReadError("unreadable", f"header {header.name} has only comments; it needs a record line")
    tokens = lines[0].split()
    if len(tokens) < 2 or not tokens[1].isdigit():
        shown = " ".join(lines[0].split())[:60]
        raise RecordReadError(
            "unreadable",
            f"header {header.name}: record line {shown!r} is not 'name n_signals fs n_samples'; fix or re-export it",
        )
    if len(tokens) < 3:
        raise RecordReadError(
            "bad_sampling_rate",
            f"header {header.name} gives no sampling frequency (wfdb would assume 250 Hz); add it to the record "
            f"line: '{tokens[0]} {tokens[1]} FS N_SAMPLES'",
        )
    text = tokens[2].split("/")[0].split("(")[0]
    fs = float(text) if _NUMBER.match(text) else float("nan")
    if not math.isfinite(fs):
        raise RecordReadError(
            "bad_sampling_rate", f"header {header.name}: sampling frequency {tokens[2]!r} is not a number; fix it"
        )
    if fs <= 0:
        raise RecordReadError(
            "bad_sampling_rate", f"header {header.name}: sampling frequency {fs:g} Hz is not positive; fix the header"
        )
    return fs


def _rdrecord(header: Path):
    import wfdb  # optional heavy import kept local: the datasets do not need it

    stem = header.with_name(header.name[: -len(HEADER_SUFFIX)])
    if header.name.endswith(HEADER_SUFFIX):
        return wfdb.rdrecord(str(stem), physical=True)
    # wfdb only opens '<name>.hea': read a differently cased header through a link in a private folder; the
    # signal files keep their names, so they are linked beside it.
    with tempfile.TemporaryDirectory(prefix="kale_hea_") as tmp:
        link_stem = Path(tmp) / stem.name
        os.symlink(header.resolve(), str(link_stem) + HEADER_SUFFIX)
        for other in header.parent.iterdir():
            if other != header and other.name.startswith(stem.name + "."):
                os.symlink(other.resolve(), Path(tmp) / other.name)
        return wfdb.rdrecord(str(link_stem), physical=True)


def read_record(path: str | Path) -> RawRecord:
    """Read one WFDB record (``.hea`` + ``.dat``/``.mat``) in physical units (mV).

    Args:
        path: record path, with or without the header suffix (any case).

    Returns:
        :class:`RawRecord`; signals are (C, T) float64 in mV, NaN where the file marks samples missing.

    Raises:
        RecordReadError: missing, empty or garbled header, missing/zero/negative sampling frequency, no signals.
        Exception: whatever ``wfdb`` raises for a corrupt signal file (callers turn it into a QC reason).
    """
    header = find_header(path)
    header_sampling_rate(header)  # refuses a missing or non-positive frequency before wfdb guesses one
    record = _rdrecord(header)
    if record.p_signal is None or record.n_sig == 0:
        raise RecordReadError("unreadable", f"record {header.name} has no signals; it needs at least one ECG lead")
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
