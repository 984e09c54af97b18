"""Tests of kale_ext.loaddata.source_sets: several record sources as one, with source-tagged ids."""

import numpy as np
import pandas as pd
import pytest
import wfdb

from kale_ext.loaddata.source_sets import combine_sources, source_tags, split_sources
from kale_ext.prepdata.ecg_cache import prepare_ecg_cache
from kale_ext.prepdata.ecg_transforms import PreprocessSpec

from ..conftest import SHARED_ECG


def _tree(folder, names, fs=100):
    folder.mkdir(parents=True, exist_ok=True)
    sig = np.sin(np.linspace(0, 20, 200))[None].repeat(2, 0) * np.array([[0.5], [0.8]])
    for name in names:
        wfdb.wrsamp(name, fs=fs, units=["mV"] * 2, sig_name=["I", "II"], p_signal=sig.T, fmt=["16"] * 2,
                    adc_gain=[1000.0] * 2, baseline=[0] * 2, write_dir=str(folder))  # fmt: skip
    return folder


def test_lists_split_and_tags_are_unique():
    assert split_sources(" a/x, b/y ,, c.csv") == ["a/x", "b/y", "c.csv"] and split_sources("") == []
    assert source_tags(["a/data", "b/data", "m/list.csv", "c/data"]) == ["data", "data-2", "list", "data-3"]


def test_same_ids_in_two_sources_stay_two_records_and_two_subjects(tmp_path):
    one, two = _tree(tmp_path / "one", ["r1", "r2"]), _tree(tmp_path / "two", ["r1"])
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": ["one/r2"], "record_id": ["r1"], "subject_id": ["p1"]}).to_csv(manifest, index=False)
    refs = combine_sources([str(one), str(two), str(manifest)])
    assert [r.record_id for r in refs] == ["one:r1", "one:r2", "two:r1", "m:r1"]
    assert [r.subject_id for r in refs] == ["one:r1", "one:r2", "two:r1", "m:p1"]
    assert len({r.subject_id for r in refs}) == 4 and refs[2].metadata["source"] == "two"
    refs = combine_sources([refs[:1], refs[2:3]], tags=["a", "b"], separator="_")
    assert [r.record_id for r in refs] == ["a_one:r1", "b_two:r1"]
    with pytest.raises(ValueError, match="one distinct tag"):
        combine_sources([str(one), str(two)], tags=["x", "x"])
    spec = PreprocessSpec(target_fs=100, target_length=200, powerline_hz=None, highpass_hz=None)
    both = combine_sources([str(one), str(two)])
    report = prepare_ecg_cache(both, tmp_path / "cache", spec=spec, leads=["I", "II"], num_workers=1, progress=False)
    index = pd.read_csv(tmp_path / "cache" / "index.csv", dtype=str)
    assert report.n_written == 3 and list(index["subject_id"]) == ["one:r1", "one:r2", "two:r1"]


def test_the_three_real_sources_at_100_hz():
    roots = [SHARED_ECG / name for name in ("ptbxl", "ludb", "cinc2021")]
    if not all(r.is_dir() for r in roots):
        pytest.skip("real ECG sources not found at ../shared/data/ecg")
    refs = combine_sources([str(r) for r in roots], fs=100)
    tags = pd.Series([r.metadata["source"] for r in refs]).value_counts().to_dict()
    assert tags == {"ptbxl": 799, "ludb": 160, "cinc2021": 50}
    assert len({r.record_id for r in refs}) == len(refs) == 1009
    assert refs[0].record_id == "ptbxl:1" and refs[0].subject_id == "ptbxl:15709" and "records100" in refs[0].path
