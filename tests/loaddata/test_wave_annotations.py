"""Reading per-lead wave marks (toy table and the real LUDB table) and turning them into sample masks."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kale_ext.loaddata.wave_annotations import WAVE_TYPES, read_wave_annotations, wave_windows


def _shared_ecg() -> Path | None:
    here = Path(__file__).resolve().parents[2]
    for base in [here, *here.parents]:
        candidate = base.parent / "shared" / "data" / "ecg"
        if candidate.is_dir():
            return candidate
    return None


TOY = """record_id,lead,wave,onset,peak,offset
7,ii,N,100,110,149
7,ii,t,200,230,260
7,ii,p,60,70,
7,avr,qrs,300,310,320
8,V1,P,10,12,14
"""


@pytest.fixture()
def toy(tmp_path):
    path = tmp_path / "ann.csv"
    path.write_text(TOY, encoding="utf-8")
    return read_wave_annotations(path)


def test_toy_table_is_normalised(toy):
    assert set(toy["lead"]) == {"II", "aVR", "V1"}
    assert set(toy["wave"]) == {"P", "QRS", "T"}
    assert toy["record_id"].tolist() == ["7", "7", "7", "7", "8"]
    assert str(toy["onset"].dtype) == "Int64"
    incomplete = toy[toy["offset"].isna()]
    assert len(incomplete) == 1 and incomplete["wave"].iloc[0] == "P"


def test_windows_scale_to_the_target_rate_and_skip_incomplete_marks(toy):
    ww = wave_windows(toy, "7", ["I", "II", "aVR"], n_samples=100, source_fs=500, target_fs=100)
    assert ww.waves == WAVE_TYPES and ww.masks.shape == (3, 3, 100) and ww.span.shape == (3, 100)
    qrs = ww.masks[WAVE_TYPES.index("QRS")]
    # 100..149 at 500 Hz -> floor(20)..ceil(29.8) = 20..30 at 100 Hz, inclusive
    assert np.flatnonzero(qrs[1]).tolist() == list(range(20, 31))
    t = ww.masks[WAVE_TYPES.index("T")]
    assert np.flatnonzero(t[1]).tolist() == list(range(40, 53))
    assert not ww.masks[WAVE_TYPES.index("P")].any()  # the P mark has no offset: left out
    assert ww.n_incomplete == 1
    assert np.flatnonzero(ww.span[1]).tolist() == list(range(20, 53))  # first onset .. last offset of lead II
    assert not ww.span[0].any() and not ww.masks[:, 0].any()  # lead I has no marks
    assert np.flatnonzero(qrs[2]).tolist() == list(range(60, 65))


def test_same_rate_keeps_indices(toy):
    ww = wave_windows(toy, "8", ["V1"], n_samples=50, source_fs=500)
    assert np.flatnonzero(ww.masks[0, 0]).tolist() == [10, 11, 12, 13, 14]


def test_missing_columns_and_bad_names_are_explained(tmp_path):
    with pytest.raises(ValueError, match="lacks columns"):
        read_wave_annotations(pd.DataFrame({"record_id": ["1"], "lead": ["I"]}))
    bad = pd.DataFrame({"record_id": ["1"], "lead": ["I"], "wave": ["U"], "onset": [1], "peak": [2], "offset": [3]})
    with pytest.raises(ValueError, match="unknown wave type"):
        read_wave_annotations(bad)


def test_real_table():
    root = _shared_ecg()
    path = None if root is None else root / "ludb" / "annotations.csv"
    if path is None or not path.is_file():
        pytest.skip("LUDB annotations not found at ../shared/data/ecg/ludb")
    table = read_wave_annotations(path)
    assert table["record_id"].nunique() == 160
    assert set(table["lead"]) == {"I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"}
    assert set(table["wave"]) == set(WAVE_TYPES)
    first = table[(table.record_id == "1") & (table.lead == "I") & (table.wave == "QRS")].iloc[0]
    assert (int(first.onset), int(first.peak), int(first.offset)) == (641, 664, 690)
    ww = wave_windows(table, "1", ["I", "II"], 1000, 500, 100)
    qrs = ww.masks[WAVE_TYPES.index("QRS"), 0]
    assert qrs[128:139].all()  # 641/5 = 128.2 .. 690/5 = 138
    time_share = ww.masks[:, 1][:, ww.span[1]].mean(axis=1)
    assert 0.05 < time_share[WAVE_TYPES.index("QRS")] < 0.35
