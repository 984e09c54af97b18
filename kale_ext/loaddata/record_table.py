"""Record tables: a root whose CSV table points at WFDB records stored at several sampling rates.

Some public archives ship one row per ECG in a CSV at the root of the release, with one file-name column per
sampling rate: PTB-XL (Wagner et al., Scientific Data 2020) has ``ptbxl_database.csv`` with ``filename_lr``
(``records100/...``, 100 Hz) and ``filename_hr`` (``records500/...``, 500 Hz), ``ecg_id`` for the record and
``patient_id`` for the person. Walking such a root as a plain header tree would list every ECG once per rate and
lose the subject ids, so grouped folds would leak people between folds.

This module finds such a table without knowing its name or its columns (:func:`find_record_table`):

- the table is a ``.csv`` file at the root (``record_list.csv`` excluded: that layout has its own reader) with at
  least one *path column*: a column whose first non-empty cell names an existing WFDB header under the root (with or
  without the ``.hea`` suffix);
- the sampling rate of each path column is read from the header of that first record;
- the record id column is the table's first column unless given (its cells must be unique and non-empty);
- the subject column is the first of :data:`SUBJECT_COLUMNS` present unless given; without one each record is its
  own subject.

:func:`list_table_records` then lists one :class:`~kale_ext.loaddata.wfdb_sources.RecordRef` per row from the path
column chosen for the wanted rate (:func:`choose_path_column`: the exact rate, else the lowest rate above it, else
the highest rate). Rows without a file in that column (an empty cell, or a header that is not on disk) are not
dropped silently: they are returned in ``TableListing.missing`` with a reason and logged with the column that would
serve them. Ids written as spreadsheet floats (``15709.0``) are read as integers (``15709``).

:func:`source_kind` and :func:`list_source_records` extend :func:`~kale_ext.loaddata.wfdb_sources.detect_source_kind`
and :func:`~kale_ext.loaddata.wfdb_sources.list_records` with this layout (a root with a record table is listed from
its table, not walked as a header tree); the cache builder and several-source lists use them.
"""

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from kale_ext.loaddata.wfdb_sources import (
    HEADER_SUFFIX,
    RECORD_LIST_NAME,
    RecordReadError,
    RecordRef,
    detect_source_kind,
    find_header,
    header_sampling_rate,
    list_records,
)

logger = logging.getLogger(__name__)

SUBJECT_COLUMNS = ("subject_id", "patient_id")


@dataclass(frozen=True)
class RecordTable:
    """A CSV at a source root whose path columns point at WFDB records.

    Attributes:
        root: the source root (record paths are relative to it).
        table: the CSV file.
        id_column: column holding the record ids.
        subject_column: column holding the subject ids (``""``: each record is its own subject).
        path_columns: path column -> sampling rate (Hz) of its records, in table order.
    """

    root: Path
    table: Path
    id_column: str
    subject_column: str
    path_columns: dict[str, float]


@dataclass
class TableListing:
    """The records of a record table at one sampling rate.

    Attributes:
        refs: one record per row that has a file in the chosen column, in table order.
        missing: ``(record_id, reason)`` for each row without a file in the chosen column.
        column: the chosen path column.
        fs: the sampling rate of the chosen column (Hz).
        table: the record table read.
    """

    refs: list[RecordRef]
    missing: list[tuple[str, str]] = field(default_factory=list)
    column: str = ""
    fs: float = 0.0
    table: RecordTable | None = None


def _text(value) -> str:
    """A cell as id text: empty for NaN, ``12`` for ``12.0``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = str(value).strip()
    if text.endswith(".0") and text[:-2].lstrip("+-").isdigit():
        return text[:-2]
    return text


def _header_of(root: Path, cell: str) -> Path | None:
    if not cell:
        return None
    rel = cell[: -len(HEADER_SUFFIX)] if cell.lower().endswith(HEADER_SUFFIX) else cell
    try:
        return find_header(root / rel)
    except (RecordReadError, OSError):
        return None


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _path_columns(root: Path, frame: pd.DataFrame) -> dict[str, float]:
    columns: dict[str, float] = {}
    for name in frame.columns:
        cells = frame[name].map(str.strip)
        first = next((c for c in cells if c), "")
        if not first or "/" not in first.replace("\\", "/") and not first.lower().endswith(HEADER_SUFFIX):
            continue  # a path column names files inside the root's folders
        header = _header_of(root, first)
        if header is None:
            continue
        try:
            columns[name] = header_sampling_rate(header)
        except RecordReadError:
            continue
    return columns


def find_record_table(
    root: str | Path,
    table: str | Path | None = None,
    id_column: str | None = None,
    subject_column: str | None = None,
) -> RecordTable | None:
    """Find the record table of a source root (see the module docstring for the rules).

    Args:
        root: the source folder.
        table: the CSV to use (a path, or a file name under ``root``); default: the first ``.csv`` at the root, in
            name order, that has a path column.
        id_column: record id column; default: the table's first column.
        subject_column: subject id column; default: the first of :data:`SUBJECT_COLUMNS` present, else none.

    Returns:
        The :class:`RecordTable`, or ``None`` when no CSV at the root points at WFDB records (and ``table`` is not
        given).

    Raises:
        ValueError: the given table has no path column, a given column is absent, or the record ids are empty or
            repeated (each message names the file and what to change).
    """
    root = Path(root)
    if table is not None:
        candidates = [Path(table) if Path(table).is_absolute() else root / table]
    else:
        candidates = sorted(p for p in root.glob("*.csv") if p.is_file() and p.name != RECORD_LIST_NAME)
    for path in candidates:
        frame = _read(path)
        columns = _path_columns(root, frame)
        if not columns:
            if table is not None:
                raise ValueError(
                    f"record table {path} has no column of record paths (relative to {root}, pointing at .hea files); "
                    "check the table and the root folder"
                )
            continue
        ids = id_column or str(frame.columns[0])
        subjects = subject_column if subject_column is not None else next(
            (c for c in SUBJECT_COLUMNS if c in frame.columns), ""
        )  # fmt: skip
        for role, name in (("record id", ids), ("subject", subjects)):
            if name and name not in frame.columns:
                raise ValueError(
                    f"record table {path} has no {role} column {name!r}; it has: {', '.join(frame.columns)}"
                )
        values = frame[ids].map(_text)
        if (values == "").any() or values.duplicated().any():
            bad = values[(values == "") | values.duplicated()].iloc[0]
            raise ValueError(
                f"record table {path}: column {ids!r} does not identify the records (id {bad!r} is empty or repeated); "
                "name the record id column"
            )
        return RecordTable(root, path, ids, subjects, columns)
    return None


def choose_path_column(table: RecordTable, fs: float | None) -> str:
    """The path column to read for a wanted sampling rate.

    Args:
        table: the record table.
        fs: wanted rate in Hz; ``None`` = the highest rate.

    Returns:
        The column with exactly ``fs``; else the lowest rate above ``fs`` (resampling down loses nothing the model
        sees); else the highest rate.
    """
    by_rate = sorted(table.path_columns.items(), key=lambda kv: kv[1])
    if fs is None:
        return by_rate[-1][0]
    exact = [name for name, rate in by_rate if math.isclose(rate, float(fs))]
    if exact:
        return exact[0]
    above = [name for name, rate in by_rate if rate > float(fs)]
    return above[0] if above else by_rate[-1][0]


def list_table_records(
    root: str | Path,
    fs: float | None = None,
    *,
    table: RecordTable | None = None,
    column: str | None = None,
) -> TableListing:
    """List the records of a record table at the rate that suits ``fs``.

    Args:
        root: the source folder.
        fs: the rate the records will be used at (Hz); picks the path column (:func:`choose_path_column`).
        table: the record table (default: :func:`find_record_table` of ``root``).
        column: the path column to use (overrides ``fs``).

    Returns:
        :class:`TableListing`; rows without a file in the chosen column are in ``missing`` with a reason.

    Raises:
        ValueError: no record table under ``root``, or ``column`` is not one of its path columns.
    """
    root = Path(root)
    table = table or find_record_table(root)
    if table is None:
        raise ValueError(f"no CSV at {root} has a column of record paths; use a header tree, record_list or manifest")
    if column is not None and column not in table.path_columns:
        raise ValueError(
            f"{column!r} is not a path column of {table.table}; use one of {', '.join(table.path_columns)}"
        )
    chosen = column or choose_path_column(table, fs)
    frame = _read(table.table)
    meta_columns = [c for c in frame.columns if c not in {table.id_column, table.subject_column}]
    refs: list[RecordRef] = []
    missing: list[tuple[str, str]] = []
    others = [c for c in table.path_columns if c != chosen]
    for row in frame.to_dict("records"):
        record_id = _text(row[table.id_column])
        subject = _text(row[table.subject_column]) if table.subject_column else ""
        cell = str(row[chosen]).strip()
        rel = cell[: -len(HEADER_SUFFIX)] if cell.lower().endswith(HEADER_SUFFIX) else cell
        if not rel:
            missing.append((record_id, f"no file in column {chosen!r} ({table.path_columns[chosen]:g} Hz)"))
            continue
        if _header_of(root, rel) is None:
            missing.append((record_id, f"header of {rel} (column {chosen!r}) is not under {root}"))
            continue
        meta = {c: str(row[c]) for c in meta_columns}
        refs.append(RecordRef(record_id, str(root / rel), subject or record_id, rel, meta))
    if missing:
        shown = ", ".join(rid for rid, _ in missing[:5]) + (" ..." if len(missing) > 5 else "")
        hint = f"; column(s) {', '.join(others)} may serve them at another sampling rate" if others else ""
        logger.warning(
            "%s: %d of %d records have no file at %g Hz (column %s) and are left out (ids %s)%s",
            table.table.name, len(missing), len(frame), table.path_columns[chosen], chosen, shown, hint,
        )  # fmt: skip
    return TableListing(refs, missing, chosen, table.path_columns[chosen], table)


SOURCE_KINDS = ("record_list", "record_table", "header_tree", "manifest")


def source_kind(source: str | Path) -> str:
    """The layout of a record source, record tables included (one of :data:`SOURCE_KINDS`).

    A root with ``record_list.csv`` is a ``record_list``; else a root with a record table (:func:`find_record_table`)
    is a ``record_table``; else :func:`~kale_ext.loaddata.wfdb_sources.detect_source_kind` decides.

    Args:
        source: a folder or a manifest CSV.

    Returns:
        The kind.

    Raises:
        FileNotFoundError, ValueError: as :func:`~kale_ext.loaddata.wfdb_sources.detect_source_kind`.
    """
    path = Path(source)
    if path.is_dir() and not (path / RECORD_LIST_NAME).is_file() and find_record_table(path) is not None:
        return "record_table"
    return detect_source_kind(path)


def list_source_records(source: str | Path, kind: str = "auto", fs: float | None = None) -> list[RecordRef]:
    """List the records of any source layout, a record table at the rate that suits ``fs``.

    Args:
        source: folder or manifest CSV.
        kind: ``"auto"`` (:func:`source_kind`) or one of :data:`SOURCE_KINDS`.
        fs: the sampling rate the records will be used at (Hz); only a record table uses it.

    Returns:
        The records (:func:`list_table_records` for a record table, else
        :func:`~kale_ext.loaddata.wfdb_sources.list_records`).
    """
    kind = source_kind(source) if kind == "auto" else kind
    if kind == "record_table":
        refs = list_table_records(source, fs).refs
        logger.info("found %d records in %s (record_table)", len(refs), source)
        return refs
    return list_records(source, kind)
