"""Tests of kale_ext.loaddata.diagnosis_labels: statement dicts with likelihoods, superclasses, categorical and
multi-valued cells, on small tables made here and on the real PTB-XL and LUDB tables when present."""

import math

import numpy as np
import pandas as pd
import pytest

from kale_ext.loaddata.diagnosis_labels import (
    ValueRule,
    parse_groups,
    parse_statement_dict,
    read_statement_table,
    split_values,
    statement_labels,
    table_labels,
    target_kind,
    value_labels,
)

from ..conftest import SHARED_ECG

CELLS = [
    "{'NORM': 100.0, 'SR': 0.0}",  # normal
    "{'IMI': 35.0, 'LVH': 100.0}",  # MI (uncertain) + HYP
    "{'NORM': 50.0, 'IRBBB': 100.0}",  # NORM at 50 + CD
    "{'SR': 0.0}",  # rhythm only: no classed statement
    '{"STTC": 100}',  # JSON spelling
    "",  # nothing
]


@pytest.fixture
def statements(tmp_path):
    path = tmp_path / "statements.csv"
    pd.DataFrame({
        "": ["NORM", "IMI", "LVH", "IRBBB", "STTC", "SR"],
        "diagnostic_class": ["NORM", "MI", "HYP", "CD", "STTC", ""],
    }).to_csv(path, index=False)  # fmt: skip
    return read_statement_table(path)


def test_statement_cells_parse_python_and_json_and_refuse_other_text():
    assert parse_statement_dict(CELLS[0]) == {"NORM": 100.0, "SR": 0.0}
    assert parse_statement_dict(CELLS[4]) == {"STTC": 100.0}
    assert parse_statement_dict("") == {} and parse_statement_dict(float("nan")) == {}
    with pytest.raises(ValueError, match="not a dict"):
        parse_statement_dict("NORM;MI")


def test_superclass_labels_map_statements_through_the_table(statements):
    assert statements.class_names == ("CD", "HYP", "MI", "NORM", "STTC")
    norm = statement_labels(CELLS, "NORM", statements)
    np.testing.assert_array_equal(norm[:3], [1, 0, 1])
    assert math.isnan(norm[3]) and math.isnan(norm[5])  # no classed statement: not part of a superclass task
    assert norm[4] == 0
    np.testing.assert_array_equal(statement_labels(CELLS, "MI", statements)[:3], [0, 1, 0])
    np.testing.assert_array_equal(statement_labels(CELLS, "CD", statements)[:3], [0, 0, 1])


def test_the_likelihood_threshold_and_uncertain_statements(statements):
    mi = statement_labels(CELLS, "MI", statements, likelihood_min=50)
    np.testing.assert_array_equal(mi[:3], [0, 0, 0])  # IMI at 35 does not count
    mi_ex = statement_labels(CELLS, "MI", statements, likelihood_min=50, uncertain="exclude")
    assert math.isnan(mi_ex[1]) and mi_ex[0] == 0
    norm = statement_labels(CELLS, "NORM", statements, likelihood_min=80)
    np.testing.assert_array_equal(norm[:3], [1, 0, 0])  # NORM at 50 is below 80
    lvh = statement_labels(CELLS, "LVH", statements)  # a single statement: every record takes part
    np.testing.assert_array_equal(lvh, [0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(statement_labels(CELLS, "SR", statements), [1, 0, 0, 1, 0, 0])
    assert statement_labels(CELLS, "SR", statements, likelihood_min=1).sum() == 0  # likelihood 0 = none given


def test_unknown_targets_are_refused_listing_what_exists(statements):
    with pytest.raises(ValueError, match="'PH' is unknown.*classes CD, HYP, MI, NORM, STTC"):
        target_kind("PH", statements, ["rad"])
    assert target_kind("NORM", statements) == "superclass" and target_kind("LVH", statements) == "statement"
    assert target_kind("RAD", statements, ["RAD", "lad"]) == "value" and target_kind("LAD", None, ["lad"]) == "value"
    with pytest.raises(ValueError, match="uncertain"):
        statement_labels(CELLS, "NORM", statements, uncertain="maybe")


def test_categorical_groups_and_empty_cells():
    table = pd.DataFrame({"axis": ["RAD", "ARAD", "AXR", "LAD", "MID", "", "ALAD"]})
    groups = parse_groups(["RAD: RAD, ARAD, AXR", "LAD: LAD, ALAD, AXL", "MID"])
    assert groups["RAD"] == ("RAD", "ARAD", "AXR") and groups["MID"] == ("MID",)
    rad = value_labels(table, ValueRule("axis", groups["RAD"], separator=""))
    np.testing.assert_array_equal(rad[[0, 1, 2, 3, 4, 6]], [1, 1, 1, 0, 0, 0])
    assert math.isnan(rad[5])
    assert value_labels(table, ValueRule("axis", groups["RAD"], empty="negative"))[5] == 0
    lad_vs_mid = value_labels(table, ValueRule("axis", groups["LAD"], ("MID",)))
    assert lad_vs_mid[3] == 1 and lad_vs_mid[6] == 1 and lad_vs_mid[4] == 0 and math.isnan(lad_vs_mid[0])
    with pytest.raises(ValueError, match="'NAME: value"):
        parse_groups([": RAD"])
    with pytest.raises(ValueError, match="no column 'heart'"):
        value_labels(table, ValueRule("heart", ("RAD",)))


def test_multi_valued_cells_are_split_and_normalised():
    column = "Electric axis of the heart"
    assert split_values("Electric axis of the heart: Normal.\n", column) == ["normal"]
    assert split_values("Sinus rhythm\nAtrial fibrillation.", "Rhythms") == ["sinus rhythm", "atrial fibrillation"]
    table = pd.DataFrame({"ID": [" 1", "2", "3", "4"],
                          "Hyp": ["Left ventricular hypertrophy\nLeft atrial hypertrophy", "", "Right atrial overload",
                                  "left ventricular hypertrophy."]})  # fmt: skip
    labels = table_labels(table, "ID", {"lvh": ValueRule("Hyp", ("Left ventricular hypertrophy",), empty="negative")},
                          id_prefix="x_")  # fmt: skip
    assert list(labels["record_id"]) == ["x_1", "x_2", "x_3", "x_4"]
    np.testing.assert_array_equal(labels["lvh"], [1, 0, 0, 1])


def test_real_statement_tables_give_the_documented_counts():
    root = SHARED_ECG / "ptbxl"
    if not (root / "scp_statements.csv").is_file():
        pytest.skip("PTB-XL tables not found at ../shared/data/ecg/ptbxl")
    table = pd.read_csv(root / "ptbxl_database.csv", dtype=str, keep_default_na=False)
    statements = read_statement_table(root / "scp_statements.csv")
    counts = {c: int(np.nansum(statement_labels(table["scp_codes"], c, statements))) for c in statements.class_names}
    assert counts == {"NORM": 431, "STTC": 180, "CD": 156, "MI": 149, "HYP": 75}  # the data README's counts
    assert int(np.nansum(statement_labels(table["scp_codes"], "RVH", statements))) == 4
    assert int(np.nansum(statement_labels(table["scp_codes"], "RAO/RAE", statements))) == 4
    groups = parse_groups(["RAD: RAD, ARAD, AXR"])
    assert np.nansum(value_labels(table, ValueRule("heart_axis", groups["RAD"], separator=""))) == 12


def test_real_multi_valued_table():
    csv = SHARED_ECG / "ludb" / "ludb.csv"
    if not csv.is_file():
        pytest.skip("LUDB not found at ../shared/data/ecg/ludb")
    rules = {
        "lvh": ValueRule("Hypertrophies", ("Left ventricular hypertrophy",), empty="negative"),
        "lad": ValueRule("Electric axis of the heart", ("left axis deviation",), ("normal",)),
        "rao": ValueRule("Hypertrophies", ("Right atrial overload",), empty="negative"),
    }
    labels = table_labels(csv, "ID", rules)
    assert len(labels) == 160 and labels["lvh"].sum() == 93 and labels["rao"].sum() == 9
    assert labels["lad"].notna().sum() == 61 + 51 and labels["lad"].sum() == 61
