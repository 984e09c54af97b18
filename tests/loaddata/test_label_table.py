"""Tests of kale_ext.loaddata.label_table: tolerant reading, strict numbers with row numbers, label/id matching."""

import numpy as np
import pandas as pd
import pytest

from kale_ext.loaddata.label_table import LabelTableReport, match_labels, read_label_table

RANGES = {"mPAP": (5.0, 80.0, "mmHg"), "PAWP": (2.0, 45.0, "mmHg")}
ROWS = [
    "patient;mPAP;PAWP;site",
    "p1;25;12;Montr\u00e9al",
    "p2;25 mmHg;10;B",
    "p3;31,5;9;C",
    "p4;n/a;8;D",
    "",
    "p5;9999;11;E",
    "p6;3.2;2;F",
    "p7;;14;G",
    "p8;abc;15;H",
    "p1;30;12;A",
]


@pytest.mark.parametrize("encoding", ["cp1252", "utf-8", "utf-8-sig"])
def test_numbers_are_parsed_strictly_with_row_numbers_and_units(tmp_path, encoding):
    path = tmp_path / "haemo.csv"
    path.write_bytes("\n".join(ROWS).encode(encoding))
    rep = read_label_table(path, "patient", ["mPAP", "PAWP"], RANGES)
    assert isinstance(rep, LabelTableReport)
    assert rep.encoding == ("cp1252" if encoding == "cp1252" else "utf-8") and rep.delimiter == ";"
    by_row = {(p.row, p.column): p for p in rep.problems}
    assert {k: p.kind for k, p in by_row.items()} == {
        (2, "mPAP"): "unit_in_cell",
        (3, "mPAP"): "decimal_comma",
        (4, "mPAP"): "missing_code",
        (6, "mPAP"): "out_of_range",
        (7, "mPAP"): "out_of_range",
        (9, "mPAP"): "not_a_number",
        (10, "patient"): "duplicate_id",
    }
    assert "data row 2 (spreadsheet row 3)" in by_row[(2, "mPAP")].message
    assert "mmHg" in by_row[(2, "mPAP")].message and "write the number only" in by_row[(2, "mPAP")].message
    assert "31.5" in by_row[(3, "mPAP")].message
    assert "9999" in by_row[(6, "mPAP")].message and "5-80 mmHg" in by_row[(6, "mPAP")].message
    assert "3.2" in by_row[(7, "mPAP")].message and "unit" in by_row[(7, "mPAP")].message
    table = rep.table.set_index("patient")
    assert table.loc["p1", "mPAP"] == 25.0 and table.loc["p6", "PAWP"] == 2.0
    assert table[["mPAP"]].loc[["p2", "p3", "p4", "p5", "p6", "p7", "p8"]].isna().all().all()
    assert list(table.index) == ["p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8"]  # blank row dropped, duplicate too
    assert rep.n_missing == {"mPAP": 1, "PAWP": 0}


def test_bad_columns_and_unparseable_files_give_clear_errors(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("id,x\n1,2\n")
    with pytest.raises(ValueError, match=r"no column 'y'.*has: id, x"):
        read_label_table(path, "id", ["y"])
    with pytest.raises(ValueError, match="no column 'patient'"):
        read_label_table(path, "patient", ["x"])
    path.write_text("id,x\n1,2,3\n")
    with pytest.raises(ValueError, match=r"line 2 has 3 fields.*header has 2"):
        read_label_table(path, "id", ["x"])
    with pytest.raises(FileNotFoundError):
        read_label_table(tmp_path / "missing.csv", "id", ["x"])
    path.write_bytes(b"id,x\n1,\x81\x90\n")  # bytes cp1252 leaves undefined: Latin-1 fallback
    rep = read_label_table(path, "id", ["x"])
    assert rep.encoding == "latin-1" and rep.problems[0].kind == "not_a_number"


def _labels(pairs):
    return pd.DataFrame(pairs, columns=["subject_id", "label"])


def test_match_labels_rates_and_counts():
    labels = _labels([("s1", 0), ("s2", 1), ("s3", 0), ("s4", 1), ("s5", 1), ("s9", 0), ("s10", np.nan)])
    ids = ["s1", "s2", "s3", "s4", "s5", "s6", "s5"]
    m = match_labels(labels, ids, n_splits=2)
    assert (m.n_ids, m.n_labelled, m.n_matched) == (6, 6, 5)
    assert m.match_rate == pytest.approx(5 / 6)
    assert m.unmatched_ids == ["s6"] and m.labels_without_id == ["s9"]
    assert m.class_counts == {0: 2, 1: 3} and m.blocking == [] and m.ok
    m.raise_if_blocking()


@pytest.mark.parametrize(
    "pairs, ids, folds, words",
    [
        ([("a", 0), ("b", 1)], ["10001", "10002"], 2, "no id of the label table matches"),
        ([("a", 1), ("b", 1), ("c", 1)], ["a", "b", "c"], 2, "only class 1"),
        ([("a", 0), ("b", 1), ("c", 2), ("d", 2)], ["a", "b", "c", "d"], 1, "3 classes"),
        (
            [("a", 0), ("b", 1), ("c", 0), ("d", 0)],
            ["a", "b", "c", "d"],
            3,
            "class 1 has 1 matched id, fewer than the 3",
        ),
        ([("a", 0), ("a", 1), ("b", 1)], ["a", "b"], 1, "id 'a' has conflicting labels"),
    ],
)
def test_match_labels_blocking_problems_say_what_to_do(pairs, ids, folds, words):
    m = match_labels(_labels(pairs), ids, n_splits=folds)
    assert not m.ok and any(words in b for b in m.blocking), m.blocking
    with pytest.raises(ValueError, match=words):
        m.raise_if_blocking()


def test_match_labels_takes_a_report_and_normalises_ids(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("subject_id,label\n1.0,0\n2,1\n3,1\n4,0\n")
    rep = read_label_table(path, "subject_id", ["label"], {"label": (0, 1, "class")})
    m = match_labels(rep, ["1", "2", "3", "4"], n_splits=2)
    assert m.n_matched == 4 and m.ok and m.class_counts == {0: 2, 1: 2}


def test_excel_files_saved_as_csv_are_named_and_utf16_tables_decoded(tmp_path):
    text = "subject_id\tmPAP\ns1\t25\ns2\t31.5\n"
    for encoding, name in (("utf-16", "utf-16"), ("utf-16-le", "utf-16-le")):
        path = tmp_path / f"{name}.csv"
        path.write_bytes(text.encode(encoding))
        rep = read_label_table(path, "subject_id", ["mPAP"], RANGES)
        assert rep.encoding == name and rep.delimiter == "\t" and rep.table["mPAP"].tolist() == [25.0, 31.5]
    path = tmp_path / "labels.csv"
    path.write_bytes(b"PK\x03\x04\x14\x00\x06\x00" + b"\x00" * 40)
    with pytest.raises(ValueError, match=r"labels.csv is an Excel workbook.*save it as CSV"):
        read_label_table(path, "subject_id", ["mPAP"])


def test_kpa_rows_in_a_mmhg_column_are_listed_or_converted_by_a_unit_column(tmp_path):
    ranges = {"mPAP": (5.0, 100.0, "mmHg", "kPa")}
    rows = ["id,mPAP"] + [f"s{i},{v}" for i, v in enumerate([28, 35, 41, 25, 33, 6.5, 7.2, 30, 18])]
    path = tmp_path / "merged.csv"
    path.write_text("\n".join(rows) + "\n")
    rep = read_label_table(path, "id", ["mPAP"], ranges)
    flagged = {p.row: p for p in rep.problems}
    assert set(flagged) == {6, 7} and all(p.kind == "suspect_unit" for p in flagged.values())
    assert "48.8 mmHg if the row is in kPa" in flagged[6].message and "mPAP_unit" in flagged[6].message
    assert rep.table.set_index("id")["mPAP"][["s5", "s6"]].isna().all()
    assert rep.table.set_index("id").loc["s8", "mPAP"] == 18.0  # low but plausible in mmHg: kept
    # a unit column settles it: kPa rows are converted, nothing is left out
    units = ["mmHg"] * 5 + ["kPa", "kpa"] + ["", "mmHg"]
    rows = ["id,mPAP,mPAP_unit"] + [
        f"s{i},{v},{u}" for i, (v, u) in enumerate(zip([28, 35, 41, 25, 33, 6.5, 7.2, 30, 18], units))
    ]
    path.write_text("\n".join(rows) + "\n")
    rep = read_label_table(path, "id", ["mPAP"], ranges)
    assert not rep.problems
    assert np.isclose(rep.table.set_index("id").loc["s5", "mPAP"], 6.5 * 7.50062)
