"""Tests of kale_ext.loaddata.wfdb_sources: source detection, listing and reading records by name."""

import numpy as np
import pandas as pd
import pytest
import wfdb

from kale_ext.loaddata.leads import match_channels
from kale_ext.loaddata.wfdb_sources import (
    RecordReadError,
    detect_source_kind,
    header_sampling_rate,
    list_records,
    parse_header_comments,
    read_record,
)


def _write(folder, name, signals, names, fs=100, units="mV", comments=None, gain=200.0):
    folder.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(
        name,
        fs=fs,
        units=[units] * len(names),
        sig_name=list(names),
        p_signal=signals.T,
        fmt=["16"] * len(names),
        adc_gain=[gain] * len(names),
        baseline=[0] * len(names),
        comments=comments or [],
        write_dir=str(folder),
    )


def test_header_tree_keeps_comments(tmp_path):
    sig = np.random.default_rng(0).normal(size=(2, 50)) * 0.5
    _write(tmp_path / "a", "r1", sig, ["I", "II"], comments=["Age: 61", "Dx: 426783006,59118001"])
    _write(tmp_path / "b", "r0", sig, ["I", "II"])
    assert detect_source_kind(tmp_path) == "header_tree"
    refs = list_records(tmp_path)
    assert [r.record_id for r in refs] == ["a/r1", "b/r0"]
    assert refs[0].subject_id == "a/r1"
    raw = read_record(refs[0].path)
    assert raw.comments == {"Age": "61", "Dx": "426783006,59118001"}
    np.testing.assert_allclose(raw.signals, sig, atol=0.5 / 200 + 1e-9)


def test_record_list_and_manifest(tmp_path):
    sig = np.ones((1, 20)) * 0.25
    _write(tmp_path / "files" / "p1" / "s7", "7", sig, ["V1"])
    pd.DataFrame({"subject_id": [11], "study_id": [7], "path": ["files/p1/s7/7"], "ecg_time": ["t0"]}).to_csv(
        tmp_path / "record_list.csv", index=False
    )
    assert detect_source_kind(tmp_path) == "record_list"
    (ref,) = list_records(tmp_path)
    assert (ref.record_id, ref.subject_id, ref.source_path) == ("7", "11", "files/p1/s7/7")
    assert ref.metadata == {"ecg_time": "t0"}
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame({"path": ["files/p1/s7/7.hea"], "label": [1]}).to_csv(manifest, index=False)
    assert detect_source_kind(manifest) == "manifest"
    (mref,) = list_records(manifest)
    assert mref.record_id == "files/p1/s7/7" and mref.metadata == {"label": "1"}
    np.testing.assert_allclose(read_record(mref.path).signals, sig)


def test_units_are_converted_to_mv(tmp_path):
    _write(tmp_path, "u", np.full((1, 10), 500.0), ["I"], units="uV", gain=1.0)
    np.testing.assert_allclose(read_record(tmp_path / "u.hea").signals, 0.5)


def test_bad_sources_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        detect_source_kind(tmp_path / "nope")
    with pytest.raises(ValueError, match="no record_list.csv"):
        detect_source_kind(tmp_path)
    bad = tmp_path / "m.csv"
    pd.DataFrame({"file": ["x"]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="'path' column"):
        list_records(bad)


def test_parse_header_comments():
    assert parse_header_comments(["Age: 3", "free text", "# Sex: F"]) == {"Age": "3", "Sex": "F"}


def test_real_records_read_by_name_with_small_einthoven_residual(cinc_dir):
    refs = list_records(cinc_dir)
    assert len(refs) == 50
    worst = 0.0
    for ref in refs[::5]:
        raw = read_record(ref.path)
        slots = match_channels(raw.channel_names)
        assert len(slots) == 12 and raw.fs == 500 and raw.signals.shape == (12, 5000)
        assert "Dx" in raw.comments
        lead = {name: raw.signals[k] for name, k in slots.items()}
        scale = np.std(lead["II"]) + np.std(lead["I"])
        worst = max(worst, np.sqrt(np.mean((lead["III"] - (lead["II"] - lead["I"])) ** 2)) / scale)
        # Goldberger: aVF = II - I/2 from the named channels (a position swap of aVL/aVF would break it)
        gold = np.sqrt(np.mean((lead["aVF"] - (lead["II"] - lead["I"] / 2)) ** 2)) / scale
        assert gold < 0.05
    assert worst < 0.02


def _header_variant(folder, name, record_line):
    """Copy record r of ``folder`` to ``name`` with another record line (same signal file)."""
    lines = (folder / "r.hea").read_text().splitlines()
    (folder / f"{name}.hea").write_text("\n".join([record_line] + lines[1:]) + "\n")


@pytest.mark.parametrize(
    "record_line, reason, words",
    [
        ("r 2", "bad_sampling_rate", "no sampling frequency"),
        ("r 2 0 50", "bad_sampling_rate", "0 Hz is not positive"),
        ("r 2 -100 50", "bad_sampling_rate", "-100 Hz is not positive"),
        ("r 2 fast 50", "bad_sampling_rate", "not a number"),
        ("this is not a header", "unreadable", "is not 'name n_signals fs n_samples'"),
        ("", "unreadable", "empty (1 bytes)"),
    ],
)
def test_bad_headers_are_refused_with_a_reason(tmp_path, record_line, reason, words):
    _write(tmp_path, "r", np.zeros((2, 50)), ["I", "II"])
    _header_variant(tmp_path, "x", record_line)
    if not record_line:
        (tmp_path / "x.hea").write_text("\n")
    with pytest.raises(RecordReadError) as err:
        read_record(tmp_path / "x")
    assert err.value.reason == reason and words in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_zero_byte_and_binary_headers_are_refused(tmp_path):
    (tmp_path / "z.hea").write_bytes(b"")
    (tmp_path / "g.hea").write_bytes(b"\x00\x01\xff garbage")
    with pytest.raises(RecordReadError, match="empty"):
        read_record(tmp_path / "z")
    with pytest.raises(RecordReadError, match="binary"):
        read_record(tmp_path / "g")
    with pytest.raises(RecordReadError, match="no header"):
        read_record(tmp_path / "missing")


def test_listing_follows_symlinks_once_and_reads_upper_case_headers(tmp_path):
    sig = np.random.default_rng(1).normal(size=(2, 40)) * 0.3
    real = tmp_path / "real"
    _write(real / "a", "r1", sig, ["I", "II"])
    _write(real / "b", "R2", sig, ["I", "II"])
    (real / "b" / "R2.hea").rename(real / "b" / "R2.HEA")
    root = tmp_path / "root"
    root.mkdir()
    (root / "linked").symlink_to(real, target_is_directory=True)
    (real / "a" / "loop").symlink_to(real, target_is_directory=True)  # a loop back to the top
    assert detect_source_kind(root) == "header_tree"
    refs = list_records(root)
    assert [r.record_id for r in refs] == ["linked/a/r1", "linked/b/R2"]
    raw = read_record(refs[1].path)
    np.testing.assert_allclose(raw.signals, sig, atol=0.5 / 200 + 1e-9)
    assert raw.fs == 100 and raw.channel_names == ("I", "II")
    assert header_sampling_rate(real / "a" / "r1.hea") == 100.0


@pytest.mark.parametrize(
    "record_line, words",
    [("r 2 0.5 50", "0.5 Hz is outside the plausible"), ("r 2 0.002 50", "(a value in kHz?)"),
     ("r 2 50000 50", "50000 Hz is outside")],
)  # fmt: skip
def test_implausible_sampling_frequencies_are_refused_before_any_resampling(tmp_path, record_line, words):
    _write(tmp_path, "r", np.zeros((2, 50)), ["I", "II"])
    _header_variant(tmp_path, "x", record_line)
    with pytest.raises(RecordReadError) as err:
        read_record(tmp_path / "x")
    assert err.value.reason == "bad_sampling_rate" and words in str(err.value)


def test_a_header_format_or_length_that_disagrees_with_the_signal_file_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    _write(tmp_path, "r", rng.normal(size=(2, 400)), ["I", "II"])
    assert read_record(tmp_path / "r").signals.shape == (2, 400)
    text = (tmp_path / "r.hea").read_text()
    (tmp_path / "r.hea").write_text(text.replace(".dat 16 ", ".dat 212 "))  # a 16-bit file declared as 212
    with pytest.raises(RecordReadError) as err:
        read_record(tmp_path / "r")
    assert err.value.reason == "unreadable" and "r.dat has 1,600 bytes" in str(err.value)
    assert "implies 1,200" in str(err.value)
    (tmp_path / "r.hea").write_text(text)
    data = (tmp_path / "r.dat").read_bytes()
    (tmp_path / "r.dat").write_bytes(data[:1000])  # truncated
    with pytest.raises(RecordReadError, match="truncated"):
        read_record(tmp_path / "r")


def test_real_headers_and_signal_files_agree(cinc_dir):
    from kale_ext.loaddata.wfdb_sources import check_signal_files, iter_headers

    headers = list(iter_headers(cinc_dir))
    assert headers
    for header in headers:
        check_signal_files(header)


def test_a_non_ascii_record_name_is_named_as_it_is(tmp_path):
    _write(tmp_path, "rec", np.zeros((2, 50)), ["I", "II"])
    (tmp_path / "r\u00e9c.hea").write_text((tmp_path / "rec.hea").read_text().replace("rec", "r\u00e9c"))
    (tmp_path / "rec.dat").rename(tmp_path / "r\u00e9c.dat")
    with pytest.raises(RecordReadError) as err:
        read_record(tmp_path / "r\u00e9c")
    assert "r\u00e9c" in str(err.value) and "non-ASCII" in str(err.value) and "rename" in str(err.value)
