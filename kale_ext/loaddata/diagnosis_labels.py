"""Binary labels from diagnosis tables: coded statements with likelihoods, categorical and multi-valued text cells.

Three kinds of cells are turned into 0/1 labels (NaN = the record is not part of the task):

- **Statement dicts** (:func:`statement_labels`): a cell holding a dict ``{statement: likelihood}`` as Python or JSON
  text, e.g. PTB-XL's ``scp_codes`` (``{'NORM': 100.0, 'SR': 0.0}``; Wagner et al., Scientific Data 2020). With a
  *statement table* (:func:`read_statement_table`; PTB-XL's ``scp_statements.csv`` whose ``diagnostic_class`` maps
  each diagnostic statement to one of the superclasses NORM, MI, STTC, CD, HYP) a target may be a superclass or a
  single statement:

  - superclass ``C``: 1 when a statement of class ``C`` has likelihood >= ``likelihood_min``, 0 when the record has
    another classed statement (above the threshold) but none of ``C``; a record with no classed statement at all is
    left out (NaN), as in the standard superdiagnostic benchmark tasks.
  - statement ``S`` (any statement of the table, diagnostic or not, e.g. LVH, IRBBB, RVH, RAO/RAE): 1 when ``S`` is
    listed with likelihood >= ``likelihood_min``, else 0 (every record takes part).

  A statement listed below the threshold counts as absent (``uncertain="negative"``) or leaves the record out
  (``uncertain="exclude"``). Likelihood 0 in PTB-XL means "no likelihood given" (rhythm and form statements are
  always 0), so the default threshold 0 takes every listed statement.
- **Categorical cells** (:func:`value_labels` with one value per cell), e.g. PTB-XL's ``heart_axis``: a
  :class:`ValueRule` names the positive values (a group such as ``RAD, ARAD, AXR``), optionally the negative ones
  (default: every other value); empty cells are left out or negative (``empty``).
- **Multi-valued text cells** (:func:`split_values`): several values in one cell separated by new lines, as in
  LUDB's ``ludb.csv`` (Kalyakulina et al., IEEE Access 2020). Values are compared case-insensitively without a final
  full stop, and a ``<column name>: `` prefix repeated inside the cell is dropped (``Electric axis of the heart:
  normal`` is ``normal``). A record is positive when any of its values is positive; with explicit negative values it
  is negative when one of its values is negative and none is positive, and left out otherwise.

Which columns, statements and groups make a task belongs to the experiment (configs, the example), not here.
"""

import ast
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

UNCERTAIN_MODES = ("negative", "exclude")
EMPTY_MODES = ("exclude", "negative")


def parse_statement_dict(cell) -> dict[str, float]:
    """Parse a ``{statement: likelihood}`` cell written as Python or JSON text.

    Args:
        cell: the cell (``"{'NORM': 100.0, 'SR': 0.0}"``); empty, NaN or ``{}`` give an empty dict.

    Returns:
        Statement -> likelihood (float; a missing or non-numeric likelihood is 0).

    Raises:
        ValueError: the text is not a dict literal (the message shows the cell).
    """
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        return {}
    if isinstance(cell, Mapping):
        parsed = cell
    else:
        text = str(cell).strip()
        if not text:
            return {}
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = None
        if not isinstance(parsed, Mapping):
            raise ValueError(f"statement cell {text[:60]!r} is not a dict of statement -> likelihood; fix the table")
    out = {}
    for key, value in parsed.items():
        try:
            out[str(key).strip()] = float(value)
        except (TypeError, ValueError):
            out[str(key).strip()] = 0.0
    return out


@dataclass(frozen=True)
class StatementTable:
    """Known statements and the class (superclass) of each classed one.

    Attributes:
        statements: every statement code of the table, in table order.
        classes: statement -> class for the statements that have one (e.g. ``diagnostic_class``).
    """

    statements: tuple[str, ...]
    classes: dict[str, str]

    @property
    def class_names(self) -> tuple[str, ...]:
        """The distinct classes, sorted."""
        return tuple(sorted(set(self.classes.values())))


def read_statement_table(
    path: str | Path, class_column: str = "diagnostic_class", code_column: str | None = None
) -> StatementTable:
    """Read a statement table (one row per statement code).

    Args:
        path: CSV file.
        class_column: column mapping a statement to its class (empty cells: no class).
        code_column: column of the statement codes; default: the first column (PTB-XL's is unnamed).

    Returns:
        :class:`StatementTable`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``class_column`` is absent (the message lists the columns).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"statement table {path} does not exist; give the CSV that lists the statement codes")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    code = code_column or frame.columns[0]
    for name in (code, class_column):
        if name not in frame.columns:
            raise ValueError(f"statement table {path} has no column {name!r}; it has: {', '.join(frame.columns)}")
    codes = frame[code].str.strip()
    classes = {c: k.strip() for c, k in zip(codes, frame[class_column]) if c and k.strip()}
    return StatementTable(tuple(c for c in codes if c), classes)


def target_kind(target: str, statements: StatementTable | None = None, values: Iterable[str] = ()) -> str:
    """What a label target names: ``"superclass"``, ``"statement"`` or ``"value"``.

    Args:
        target: the target name (case-sensitive for classes and statements, as the tables write them).
        statements: the statement table (``None``: no classes nor statements).
        values: names usable with :func:`value_labels` (values or group names of a categorical column).

    Returns:
        The kind, checked in that order (a class name wins over a statement of the same name).

    Raises:
        ValueError: the target is none of them; the message lists what is available.
    """
    if statements is not None and target in statements.class_names:
        return "superclass"
    if statements is not None and target in statements.statements:
        return "statement"
    values = list(values)
    if target in values or target.lower() in {v.lower() for v in values}:
        return "value"
    parts = []
    if statements is not None:
        parts.append(f"classes {', '.join(statements.class_names)}")
        parts.append(f"statements such as {', '.join(statements.statements[:8])} ({len(statements.statements)} in all)")
    if values:
        parts.append(f"values {', '.join(sorted(set(values))[:12])}")
    raise ValueError(f"label target {target!r} is unknown; use one of: {'; '.join(parts) or 'nothing is configured'}")


def statement_labels(
    cells: Iterable,
    target: str,
    statements: StatementTable,
    likelihood_min: float = 0.0,
    uncertain: str = "negative",
) -> np.ndarray:
    """0/1/NaN labels of a superclass or a statement from statement-dict cells (rules in the module docstring).

    Args:
        cells: one statement-dict cell per record (:func:`parse_statement_dict`).
        target: a class of ``statements`` or one of its statements.
        statements: the statement table.
        likelihood_min: a statement counts when its likelihood is >= this (0 = every listed statement).
        uncertain: ``"negative"`` or ``"exclude"``: what a target statement listed below the threshold makes of the
            record.

    Returns:
        (N,) float array: 1, 0 or NaN (not part of the task).

    Raises:
        ValueError: unknown target or ``uncertain`` mode, or a cell that is not a dict.
    """
    if uncertain not in UNCERTAIN_MODES:
        raise ValueError(f"uncertain = {uncertain!r} is not accepted; use one of {UNCERTAIN_MODES}")
    kind = target_kind(target, statements)
    out = []
    for cell in cells:
        codes = parse_statement_dict(cell)
        kept = {c for c, p in codes.items() if p >= likelihood_min}
        if kind == "superclass":
            hits = {c for c in codes if statements.classes.get(c) == target}
            classed = {c for c in kept if c in statements.classes}
            if hits & kept:
                out.append(1.0)
            elif hits and uncertain == "exclude":
                out.append(math.nan)
            else:
                out.append(0.0 if classed else math.nan)
        else:
            if target in kept:
                out.append(1.0)
            elif target in codes and uncertain == "exclude":
                out.append(math.nan)
            else:
                out.append(0.0)
    return np.asarray(out, dtype=np.float64)


def _normal_value(text: str, column: str = "") -> str:
    value = str(text).strip().rstrip(".").strip()
    if column and value.lower().startswith(column.lower() + ":"):
        value = value[len(column) + 1 :].strip()
    return value.lower()


def split_values(cell, column: str = "", separator: str = "\n") -> list[str]:
    """The values of a (multi-valued) text cell, normalised for comparison.

    Args:
        cell: the cell text (NaN or empty: no value).
        column: the column's name; a ``<column>:`` prefix inside a value is dropped.
        separator: what separates values within a cell (new line by default).

    Returns:
        Lower-case values without surrounding spaces or a final full stop, empty ones dropped.
    """
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        return []
    parts = str(cell).split(separator) if separator else [str(cell)]
    return [v for v in (_normal_value(p, column) for p in parts) if v]


@dataclass(frozen=True)
class ValueRule:
    """A binary task over a categorical or multi-valued text column.

    Attributes:
        column: the column.
        positive: values that make a record positive (compared as :func:`split_values` normalises them).
        negative: values that make a record negative; empty = every value that is not positive.
        empty: ``"exclude"`` (a record with an empty cell is left out) or ``"negative"``.
        separator: value separator inside a cell (``""``: one value per cell).
    """

    column: str
    positive: tuple[str, ...]
    negative: tuple[str, ...] = ()
    empty: str = "exclude"
    separator: str = "\n"


def value_labels(table: pd.DataFrame, rule: ValueRule) -> np.ndarray:
    """0/1/NaN labels of one :class:`ValueRule` over the rows of a table.

    Args:
        table: the label table (one row per record).
        rule: the task.

    Returns:
        (N,) float array: 1, 0 or NaN (not part of the task).

    Raises:
        ValueError: the column is absent (the message lists the columns) or ``rule.empty`` is not accepted.
    """
    if rule.column not in table.columns:
        raise ValueError(f"the label table has no column {rule.column!r}; it has: {', '.join(map(str, table.columns))}")
    if rule.empty not in EMPTY_MODES:
        raise ValueError(f"empty = {rule.empty!r} is not accepted; use one of {EMPTY_MODES}")
    positive = {_normal_value(v) for v in rule.positive}
    negative = {_normal_value(v) for v in rule.negative}
    out = []
    for cell in table[rule.column]:
        values = set(split_values(cell, rule.column, rule.separator))
        if not values:
            out.append(0.0 if rule.empty == "negative" else math.nan)
        elif values & positive:
            out.append(1.0)
        elif not negative or values & negative:
            out.append(0.0)
        else:
            out.append(math.nan)
    return np.asarray(out, dtype=np.float64)


def column_values(table: pd.DataFrame, column: str, separator: str = "\n") -> list[str]:
    """Distinct normalised values of a column (for error messages and checks), sorted.

    Args:
        table: the label table.
        column: the column.
        separator: value separator inside a cell.

    Returns:
        Sorted distinct values as :func:`split_values` gives them.
    """
    seen: set[str] = set()
    for cell in table[column]:
        seen.update(split_values(cell, column, separator))
    return sorted(seen)


def parse_groups(items: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Parse ``"NAME: value, value"`` items into name -> values (a name alone stands for itself).

    Args:
        items: e.g. ``["RAD: RAD, ARAD, AXR", "LAD: LAD, ALAD, AXL"]``.

    Returns:
        Group name -> its values, in the given order.

    Raises:
        ValueError: an item with an empty name or no value.
    """
    groups: dict[str, tuple[str, ...]] = {}
    for item in items:
        name, sep, rest = str(item).partition(":")
        values = tuple(v.strip() for v in rest.split(",") if v.strip()) if sep else (name.strip(),)
        if not name.strip() or not values:
            raise ValueError(f"group {item!r} is not 'NAME: value, value, ...'; write it so")
        groups[name.strip()] = values
    return groups


def table_labels(
    table: str | Path | pd.DataFrame,
    id_column: str,
    rules: Mapping[str, ValueRule],
    id_prefix: str = "",
) -> pd.DataFrame:
    """Several :class:`ValueRule` tasks of one table: ``record_id`` then one 0/1/NaN column per task.

    Args:
        table: the label table or its CSV (read as text, empty cells kept empty).
        id_column: column of the record ids.
        rules: task name -> rule.
        id_prefix: prepended to every id (to match source-tagged ids of a cache).

    Returns:
        One row per table row.

    Raises:
        ValueError: the id column or a rule's column is absent.
    """
    frame = pd.read_csv(table, dtype=str, keep_default_na=False) if isinstance(table, (str, Path)) else table
    if id_column not in frame.columns:
        raise ValueError(
            f"the label table has no id column {id_column!r}; it has: {', '.join(map(str, frame.columns))}"
        )
    out = pd.DataFrame({"record_id": id_prefix + frame[id_column].astype(str).str.strip()})
    for name, rule in rules.items():
        out[name] = value_labels(frame, rule)
    return out
