"""Tests of kale_ext.utils.distributed: rank from the launcher's environment, waiting for a marker."""

import threading
import time

import pytest

from kale_ext.utils.distributed import global_rank, wait_for


def test_global_rank_reads_the_launcher_variables(monkeypatch):
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert global_rank() == 0
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert global_rank() == 3
    monkeypatch.setenv("RANK", "5")  # RANK wins over the scheduler's variable
    assert global_rank() == 5
    monkeypatch.setenv("RANK", "x")
    assert global_rank() == 3


def test_wait_for_returns_when_the_marker_appears_and_times_out_otherwise(tmp_path):
    marker = tmp_path / "DONE"
    threading.Timer(0.2, marker.write_text, args=("ok",)).start()
    start = time.time()
    wait_for(marker, timeout_s=5, poll_s=0.05)
    assert marker.exists() and time.time() - start < 5
    with pytest.raises(TimeoutError, match="one process"):
        wait_for(tmp_path / "never", timeout_s=0.1, poll_s=0.05)
