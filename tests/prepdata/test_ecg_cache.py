"""Tests of kale_ext.prepdata.ecg_cache: name mapping, resampling, QC, resumption, sharding, CLI and real records."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import wfdb

from kale_ext.loaddata.leads import CANONICAL_LEADS
from kale_ext.loaddata.synthetic import ARCHIVE_LEAD_ORDER, generate_cohort_arrays
from kale_ext.loaddata.wfdb_sources import list_records, read_record
from kale_ext.prepdata.ecg_cache import cache_matches, main, merge_shards, prepare_ecg_cache
from kale_ext.prepdata.ecg_transforms import PreprocessSpec, preprocess_record
from kale_ext.utils.files import file_lock

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


def _qc(cache):
    return pd.read_csv(cache / "qc.csv", dtype=str, keep_default_na=False).set_index("record_id")


def test_header_problems_inverted_and_bad_leads_reach_qc_csv(folder, ecgs, tmp_path, caplog):
    lines = (folder / "r1.hea").read_text().splitlines()
    (folder / "r1.hea").write_text("\n".join(["r1 12"] + lines[1:]) + "\n")  # no sampling frequency
    (folder / "r2.hea").write_bytes(b"")  # zero-byte header
    x = ecgs[3].copy()
    x[3] = -x[3]
    _write(folder, "r3", x, [n if n != "aVR" else "-aVR" for n in CANONICAL_LEADS] + [])
    x = ecgs[4].copy()
    x[8] = np.clip(x[8], *np.quantile(x[8], [1 / 3, 2 / 3]))  # saturated V3
    _write(folder, "r4", x, CANONICAL_LEADS)
    spec = PreprocessSpec(target_fs=FS, target_length=300, mask_bad_leads=True, min_good_leads=10)
    with caplog.at_level("INFO", logger="kale_ext.prepdata.ecg_cache"):
        rep = prepare_ecg_cache(folder, tmp_path / "c", spec=spec, num_workers=0, progress=False)
    qc = _qc(tmp_path / "c")
    assert qc.loc["r1", "reason"].startswith("bad_sampling_rate: header r1.hea gives no sampling frequency")
    assert qc.loc["r2", "reason"] == "unreadable: header r2.hea is empty (0 bytes); re-export the record"
    assert qc.loc["r3", "status"] == "ok" and qc.loc["r3", "notes"] == "inverted channels negated: aVR"
    assert qc.loc["r4", "status"] == "ok" and qc.loc["r4", "lead_qc"].startswith("saturated_lead: V3 (6")
    assert rep.qc_counts == {"bad_sampling_rate": 1, "ok": 6, "unreadable": 1}
    assert rep.masked_leads == {"saturated_lead": 1} and rep.qc_path == (tmp_path / "c" / "qc.csv").resolve()
    index = pd.read_csv(tmp_path / "c" / "index.csv").set_index("record_id")
    assert index.loc["r4", "present_V3"] == 0 and index.loc["r4", "present_V2"] == 1
    store = np.load(tmp_path / "c" / "signals.npy")
    clean = preprocess_record(ecgs[3], FS, CANONICAL_LEADS, spec).signals.astype(np.float32)
    np.testing.assert_allclose(store[list(index.index).index("r3")], clean, atol=2e-2)  # 16-bit rounding only
    assert f"masked leads: saturated_lead 1; reasons per record in {rep.qc_path}" in caplog.text


def test_differently_spelled_path_resumes_and_source_changes_are_named(folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kw = dict(spec=SPEC, num_workers=0, progress=False, part_size=3)
    first = prepare_ecg_cache("src", "res", max_parts=1, **kw)
    assert not first.complete
    spelled = f"{tmp_path}/./src/"
    done = prepare_ecg_cache(spelled, tmp_path / "x" / ".." / "res", **kw)
    assert done.complete and done.n_written == 8
    assert cache_matches("res", folder, SPEC, "12L") is True
    r5 = folder / "r5.dat"
    data = bytearray(r5.read_bytes())
    data[40] ^= 1
    r5.write_bytes(bytes(data))
    os.utime(r5, ns=(r5.stat().st_atime_ns, r5.stat().st_mtime_ns + 10**9))
    why = cache_matches("res", folder, SPEC, "12L")
    assert isinstance(why, str) and "1 changed on disk (first: r5)" in why
    assert "target_length 300 -> 200" in cache_matches("res", folder, PreprocessSpec(target_fs=FS, target_length=200))
    with pytest.raises(ValueError, match=r"1 changed on disk \(first: r5\).*overwrite=True"):
        prepare_ecg_cache(folder, "res", **kw)
    rebuilt = prepare_ecg_cache(folder, "res", overwrite=True, **kw)
    assert rebuilt.complete and cache_matches("res", folder, SPEC) is True
    (folder / "r0.hea").rename(folder / "r0.HEA")  # same record, listed through its upper-case header
    assert cache_matches("res", folder, SPEC) is True
    _write(folder, "r8", np.zeros((12, 400)) + 0.1, CANONICAL_LEADS)
    assert "1 added (first: r8)" in cache_matches("res", folder, SPEC)
    code = main([str(folder), "res", "--workers", "0", "--target-fs", "100", "--target-length", "300",
                 "--no-progress", "--overwrite", "--part-size", "3"])  # fmt: skip
    assert code == 0 and cache_matches("res", folder, SPEC) is True


def test_free_space_is_checked_before_assembly(folder, tmp_path):
    kw = dict(spec=SPEC, num_workers=0, progress=False, part_size=3)
    with pytest.raises(OSError, match=r"not enough free space .*: [\d,]+ bytes needed, 1,000 available") as err:
        prepare_ecg_cache(folder, tmp_path / "c", free_space=lambda path: 1000, **kw)
    assert err.value.errno == errno.ENOSPC
    assert not (tmp_path / "c" / "signals.npy").exists() and len(list((tmp_path / "c" / "parts").glob("*.done"))) == 3
    rep = prepare_ecg_cache(folder, tmp_path / "c", free_space=lambda path: 10**12, **kw)
    assert rep.complete and rep.n_written == 8


def test_assembly_uses_a_private_temporary_name(folder, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    foreign = out / ".signals.npy.tmp"  # another writer's file with the old fixed name
    foreign.write_bytes(b"not mine")
    prepare_ecg_cache(folder, out, spec=SPEC, num_workers=0, progress=False)
    assert foreign.read_bytes() == b"not mine"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p != foreign) == [".lock"]


_BUILD = """
import json, logging, sys
logging.basicConfig(level=logging.INFO)
from kale_ext.prepdata.ecg_cache import prepare_ecg_cache
from kale_ext.prepdata.ecg_transforms import PreprocessSpec
try:
    rep = prepare_ecg_cache(sys.argv[1], sys.argv[2], spec=PreprocessSpec(target_fs=100.0, target_length=300),
                            num_workers=0, progress=False, part_size=1, lock_timeout_s=float(sys.argv[3]))
    print(json.dumps({"n_written": rep.n_written, "elapsed": rep.elapsed_s}))
except TimeoutError as err:
    print(json.dumps({"error": str(err)}))
"""


def test_two_concurrent_builders_one_waits_nothing_lost(folder, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "c"
    with file_lock(out / ".lock"):  # both builders start while the folder is locked, so both must wait
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _BUILD, str(folder), str(out), "120"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for _ in range(2)
        ]
        for proc in procs:
            while "waiting for the lock" not in (line := proc.stderr.readline()):
                assert line, "a builder ended without waiting for the lock"
    outputs = [p.communicate() for p in procs]
    assert [json.loads(o)["n_written"] for o, _ in outputs] == [8, 8]
    # exactly one built the cache; the other found it complete once the lock was free
    assert sorted("already complete" in e for _, e in outputs) == [False, True]
    prepare_ecg_cache(folder, tmp_path / "ref", spec=SPEC, num_workers=0, progress=False, part_size=1)
    _same_cache(tmp_path / "ref", out)
    with file_lock(out / ".lock"):  # a builder that cannot wait gets the lock file's name
        proc = subprocess.run(
            [sys.executable, "-c", _BUILD, str(folder), str(out), "0.2"], capture_output=True, env=env
        )
    err = json.loads(proc.stdout)["error"]
    assert f"holds the lock {out / '.lock'}" in err and f"pid {os.getpid()}" in err


def test_changed_or_damaged_cache_is_detected_on_reuse_and_named(folder, tmp_path):
    from kale_ext.loaddata.ecg_dataset import ECGLeadDataset

    out = tmp_path / "cache"
    prepare_ecg_cache(folder, out, spec=SPEC, leads="12L", num_workers=0, progress=False)
    assert cache_matches(out, folder, SPEC, "12L") is True
    signals = np.load(out / "signals.npy", mmap_mode="r+")
    signals[0, 0, :200] = 1e6  # values overwritten after the build
    signals.flush()
    del signals
    why = cache_matches(out, folder, SPEC, "12L")
    assert why is not True and "signals.npy" in why and "delete the cache folder" in why
    with pytest.raises(ValueError, match="changed since the cache was built"):
        ECGLeadDataset(out, leads="12L", verify=True)
    # a rebuild with overwrite replaces it; a reuse without overwrite refuses
    with pytest.raises(ValueError, match="signals.npy"):
        prepare_ecg_cache(folder, out, spec=SPEC, leads="12L", num_workers=0, progress=False)
    prepare_ecg_cache(folder, out, spec=SPEC, leads="12L", num_workers=0, progress=False, overwrite=True)
    assert cache_matches(out, folder, SPEC, "12L") is True
    # a damaged .npy header: the file and the advice are named, not "mmap length is greater than file size"
    raw = bytearray((out / "signals.npy").read_bytes())
    raw[10:40] = b"{'descr': '<f4', 'shape': (99,"
    (out / "signals.npy").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"signals.npy .*delete the cache folder"):
        ECGLeadDataset(out, leads="12L")
