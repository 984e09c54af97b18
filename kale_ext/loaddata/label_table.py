"""Label tables from clinical spreadsheets: tolerant reading, strict numbers, and a check of the id join.

Clinical tables arrive as CSV exports in UTF-8, UTF-16 (Excel "Unicode Text") or a Windows code page, with ``;``,
``,`` or tab separators, and with cells such as ``25 mmHg``, ``31,5``, ``n/a`` or ``9999``. :func:`read_label_table`
reads such a file without a ``UnicodeDecodeError`` (a UTF-16 byte-order mark or UTF-16 byte pattern, else UTF-8, then
cp1252, then Latin-1; an Excel workbook renamed ``.csv`` is refused by name), parses the requested columns strictly
and lists every cell it could not take as a number as a :class:`LabelProblem` with its row number and a message that
says what to fix. Nothing is guessed: a refused cell becomes NaN. Pressures in another unit are converted only when a
``<column>_unit`` column says so; values plausible only in kPa within a mmHg column can be refused (``suspect_unit``).

:func:`match_labels` then checks a label table against the record or subject ids of a cache before any training:
the match rate, the ids on either side without a partner, the class counts and the problems that make a run
pointless (no matching id, one class only, more than two classes, fewer ids per class than folds).

Column names, plausible ranges and thresholds are arguments: they belong to the experiment, not to this module.

Row numbers: ``row`` is the 1-based data row (the first row under the header is 1); messages also give the
spreadsheet row (header = row 1, so spreadsheet row = data row + 1). Blank lines count, as in a spreadsheet.
"""

import csv
import io
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

logger = logging.getLogger(__name__)

MISSING_CODES = ("na", "n/a", "n.a.", "nan", "none", "null", "missing", "-", "--", "?", ".")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_DECIMAL_COMMA = re.compile(r"^[+-]?\d+,\d+$")
_WITH_UNIT = re.compile(r"^([+-]?(?:\d+(?:[.,]\d*)?|[.,]\d+))\s*([^\d\s].*)$")
_INTEGER_FLOAT = re.compile(r"^([+-]?\d+)\.0*$")
_ENCODINGS = ("utf-8", "cp1252", "latin-1")


@dataclass
class LabelProblem:
    """One cell (or id) of a label table that could not be used as given.

    Attributes:
        row: 1-based data row (first row under the header = 1).
        column: column name.
        value: the cell as written.
        kind: ``unit_in_cell``, ``decimal_comma``, ``missing_code``, ``not_a_number``, ``out_of_range``,
            ``suspect_unit`` (plausible only in another unit), ``unknown_unit``, ``missing_id`` or ``duplicate_id``.
        message: one line saying where, what and what to do.
    """

    row: int
    column: str
    value: str
    kind: str
    message: str

    @property
    def spreadsheet_row(self) -> int:
        """Row number as a spreadsheet shows it (the header is row 1)."""
        return self.row + 1


@dataclass
class LabelTableReport:
    """A parsed label table and what was wrong with it.

    Attributes:
        path: the file read.
        table: one row per distinct id: the id column (str) then the requested columns (float, NaN where empty or
            refused). Later rows repeating an id are dropped (and reported).
        id_column: name of the id column.
        columns: the numeric columns parsed.
        encoding: the text encoding that decoded the file (``utf-8``, ``utf-16``, ``cp1252`` or ``latin-1``).
        delimiter: the field separator found in the header line.
        problems: every refused cell or id, in file order.
        n_rows: data rows read (blank lines excluded).
        n_missing: per column, cells left empty (not problems).
    """

    path: Path
    table: pd.DataFrame
    id_column: str
    columns: tuple[str, ...]
    encoding: str
    delimiter: str
    problems: list[LabelProblem] = field(default_factory=list)
    n_rows: int = 0
    n_missing: dict[str, int] = field(default_factory=dict)

    def summary(self, limit: int = 20) -> str:
        """Several lines: counts, then the first ``limit`` problem messages."""
        head = (
            f"{self.path}: {self.n_rows} rows, {len(self.table)} ids, {len(self.problems)} problems "
            f"({self.encoding}, delimiter {self.delimiter!r})"
        )
        lines = [head] + [p.message for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"... and {len(self.problems) - limit} more")
        return "\n".join(lines)


_WORKBOOK_MAGIC = {
    b"PK\x03\x04": "an Excel workbook (.xlsx, a zip archive)",
    b"\xd0\xcf\x11\xe0": "an Excel 97-2003 workbook (.xls)",
}


def _utf16_encoding(data: bytes) -> str | None:
    """``utf-16`` for a UTF-16 byte-order mark, ``utf-16-le``/``-be`` for BOM-less UTF-16 text, else None."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "utf-16"
    head = data[:200]
    if len(head) >= 4 and head[1::2].count(0) > 0.9 * len(head[1::2]) and head[0::2].count(0) == 0:
        return "utf-16-le"
    if len(head) >= 4 and head[0::2].count(0) > 0.9 * len(head[0::2]) and head[1::2].count(0) == 0:
        return "utf-16-be"
    return None


def _decode(data: bytes, path: Path | None = None) -> tuple[str, str]:
    for magic, what in _WORKBOOK_MAGIC.items():
        if data.startswith(magic):
            raise ValueError(f"label table {path} is {what}, not CSV text; open it in the spreadsheet program and save "
                             "it as CSV (UTF-8)")  # fmt: skip
    utf16 = _utf16_encoding(data)
    if utf16:
        try:
            return data.decode(utf16).lstrip("\ufeff"), utf16
        except UnicodeDecodeError:
            raise ValueError(f"label table {path} looks like UTF-16 text (Excel 'Unicode Text') but does not decode; "
                             "save it as CSV (UTF-8)") from None  # fmt: skip
    for encoding in _ENCODINGS:
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        return text.lstrip("\ufeff"), encoding
    raise AssertionError("latin-1 decodes every byte")  # pragma: no cover


def _delimiter(text: str) -> str:
    header = text.splitlines()[0] if text else ""
    counts = {d: header.count(d) for d in (",", ";", "\t")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def _normal_id(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    match = _INTEGER_FLOAT.match(text)
    return match.group(1) if match else text  # '12.0' from a spreadsheet export is the id '12'


def _where(row: int, column: str) -> str:
    return f"data row {row} (spreadsheet row {row + 1}), column {column!r}"


def _parse_cell(text: str, row: int, column: str, bounds) -> tuple[float, LabelProblem | None]:
    """Parse one cell strictly; returns (value or NaN, problem or None). Empty cells are NaN without a problem."""
    cell = text.strip()
    nan = float("nan")
    unit = f" {bounds[2]}" if bounds is not None and len(bounds) > 2 and bounds[2] else ""
    if not cell:
        return nan, None
    if cell.lower() in MISSING_CODES:
        msg = f"{_where(row, column)}: {cell!r} read as missing; leave the cell empty when no value was measured"
        return nan, LabelProblem(row, column, text, "missing_code", msg)
    if _DECIMAL_COMMA.match(cell):
        fixed = cell.replace(",", ".")
        msg = f"{_where(row, column)}: {cell!r} uses a decimal comma; write {fixed} (a point as decimal separator)"
        return nan, LabelProblem(row, column, text, "decimal_comma", msg)
    if not _NUMBER.match(cell):
        with_unit = _WITH_UNIT.match(cell)
        if with_unit:
            hint = f"the column is in{unit}" if unit else "give the unit in the column name or documentation"
            msg = (
                f"{_where(row, column)}: {cell!r} holds a unit or text after the number; write the number only ({hint})"
            )
            return nan, LabelProblem(row, column, text, "unit_in_cell", msg)
        msg = f"{_where(row, column)}: {cell!r} is not a number; correct it or leave the cell empty"
        return nan, LabelProblem(row, column, text, "not_a_number", msg)
    value = float(cell)
    if bounds is not None:
        low, high = float(bounds[0]), float(bounds[1])
        if not low <= value <= high:
            msg = (
                f"{_where(row, column)}: {cell} is outside the plausible range {low:g}-{high:g}{unit}; check the unit "
                "(another unit than the column's?) or a missing-value code, then correct it or leave the cell empty"
            )
            return nan, LabelProblem(row, column, text, "out_of_range", msg)
    return value, None


# Factors to mmHg of the pressure units a haemodynamics table may mix (a merged table with some rows in kPa).
PRESSURE_UNITS = {"mmhg": 1.0, "kpa": 7.50062, "cmh2o": 0.735559}
SUSPECT_FRACTION = 1 / 3  # an in-range value below this share of the column median is checked as another unit


def _to_range_unit(cell: str, unit: str, row: int, column: str, bounds) -> tuple[str, LabelProblem | None]:
    """Convert a cell written in the row's unit (a ``<column>_unit`` cell) to the unit of the column's range."""
    target = str(bounds[2]).strip().lower() if bounds is not None and len(bounds) > 2 and bounds[2] else ""
    given = unit.strip().lower().replace(" ", "")
    if not cell.strip() or not given or given == target or target not in PRESSURE_UNITS:
        return cell, None
    if given not in PRESSURE_UNITS:
        msg = (f"{_where(row, column + '_unit')}: unit {unit!r} is not known; use one of "
               f"{', '.join(PRESSURE_UNITS)} (or leave it empty for {bounds[2]})")  # fmt: skip
        return "", LabelProblem(row, f"{column}_unit", unit, "unknown_unit", msg)
    try:
        value = float(cell.strip())
    except ValueError:
        return cell, None  # _parse_cell reports it
    return repr(value * PRESSURE_UNITS[given] / PRESSURE_UNITS[target]), None


def _flag_other_unit(records: list[dict], rows: list[int], column: str, bounds) -> list[LabelProblem]:
    """Flag in-range values that are plausible only in another pressure unit (kPa rows in a mmHg column).

    Only for a column whose range names that other unit (``(low, high, "mmHg", "kPa")``). A value ``v`` is flagged
    when it is below :data:`SUSPECT_FRACTION` of the column's median and ``v`` read in the other unit also lies in the
    plausible range: e.g. mPAP 6.5 among values around 30 mmHg is 48.8 mmHg if the row is in kPa. The cell is left
    out (NaN) and listed as ``suspect_unit``; a ``<column>_unit`` column settles it.
    """
    unit = str(bounds[2]).strip().lower() if bounds is not None and len(bounds) > 2 and bounds[2] else ""
    other = str(bounds[3]).strip().lower() if bounds is not None and len(bounds) > 3 and bounds[3] else ""
    if unit not in PRESSURE_UNITS or other not in PRESSURE_UNITS or other == unit:
        return []
    factor = PRESSURE_UNITS[other] / PRESSURE_UNITS[unit]
    values = pd.Series([r[column] for r in records], dtype=float)
    if values.notna().sum() < 5:
        return []
    median, low, high = float(values.median()), float(bounds[0]), float(bounds[1])
    out = []
    for i, value in values.items():
        converted = value * factor
        if value < SUSPECT_FRACTION * median and low <= converted <= high:
            msg = (f"{_where(rows[i], column)}: {value:g} is far below the column's median {median:g} {bounds[2]} and "
                   f"would be {converted:.1f} {bounds[2]} if the row is in {bounds[3]}; convert it (x {factor:.6g}) or "
                   f"add a {column}_unit column ({bounds[2]}/{bounds[3]}); the cell is left out")  # fmt: skip
            out.append(LabelProblem(rows[i], column, f"{value:g}", "suspect_unit", msg))
            records[i][column] = float("nan")
    return out


def read_label_table(
    path: str | Path,
    id_column: str,
    columns: Sequence[str],
    ranges: Mapping[str, tuple] | None = None,
) -> LabelTableReport:
    """Read a CSV label table tolerantly and parse its numeric columns strictly.

    Args:
        path: CSV file (UTF-8 with or without BOM, cp1252 or Latin-1; ``,``, ``;`` or tab separated, taken from the
            header line).
        id_column: column holding the record or subject ids (kept as text; ``12.0`` is read as ``12``).
        columns: columns to parse as numbers.
        ranges: per column ``(low, high, unit)``: values outside ``[low, high]`` are refused as ``out_of_range``
            and the unit is named in the messages (``unit`` may be omitted: ``(low, high)``). For a pressure unit
            (:data:`PRESSURE_UNITS`), a ``<column>_unit`` column (e.g. ``mPAP_unit`` with ``mmHg``/``kPa``) is
            honoured row by row (values converted to the range's unit); without one, a fourth element names a unit
            to watch for (``(5, 100, "mmHg", "kPa")``): in-range values plausible only in that unit are refused as
            ``suspect_unit`` (see :func:`_flag_other_unit`).

    Returns:
        :class:`LabelTableReport`; its ``problems`` list every refused cell with its row and a fix.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a column is missing (the message lists the columns present) or a line has more fields than the
            header (the message names the line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label table {path} does not exist; give the path of the CSV file")
    ranges = dict(ranges or {})
    text, encoding = _decode(path.read_bytes(), path)
    delimiter = _delimiter(text)
    rows = list(csv.reader(io.StringIO(text), delimiter=delimiter))
    if not rows:
        raise ValueError(f"label table {path} is empty; it needs a header line and data rows")
    header = [h.strip() for h in rows[0]]
    for name in [id_column, *columns]:
        if name not in header:
            raise ValueError(f"label table {path} has no column {name!r}; it has: {', '.join(header)}")
    where = {name: header.index(name) for name in header}
    lowered = {h.lower(): h for h in header}
    unit_columns = {
        name: lowered[f"{name.lower()}{sep}unit"]
        for name in columns
        for sep in ("_", " ")
        if f"{name.lower()}{sep}unit" in lowered
    }
    row_numbers: list[int] = []
    problems: list[LabelProblem] = []
    records: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    missing = dict.fromkeys(columns, 0)
    n_rows = 0
    for number, fields in enumerate(rows[1:], start=1):
        if not any(f.strip() for f in fields):
            continue  # a blank line keeps its number but holds nothing
        if len(fields) > len(header):
            raise ValueError(
                f"label table {path}: line {number + 1} has {len(fields)} fields but the header has {len(header)}; "
                f"an unquoted {delimiter!r} inside a cell (a decimal comma?): quote it or save with another separator"
            )
        n_rows += 1
        fields = fields + [""] * (len(header) - len(fields))
        raw_id = fields[where[id_column]]
        rid = _normal_id(raw_id)
        if not rid:
            msg = f"{_where(number, id_column)}: empty id; the row is ignored, fill in the id to use it"
            problems.append(LabelProblem(number, id_column, raw_id, "missing_id", msg))
            continue
        if rid in seen:
            msg = (
                f"{_where(number, id_column)}: id {rid!r} already appears in data row {seen[rid]}; this row is "
                "ignored, keep one row per id"
            )
            problems.append(LabelProblem(number, id_column, raw_id, "duplicate_id", msg))
            continue
        seen[rid] = number
        record: dict[str, Any] = {id_column: rid}
        for name in columns:
            cell = fields[where[name]]
            bounds = ranges.get(name)
            if name in unit_columns:
                cell, problem = _to_range_unit(cell, fields[where[unit_columns[name]]], number, name, bounds)
                if problem is not None:
                    problems.append(problem)
            value, problem = _parse_cell(cell, number, name, bounds)
            if problem is not None:
                problems.append(problem)
            elif not cell.strip():
                missing[name] += 1
            record[name] = value
        records.append(record)
        row_numbers.append(number)
    for name in columns:
        if name not in unit_columns:
            problems += _flag_other_unit(records, row_numbers, name, ranges.get(name))
    problems.sort(key=lambda p: p.row)
    table = pd.DataFrame(records, columns=[id_column, *columns])
    table[id_column] = table[id_column].astype(str)
    for name in columns:
        table[name] = table[name].astype(float)
    report = LabelTableReport(
        path=path,
        table=table,
        id_column=id_column,
        columns=tuple(columns),
        encoding=encoding,
        delimiter=delimiter,
        problems=problems,
        n_rows=n_rows,
        n_missing=missing,
    )
    if problems:
        logger.warning("%s", report.summary())
    return report


@dataclass
class LabelMatch:
    """How a label table joins the ids of a data set.

    Attributes:
        n_ids: distinct ids given (records or subjects).
        n_labelled: distinct ids of the table with a label.
        n_matched: ids present on both sides.
        match_rate: ``n_matched / n_ids`` (0 without ids).
        unmatched_ids: given ids without a label, sorted.
        labels_without_id: labelled ids of the table that match no given id, sorted.
        class_counts: label value -> matched ids.
        blocking: problems that make training pointless, each saying what to do; empty when fine.
    """

    n_ids: int
    n_labelled: int
    n_matched: int
    match_rate: float
    unmatched_ids: list[str]
    labels_without_id: list[str]
    class_counts: dict[Any, int]
    blocking: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing blocks training."""
        return not self.blocking

    def raise_if_blocking(self) -> None:
        """Raise ``ValueError`` with every blocking problem (one per line) when there is any."""
        if self.blocking:
            raise ValueError("the labels cannot be used:\n- " + "\n- ".join(self.blocking))


def _label_value(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            return text
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _sample(ids: Iterable[str], k: int = 3) -> str:
    return ", ".join(repr(i) for i in sorted(ids)[:k])


def match_labels(
    table: LabelTableReport | pd.DataFrame,
    ids: Iterable[str],
    n_splits: int,
    *,
    id_column: str | None = None,
    label_column: str = "label",
) -> LabelMatch:
    """Check a label table against the record or subject ids of a data set before training.

    Args:
        table: a :class:`LabelTableReport` or a DataFrame with the id column and ``label_column``.
        ids: the record ids or subject ids of the data set (same kind as the table's id column; pass subject ids
            for the per-class check of grouped folds). Repeats are counted once.
        n_splits: number of cross-validation folds; each class needs at least this many matched ids.
        id_column: id column of a DataFrame (default: ``subject_id``, or the report's id column).
        label_column: column holding the class labels (rows with a missing label are not labelled).

    Returns:
        :class:`LabelMatch`; ``blocking`` lists no matching id, one class only, more than two classes, fewer
        matched ids per class than folds, and ids with conflicting labels.

    Raises:
        ValueError: the id or label column is absent (the message lists the columns present).
    """
    frame = table.table if isinstance(table, LabelTableReport) else table
    if id_column is None:
        id_column = table.id_column if isinstance(table, LabelTableReport) else "subject_id"
    for name in (id_column, label_column):
        if name not in frame.columns:
            raise ValueError(
                f"the label table has no column {name!r}; it has: {', '.join(map(str, frame.columns))}. Derive a "
                "label column first or pass id_column/label_column"
            )
    given = {_normal_id(i) for i in ids} - {""}
    labelled = frame[[id_column, label_column]].dropna()
    pairs = [(_normal_id(i), _label_value(v)) for i, v in labelled.itertuples(index=False)]
    labels: dict[str, Any] = {}
    conflicts: list[str] = []
    for rid, value in pairs:
        if rid in labels and labels[rid] != value and rid not in conflicts:
            conflicts.append(rid)
        labels.setdefault(rid, value)
    matched = sorted(given & set(labels))
    counts: dict[Any, int] = {}
    for rid in matched:
        counts[labels[rid]] = counts.get(labels[rid], 0) + 1
    counts = dict(sorted(counts.items(), key=lambda kv: str(kv[0])))
    blocking: list[str] = []
    if not given:
        blocking.append("no record or subject ids were given; build the cache first and pass its ids")
    elif not labels:
        blocking.append(f"the label table has no usable label in column {label_column!r}; fill it or derive it")
    elif not matched:
        blocking.append(
            f"no id of the label table matches the {len(given)} ids (table ids look like {_sample(labels)}; data "
            f"ids like {_sample(given)}); join on the right id column (subject or record id) and check the "
            "spelling (leading zeros, prefixes)"
        )
    for rid in conflicts:
        blocking.append(f"id {rid!r} has conflicting labels in the table; keep one label per id")
    if matched:
        if len(counts) == 1:
            (only,) = counts
            blocking.append(
                f"only class {only} among the {len(matched)} matched ids; a classifier needs two classes: check the "
                "label rule (threshold) and the id join"
            )
        elif len(counts) > 2:
            shown = ", ".join(map(str, counts))
            blocking.append(f"{len(counts)} classes ({shown}) among the matched ids; the head is binary: map to 0/1")
        for value, count in counts.items():
            if len(counts) > 1 and count < n_splits:
                noun = "id" if count == 1 else "ids"
                blocking.append(
                    f"class {value} has {count} matched {noun}, fewer than the {n_splits} folds; use at most "
                    f"{max(count, 1)} folds or add labelled subjects"
                )
    rate = len(matched) / len(given) if given else 0.0
    result = LabelMatch(
        n_ids=len(given),
        n_labelled=len(labels),
        n_matched=len(matched),
        match_rate=rate,
        unmatched_ids=sorted(given - set(labels)),
        labels_without_id=sorted(set(labels) - given),
        class_counts=counts,
        blocking=blocking,
    )
    logger.info(
        "labels: %d of %d ids matched (%.0f%%), classes %s, %d labels without data",
        result.n_matched,
        result.n_ids,
        100 * rate,
        counts,
        len(result.labels_without_id),
    )
    return result
