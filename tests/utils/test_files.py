"""Tests of kale_ext.utils.files: atomic writes and stable hashes."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kale_ext.utils.files import (
    atomic_save_npy,
    atomic_write,
    atomic_write_text,
    canonical_json,
    concat_npy,
    file_lock,
    npy_size,
    remove_stale_temps,
    short_hash,
)


def test_atomic_write_text_and_npy(tmp_path):
    target = atomic_write_text(tmp_path / "sub" / "a.txt", "hello")
    assert target.read_text() == "hello"
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    atomic_save_npy(tmp_path / "a.npy", arr)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), arr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "sub"]


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = atomic_write_text(tmp_path / "a.txt", "old")

    def _fail(path):
        path.write_text("partial")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write(target, _fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_short_hash_is_order_independent_and_sensitive():
    a = short_hash({"x": 1, "y": [1, 2]})
    assert a == short_hash({"y": [1, 2], "x": 1})
    assert a != short_hash({"x": 1, "y": [2, 1]})
    assert len(a) == 16 and len(short_hash("s", length=8)) == 8
    assert canonical_json({"b": 1, "a": 2}) == '{"a":2,"b":1}'


def test_temp_names_carry_the_pid_and_stale_ones_are_removed(tmp_path):
    seen = []
    atomic_write(tmp_path / "a.bin", lambda p: seen.append(p.name) or p.write_bytes(b"x"))
    assert seen[0].startswith(f".a.bin.{os.getpid()}.") and seen[0].endswith(".tmp")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".a.bin.{int(dead.stdout)}.abc123.tmp"
    mine = tmp_path / f".a.bin.{os.getpid()}.def456.tmp"
    stale.write_bytes(b"left by a dead writer")
    mine.write_bytes(b"being written")
    assert remove_stale_temps(tmp_path) == [stale]
    assert mine.exists() and not stale.exists()


def test_concat_npy_equals_np_save_of_the_concatenation(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=(n, 3, 5)).astype(np.float16) for n in (4, 0, 7, 1)]
    paths = []
    for k, part in enumerate(parts):
        paths.append(atomic_save_npy(tmp_path / f"p{k}.npy", part))
    shape = concat_npy(paths, tmp_path / "all.npy")
    np.save(tmp_path / "ref.npy", np.concatenate(parts))
    assert shape == (12, 3, 5)
    assert (tmp_path / "all.npy").read_bytes() == (tmp_path / "ref.npy").read_bytes()
    assert npy_size(shape, np.float16) == (tmp_path / "ref.npy").stat().st_size
    atomic_save_npy(tmp_path / "bad.npy", np.zeros((2, 3, 4), np.float16))
    with pytest.raises(ValueError, match="bad.npy"):
        concat_npy([paths[0], tmp_path / "bad.npy"], tmp_path / "x.npy")
    truncated = tmp_path / "cut.npy"
    truncated.write_bytes((tmp_path / "p0.npy").read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        concat_npy([truncated], tmp_path / "y.npy")
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "y.npy").exists()


_HOLD = """
import sys, time
from kale_ext.utils.files import file_lock
with file_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_file_lock_excludes_another_process_and_names_the_lock(tmp_path):
    lock = tmp_path / ".lock"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(lock), "30"], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TimeoutError, match=rf"pid {holder.pid}\) holds the lock {lock}"):
            with file_lock(lock, timeout_s=0.3, poll_s=0.05):
                pass
    finally:
        holder.kill()
        holder.wait()
    with file_lock(lock, timeout_s=5):  # released by the exit of the holder, though its file stays
        assert lock.read_text() == str(os.getpid())


def test_file_digest_follows_the_bytes_and_tells_a_missing_file(tmp_path):
    from kale_ext.utils.files import file_digest

    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("id,label\n1,0\n")
    b.write_text("id,label\n1,1\n")
    assert file_digest(a) == file_digest(a) != file_digest(b)
    assert file_digest(a, b) != file_digest(b, a)  # order matters
    assert file_digest(tmp_path / "missing") != file_digest(a) and len(file_digest(a)) == 16
