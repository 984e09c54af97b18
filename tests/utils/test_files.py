"""Tests of kale_ext.utils.files: atomic writes and stable hashes."""

import numpy as np
import pytest

from kale_ext.utils.files import atomic_save_npy, atomic_write, atomic_write_text, canonical_json, short_hash


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
