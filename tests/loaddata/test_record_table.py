"""Tests of kale_ext.loaddata.record_table: a root CSV with one path column per sampling rate is a record source."""

import numpy as np
import pandas as pd
import pytest
import wfdb

from kale_ext.loaddata.record_table import (
    choose_path_column,
    find_record_table,
    list_source_records,
    list_table_records,
    source_kind,
)
from kale_ext.loaddata.wfdb_sources import detect_source_kind
from kale_ext.prepdata.ecg_cache import prepare_ecg_cache
from kale_ext.prepdata.ecg_transforms import PreprocessSpec

from ..conftest import SHARED_ECG

LEADS = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]


def _record(folder, name, fs, seconds=2.0, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    n = int(fs * seconds)
    t = np.arange(n) / fs
    sig = np.stack([np.sin(2 * np.pi * (1 + k / 10) * t) * 0.5 for k in range(12)]) + 0.01 * seed
    wfdb.wrsamp(name, fs=fs, units=["mV"] * 12, sig_name=LEADS, p_signal=sig.T, fmt=["16"] * 12,
                adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str(folder))  # fmt: skip


def _root(tmp_path, n=4, hr_upto=2):
    """A root in the layout of a two-rate archive: records_lo at 50 Hz for all, records_hi at 200 Hz for some."""
    rows = []
    for i in range(1, n + 1):
        _record(tmp_path / "records_lo" / "000", f"{i:03d}_lo", 50, seed=i)
        hi = ""
        if i <= hr_upto:
            _record(tmp_path / "records_hi" / "000", f"{i:03d}_hi", 200, seed=i)
            hi = f"records_hi/000/{i:03d}_hi"
        rows.append({"rec": i, "patient": f"{100 + (i + 1) // 2}.0", "age": 50 + i,
                     "file_lo": f"records_lo/000/{i:03d}_lo", "file_hi": hi})  # fmt: skip
    pd.DataFrame(rows).to_csv(tmp_path / "database.csv", index=False)
    pd.DataFrame({"code": ["A"], "class": ["X"]}).to_csv(tmp_path / "statements.csv", index=False)  # no paths
    return tmp_path


def test_table_is_found_with_rates_ids_and_subjects(tmp_path):
    root = _root(tmp_path)
    table = find_record_table(root)
    assert table.table.name == "database.csv" and table.id_column == "rec" and table.subject_column == ""
    assert table.path_columns == {"file_lo": 50.0, "file_hi": 200.0}
    assert source_kind(root) == "record_table" and detect_source_kind(root) == "header_tree"  # walked, table unknown
    with_subject = find_record_table(root, subject_column="patient")
    listing = list_table_records(root, 50, table=with_subject)
    assert [r.record_id for r in listing.refs] == ["1", "2", "3", "4"]
    assert [r.subject_id for r in listing.refs] == ["101", "101", "102", "102"]  # '101.0' read as an integer id
    assert listing.refs[0].metadata["age"] == "51" and listing.refs[0].source_path == "records_lo/000/001_lo"


@pytest.mark.parametrize("fs, column, n_refs", [(50, "file_lo", 4), (200, "file_hi", 2), (100, "file_hi", 2),
                                                 (400, "file_hi", 2), (None, "file_hi", 2)])  # fmt: skip
def test_the_rate_column_follows_the_wanted_rate(tmp_path, fs, column, n_refs):
    root = _root(tmp_path)
    assert choose_path_column(find_record_table(root), fs) == column
    listing = list_table_records(root, fs)
    assert listing.column == column and len(listing.refs) == n_refs
    assert [r.path.split("/")[-1][-2:] for r in listing.refs] == [column[-2:]] * n_refs
    assert len(list_source_records(root, fs=fs)) == n_refs


def test_records_without_a_file_at_the_rate_are_reported_not_dropped_silently(tmp_path, caplog):
    root = _root(tmp_path)
    (root / "records_hi" / "000" / "002_hi.hea").unlink()
    listing = list_table_records(root, 200)
    assert [r.record_id for r in listing.refs] == ["1"]
    reasons = dict(listing.missing)
    assert set(reasons) == {"2", "3", "4"}
    assert "no file in column 'file_hi'" in reasons["3"] and "is not under" in reasons["2"]
    assert "3 of 4 records have no file at 200 Hz" in caplog.text and "file_lo" in caplog.text


def test_a_cache_of_a_record_table_reads_the_files_of_its_target_rate(tmp_path):
    root = _root(tmp_path / "root")
    spec = PreprocessSpec(target_fs=50, target_length=100, powerline_hz=None, highpass_hz=None)
    report = prepare_ecg_cache(root, tmp_path / "cache", spec=spec, leads="12L", num_workers=1, progress=False)
    index = pd.read_csv(tmp_path / "cache" / "index.csv", dtype=str)
    assert report.n_written == 4 and list(index["record_id"]) == ["1", "2", "3", "4"]
    assert all(index["source_path"].str.startswith("records_lo/"))


def test_a_table_with_repeated_ids_is_refused_naming_the_column(tmp_path):
    root = _root(tmp_path)
    frame = pd.read_csv(root / "database.csv")
    frame["rec"] = 1
    frame.to_csv(root / "database.csv", index=False)
    with pytest.raises(ValueError, match="'rec' does not identify"):
        find_record_table(root)


def test_the_real_release_layout(tmp_path):
    root = SHARED_ECG / "ptbxl"
    if not (root / "ptbxl_database.csv").is_file():
        pytest.skip("PTB-XL records not found at ../shared/data/ecg/ptbxl")
    table = find_record_table(root)
    assert (table.id_column, table.subject_column) == ("ecg_id", "patient_id")
    assert table.path_columns == {"filename_lr": 100.0, "filename_hr": 500.0}
    low, high = list_table_records(root, 100), list_table_records(root, 500)
    assert len(low.refs) == 799 and not low.missing and low.refs[0].path.endswith("records100/00000/00001_lr")
    assert len(high.refs) == 500 and len(high.missing) == 299 and high.refs[-1].record_id == "500"
    assert low.refs[0].subject_id == "15709" and len({r.subject_id for r in low.refs}) == 741
