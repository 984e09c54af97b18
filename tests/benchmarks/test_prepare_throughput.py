"""The assembly-memory part of the data benchmark: peak RSS stays flat with the cache size, a memory map's grows."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "prepare_throughput.py"


@pytest.mark.slow
def test_assembly_peak_memory_does_not_grow_with_the_cache():
    if not Path("/proc/self/status").exists():
        pytest.skip("peak RSS is read from /proc (Linux)")
    env = {"PYTHONPATH": str(SCRIPT.parents[1]), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--small", "--assembly-only"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])["assembly"]
    assert summary["sizes"] == [200, 1600] and summary["T"] == 500
    by = {(r["mode"], r["records"]): r for r in summary["results"]}
    small, large = by[("sequential", 200)], by[("sequential", 1600)]
    assert large["bytes"] > 7 * small["bytes"]  # the caches really differ eightfold in size
    assert summary["ratio"]["sequential"] == pytest.approx(large["peak_rss"] / small["peak_rss"])
    assert summary["ratio"]["sequential"] <= 1.10
    # the same measurement sees the growth of a writable memory map (about the 35 MiB of the large cache)
    mib = 1 << 20
    assert by[("memmap", 1600)]["peak_rss"] - by[("memmap", 1600)]["rss_before"] > 20 * mib
    assert large["peak_rss"] - large["rss_before"] < 20 * mib
    assert any(line.startswith("peak RSS ratio 1,600 / 200 records, sequential") for line in lines)
