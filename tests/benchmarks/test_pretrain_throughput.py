"""The throughput benchmark runs end to end at a tiny size on the CPU and prints consistent figures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "pretrain_throughput.py"


@pytest.mark.slow
def test_small_benchmark_prints_samples_per_second_and_ratio():
    pytest.importorskip("kale.embed.signal_cnn")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--small", "--variants", "loop,lsemvae:conv,lsemvae:matmul"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["device"] == "cpu"
    results = {r["variant"]: r for r in summary["results"]}
    assert set(results) == {"loop", "lsemvae:conv", "lsemvae:matmul"}
    for res in results.values():
        assert "error" not in res
        assert res["samples_per_s"] > 0 and res["step_ms"] > 0
        assert res["loss"] == res["loss"]  # not NaN
    loop = results["loop"]["samples_per_s"]
    ratio = results["lsemvae:conv"]["ratio_vs_loop"]
    assert ratio == pytest.approx(results["lsemvae:conv"]["samples_per_s"] / loop)
    assert any(line.startswith("ratio lsemvae:conv / loop") for line in lines)
    # Both LSEMVAE implementations start from the same weights and compute the same maths.
    assert results["lsemvae:conv"]["loss"] == pytest.approx(results["lsemvae:matmul"]["loss"], rel=1e-4)


@pytest.mark.slow
def test_end_to_end_mode_times_the_pipeline_step_from_a_float16_cache(tmp_path):
    pytest.importorskip("kale.embed.signal_cnn")
    args = ["--end-to-end", str(tmp_path / "cache"), "--make-cache", "48", "--input-dim", "64", "--latent-dim", "8",
            "--batch", "8", "--steps", "2", "--warmup", "1", "--device", "cpu", "--repeats", "3", "--count-flops",
            "--variants", "loop,lsemvae:conv"]  # fmt: skip
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    results = {r["variant"]: r for r in summary["results"]}
    for res in results.values():
        assert "error" not in res and len(res["repeats"]) == 3
        assert res["spread"][0] <= res["samples_per_s"] <= res["spread"][1]
        assert res["cache_dtype"] == "torch.float16" and res["flops_per_sample"] > 0
    assert results["lsemvae:conv"]["ratio_vs_loop"] > 0 and "eager against eager" in proc.stdout


@pytest.mark.slow
def test_window_option_reports_samples_and_windows_per_second_for_records_and_windows():
    """--window times every variant on whole records and on random windows in one run; ratios are like for like."""
    pytest.importorskip("kale.embed.signal_cnn")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--small", "--window", "40", "--variants", "loop,lsemvae:conv"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["window"] == 40 and summary["input_dim"] == 64
    rows = {(r["variant"], r["input"]): r for r in summary["results"]}
    assert set(rows) == {("loop", "record"), ("lsemvae:conv", "record"), ("loop", "window"), ("lsemvae:conv", "window")}
    for (_, kind), res in rows.items():
        assert "error" not in res
        assert res["length"] == (40 if kind == "window" else 64)
        assert res["samples_per_s"] > 0 and res["windows_per_s"] == res["samples_per_s"]
        assert res["timepoints_per_s"] == pytest.approx(res["samples_per_s"] * res["length"])
        assert res["loss"] == res["loss"]
    for kind in ("record", "window"):
        ratio = rows[("lsemvae:conv", kind)]["samples_per_s"] / rows[("loop", kind)]["samples_per_s"]
        assert rows[("lsemvae:conv", kind)]["ratio_vs_loop"] == pytest.approx(ratio)
    assert "windows/s (windows of 40" in proc.stdout and "(windows of 40)" in proc.stdout


@pytest.mark.slow
def test_end_to_end_window_of_any_length_from_the_resident_cache(tmp_path):
    """The pipeline step on 37-sample windows (no multiple of 8 or of a tile) cropped from a resident float16 cache."""
    args = ["--end-to-end", str(tmp_path / "cache"), "--make-cache", "24", "--input-dim", "64", "--latent-dim", "8",
            "--batch", "8", "--steps", "2", "--warmup", "1", "--device", "cpu", "--repeats", "1", "--resident", "yes",
            "--window", "37", "--variants", "lsemvae:conv"]  # fmt: skip
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {r["input"]: r for r in summary["results"]}
    assert set(rows) == {"record", "window"}
    assert all("error" not in r and r["resident"] is True for r in rows.values())
    assert rows["window"]["length"] == 37 and rows["window"]["windows_per_s"] > 0
    assert rows["record"]["length"] == 64 and rows["window"]["loss"] == rows["window"]["loss"]
