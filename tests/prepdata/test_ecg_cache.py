"""Tests of kale_ext.prepdata.ecg_cache: name mapping, resampling, QC, resumption, sharding, CLI and real records."""

import json

import numpy as np
import pandas as pd
import pytest
import wfdb

from kale_ext.loaddata.leads import CANONICAL_LEADS
from kale_ext.loaddata.synthetic import ARCHIVE_LEAD_ORDER, generate_cohort_arrays
from kale_ext.loaddata.wfdb_sources import list_records, read_record
from kale_ext.prepdata.ecg_cache import main, merge_shards, prepare_ecg_cache
from kale_ext.prepdata.ecg_transforms import PreprocessSpec, preprocess_record

FS = 100.0
SPEC = PreprocessSpec(target_fs=FS, target_length=300)
CACHE_FILES = ("signals.npy", "index.csv", "qc.csv", "spec.json")


def _write(folder, name, signals, names, fs=FS, comments=None):
    """Write (C, T) mV signals as a 16-bit WFDB record with 1000 units/mV."""
    folder.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(
        name,
        fs=fs,
        units=["mV"] * len(names),
        sig_name=list(names),
        p_signal=np.asarray(signals).T,
        fmt=["16"] * len(names),
        adc_gain=[1000.0] * len(names),
        baseline=[0] * len(names),
        comments=comments or [],
        write_dir=str(folder),
    )


@pytest.fixture(scope="module")
def ecgs():
    """Eight synthetic 12-lead ECGs, 4 s at 100 Hz, canonical order, mV."""
    signals, _ = generate_cohort_arrays(8, seed=3, fs=FS, duration_s=4.0)
    return signals


@pytest.fixture()
def folder(tmp_path, ecgs):
    """A header tree of eight records r0..r7 in canonical order."""
    src = tmp_path / "src"
    for k, x in enumerate(ecgs):
        _write(src, f"r{k}", x, CANONICAL_LEADS)
    return src


def _same_cache(a, b):
    for name in CACHE_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_archive_order_gives_same_cache_as_canonical(tmp_path, ecgs):
    order = [CANONICAL_LEADS.index(n) for n in ARCHIVE_LEAD_ORDER]
    for k, x in enumerate(ecgs[:3]):
        _write(tmp_path / "canon", f"r{k}", x, CANONICAL_LEADS)
        _write(tmp_path / "archive", f"r{k}", x[order], ARCHIVE_LEAD_ORDER)
    a = prepare_ecg_cache(tmp_path / "canon", tmp_path / "ca", spec=SPEC, num_workers=0, progress=False)
    b = prepare_ecg_cache(tmp_path / "archive", tmp_path / "cb", spec=SPEC, num_workers=0, progress=False)
    assert a.n_written == b.n_written == 3
    sa, sb = np.load(tmp_path / "ca" / "signals.npy"), np.load(tmp_path / "cb" / "signals.npy")
    np.testing.assert_array_equal(sa, sb)
    # a positional reader would swap these two slots: they differ, so the equality above is meaningful
    assert not np.allclose(sa[:, 4], sa[:, 5])


def test_1000hz_lower_case_extra_channels_resampled_and_mapped(tmp_path):
    t1000 = np.arange(4000) / 1000.0
    t100 = np.arange(400) / FS

    def wave(t, k):
        return np.sin(2 * np.pi * (0.9 + 0.3 * k) * t + k) + 0.4 * np.sin(2 * np.pi * (3 + k) * t)

    names = [n.lower() for n in CANONICAL_LEADS]
    perm = np.random.default_rng(0).permutation(12)
    hi = np.stack([wave(t1000, k) for k in range(12)])
    _write(
        tmp_path / "hi",
        "r",
        np.vstack([hi[perm], 0.1 * np.ones((1, 4000))]),
        [names[k] for k in perm] + ["resp"],
        fs=1000,
    )
    _write(tmp_path / "lo", "r", np.stack([wave(t100, k) for k in range(12)]), CANONICAL_LEADS, fs=FS)
    hi_rep = prepare_ecg_cache(tmp_path / "hi", tmp_path / "chi", spec=SPEC, num_workers=0, progress=False)
    prepare_ecg_cache(tmp_path / "lo", tmp_path / "clo", spec=SPEC, num_workers=0, progress=False)
    assert hi_rep.n_written == 1
    a, b = np.load(tmp_path / "chi" / "signals.npy")[0], np.load(tmp_path / "clo" / "signals.npy")[0]
    assert a.shape == (12, 300)
    for k in range(12):  # each slot matches its own lead, not another one
        corr = np.corrcoef(a[k, 30:-30], b[k, 30:-30])[0, 1]
        assert corr > 0.99, (CANONICAL_LEADS[k], corr)


def test_bad_records_are_skipped_with_reasons(folder, ecgs, tmp_path):
    (folder / "r1.hea").write_text("this is not a header\n")
    dat = folder / "r2.dat"
    dat.write_bytes(dat.read_bytes()[:100])
    x = ecgs[3].copy()
    x[4] = np.nan
    _write(folder, "r3", x, CANONICAL_LEADS)
    x = ecgs[4].copy()
    x[8] = 0.2
    _write(folder, "r4", x, CANONICAL_LEADS)
    rep = prepare_ecg_cache(folder, tmp_path / "c", spec=SPEC, num_workers=0, progress=False, part_size=3)
    reasons = dict(rep.skipped)
    assert rep.n_input == 8 and rep.n_written == 4 and rep.n_written + rep.n_skipped == rep.n_input
    assert reasons["r1"].startswith("unreadable") and reasons["r2"].startswith("unreadable")
    assert reasons["r3"] == "all_nan_lead: aVL" and reasons["r4"] == "flat_lead: V3"
    qc = pd.read_csv(tmp_path / "c" / "qc.csv", dtype=str, keep_default_na=False)
    assert list(qc.record_id) == [f"r{k}" for k in range(8)]
    assert list(qc.status) == ["ok", "skipped", "skipped", "skipped", "skipped", "ok", "ok", "ok"]
    index = pd.read_csv(tmp_path / "c" / "index.csv", dtype=str)
    assert list(index.record_id) == ["r0", "r5", "r6", "r7"]
    assert np.load(tmp_path / "c" / "signals.npy").shape == (4, 12, 300)
    assert not (tmp_path / "c" / "parts").exists()


def test_interrupted_prepare_resumes_to_identical_cache(folder, tmp_path):
    full = prepare_ecg_cache(folder, tmp_path / "full", spec=SPEC, num_workers=0, progress=False, part_size=3)
    first = prepare_ecg_cache(
        folder, tmp_path / "res", spec=SPEC, num_workers=0, progress=False, part_size=3, max_parts=1
    )
    assert not first.complete and first.parts_done == 1 and first.parts_total == 3
    assert not (tmp_path / "res" / "spec.json").exists()
    done_part = tmp_path / "res" / "parts" / "part_000000.npy"
    stamp = done_part.stat().st_mtime_ns
    (tmp_path / "res" / "parts" / "part_000001.npy").write_bytes(b"half-written, no done marker")
    second = prepare_ecg_cache(
        folder, tmp_path / "res", spec=SPEC, num_workers=0, progress=False, part_size=3, keep_parts=True
    )
    assert done_part.stat().st_mtime_ns == stamp  # the finished part was not redone
    assert second.complete and second.n_written == full.n_written == 8
    _same_cache(tmp_path / "full", tmp_path / "res")
    again = prepare_ecg_cache(folder, tmp_path / "res", spec=SPEC, num_workers=0, progress=False, part_size=3)
    assert again.complete and again.n_written == 8
    with pytest.raises(ValueError, match="other inputs or spec"):
        prepare_ecg_cache(
            folder, tmp_path / "res", spec=PreprocessSpec(target_fs=FS, target_length=200), progress=False
        )


def test_shards_merge_equals_single_run_and_parallel_equals_serial(folder, tmp_path):
    prepare_ecg_cache(folder, tmp_path / "one", spec=SPEC, num_workers=0, progress=False, part_size=2)
    for i in (1, 0):
        rep = prepare_ecg_cache(
            folder, tmp_path / "sh", spec=SPEC, num_workers=0, progress=False, part_size=2, num_shards=2, shard_index=i
        )
        assert not rep.complete and rep.parts_total == 2
    with pytest.raises(ValueError, match="shard_index"):
        prepare_ecg_cache(folder, tmp_path / "sh", spec=SPEC, progress=False, num_shards=2)
    merged = merge_shards(tmp_path / "sh")
    assert merged.complete and merged.n_written == 8
    _same_cache(tmp_path / "one", tmp_path / "sh")
    prepare_ecg_cache(folder, tmp_path / "par", spec=SPEC, num_workers=2, progress=False, part_size=2)
    _same_cache(tmp_path / "one", tmp_path / "par")


def test_merge_refuses_missing_shards(folder, tmp_path):
    prepare_ecg_cache(folder, tmp_path / "sh", spec=SPEC, num_workers=0, progress=False, num_shards=3, shard_index=0)
    with pytest.raises(RuntimeError, match="missing"):
        merge_shards(tmp_path / "sh")


def test_cli_writes_cache(folder, tmp_path):
    out = tmp_path / "cli"
    code = main(
        [
            str(folder),
            str(out),
            "--workers",
            "0",
            "--target-fs",
            "100",
            "--target-length",
            "300",
            "--no-progress",
            "--leads",
            "6L",
        ]
    )
    assert code == 0
    meta = json.loads((out / "spec.json").read_text())
    assert meta["lead_names"] == list(CANONICAL_LEADS) and meta["n_written"] == 8 and meta["shape"] == [8, 12, 300]
    assert meta["fingerprint"] == SPEC.fingerprint() and meta["leads"] == list(CANONICAL_LEADS[:6])


def test_real_records_cache_round_trip(cinc_dir, tmp_path):
    refs = list_records(cinc_dir)[:4]
    rep = prepare_ecg_cache(refs, tmp_path / "real", num_workers=0, progress=False)
    assert rep.n_written == 4
    store = np.load(tmp_path / "real" / "signals.npy", mmap_mode="r")
    assert store.shape == (4, 12, 5000) and store.dtype == np.float32
    for k, ref in enumerate(refs):
        raw = read_record(ref.path)
        direct = preprocess_record(raw.signals, raw.fs, raw.channel_names)
        np.testing.assert_array_equal(store[k], direct.signals.astype(np.float32))
        assert np.abs(store[k].std(axis=-1) - 1).max() < 1e-4


def test_no_record_passing_gives_an_empty_but_complete_cache(tmp_path, ecgs):
    _write(tmp_path / "src", "r0", ecgs[0][:2], ["I", "II"])
    rep = prepare_ecg_cache(tmp_path / "src", tmp_path / "c", spec=SPEC, num_workers=0, progress=False)
    assert rep.complete and rep.n_written == 0 and rep.skipped == [("r0", "missing_lead: III")]
    assert np.load(tmp_path / "c" / "signals.npy").shape == (0, 12, 300)
    derived = prepare_ecg_cache(
        tmp_path / "src", tmp_path / "d", spec=SPEC, leads="6L", num_workers=0, progress=False, overwrite=True
    )
    assert derived.n_written == 0
    spec = PreprocessSpec(target_fs=FS, target_length=300, derive_limb_leads=True)
    rep = prepare_ecg_cache(tmp_path / "src", tmp_path / "e", spec=spec, leads="6L", num_workers=0, progress=False)
    index = pd.read_csv(tmp_path / "e" / "index.csv")
    assert rep.n_written == 1 and index[[f"present_{n}" for n in CANONICAL_LEADS]].to_numpy().tolist() == [
        [1] * 6 + [0] * 6
    ]
