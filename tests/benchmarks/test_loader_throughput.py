"""The loader benchmark runs end to end at its small size and prints consistent samples/s and ratios."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "loader_throughput.py"


@pytest.mark.slow
def test_small_benchmark_prints_samples_per_second_and_ratios():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    rows = {(r["loader"], r["cache_dtype"]): r for r in summary["results"]}
    for dtype in ("float16", "float32"):
        base = rows["DataLoader (per item)", dtype]
        assert base["ratio_vs_dataloader"] == pytest.approx(1.0)
        for mode in ("BatchStream resident", "BatchStream streaming (2 threads)"):
            row = rows[mode, dtype]
            assert row["repeats"] >= 3 and 0 < row["min"] <= row["median"] <= row["max"]
            assert row["length"] == 5000 and row["records"] == 512
            assert row["ratio_vs_dataloader"] == pytest.approx(row["median"] / base["median"])
            assert row["ratio_vs_target"] == pytest.approx(row["median"] / summary["target"])
            assert f"ratio {mode} {dtype} / DataLoader: {row['ratio_vs_dataloader']:.2f}" in lines
