"""Public ECG data sets described by their tables: the columns, statements and tasks of PTB-XL and LUDB.

The library reads such tables generically (``kale_ext.loaddata.record_table``, ``kale_ext.loaddata.diagnosis_labels``);
what is specific to a data set (a file name, a column, which cell values make a task) lives here and in the configs,
so the example and the benchmarks share one description and no script parses a data set's labels itself.

- PTB-XL (Wagner et al., Scientific Data 2020): ``ptbxl_database.csv`` (``ecg_id`` record, ``patient_id`` subject,
  ``scp_codes`` statements with likelihoods, ``heart_axis``, ``strat_fold``) and ``scp_statements.csv``
  (``diagnostic_class``: NORM, MI, STTC, CD, HYP).
- LUDB (Kalyakulina et al., IEEE Access 2020): ``ludb.csv``, one row per record (``ID``), diagnoses as new-line
  separated values per column.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kale_ext.loaddata.diagnosis_labels import ValueRule, parse_groups, table_labels

PTBXL_DATABASE = "ptbxl_database.csv"
PTBXL_STATEMENTS = "scp_statements.csv"
PTBXL_ID = "ecg_id"
PTBXL_SUBJECT = "patient_id"
PTBXL_STATEMENT_COLUMN = "scp_codes"
PTBXL_CLASS_COLUMN = "diagnostic_class"
PTBXL_AXIS_COLUMN = "heart_axis"
PTBXL_FOLD_COLUMN = "strat_fold"
PTBXL_SUPERCLASSES = ("NORM", "MI", "STTC", "CD", "HYP")
# heart_axis codes: LAD/RAD left/right axis deviation, ALAD/ARAD "abnormal" left/right deviation, AXL/AXR "axis left"
# / "axis right" (PTB-XL's own labels), MID midline, SAG sagittal. A deviation task takes the three codes of its side.
PTBXL_AXIS_GROUPS = parse_groups(["RAD: RAD, ARAD, AXR", "LAD: LAD, ALAD, AXL"])

LUDB_CSV = "ludb.csv"
LUDB_ID = "ID"
LUDB_PREFIX = "ludb_"
_RHYTHM, _AXIS = "Rhythms", "Electric axis of the heart"
# LUDB tasks: rules over the diagnosis columns (values compared case-insensitively without a final full stop).
LUDB_TASKS = {
    # normal sinus rhythm (sinus brady-/tachycardia and sinus arrhythmia count as not)
    "sinus": ValueRule(_RHYTHM, ("Sinus rhythm",), empty="negative"),
    "afib": ValueRule(_RHYTHM, ("Atrial fibrillation",), empty="negative"),
    # left axis deviation (1) vs normal axis (0); vertical, horizontal, right deviation and unknown are left out
    "lad": ValueRule(_AXIS, ("left axis deviation",), ("normal",), empty="exclude"),
    "lvh": ValueRule("Hypertrophies", ("Left ventricular hypertrophy",), empty="negative"),
    "irbbb": ValueRule("Conduction abnormalities", ("Incomplete right bundle branch block",), empty="negative"),
}


def ludb_labels(csv: str | Path, id_prefix: str = LUDB_PREFIX) -> pd.DataFrame:
    """LUDB's binary tasks (:data:`LUDB_TASKS`): ``record_id`` (prefixed) then one 0/1/NaN column per task."""
    return table_labels(csv, LUDB_ID, LUDB_TASKS, id_prefix=id_prefix)
