"""The real-ECG benchmark: label parsing on the real table, the missing-data exit code and a --small run."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers.scripts import load_benchmark

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "real_ecg.py"


def _ludb() -> Path | None:
    here = Path(__file__).resolve().parents[2]
    for base in [here, *here.parents]:
        candidate = base.parent / "shared" / "data" / "ecg" / "ludb"
        if (candidate / "ludb.csv").is_file():
            return candidate
    return None


def _module():
    return load_benchmark("real_ecg")


def test_missing_data_exits_with_code_2(tmp_path, capsys):
    code = _module().main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--data" in err and "not found" in err
    assert not (tmp_path / "out").exists()  # nothing is written before the data check


def test_label_counts_on_the_real_table():
    ludb = _ludb()
    if ludb is None:
        pytest.skip("LUDB not found at ../shared/data/ecg/ludb")
    labels = _module().ludb_labels(ludb / "ludb.csv")
    assert len(labels) == 160
    assert labels["sinus"].sum() == 112
    assert labels["afib"].sum() == 14
    assert labels["lad"].notna().sum() == 61 + 51 and labels["lad"].sum() == 61
    assert labels["lvh"].sum() == 93
    assert labels["irbbb"].sum() == 27


@pytest.mark.slow
def test_small_run_writes_every_table_and_figure(tmp_path):
    ludb = _ludb()
    if ludb is None:
        pytest.skip("LUDB not found at ../shared/data/ecg/ludb")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--small", "--data", str(ludb), "--out", str(out), "--n-boot", "100"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "real data, n = 40 LUDB records" in md
    for section in ("Probe AUROC", "Lead-subset robustness", "6 -> 12 generation", "Wave-level attribution"):
        assert section in md
    for name in ("probe_auroc.png", "subset_robustness.png", "generation_examples.png", "wave_attribution.png"):
        assert (out / name).stat().st_size > 1000
    tasks = pd.read_csv(out / "tasks.csv")
    skipped = tasks[tasks.status.str.startswith("skipped")]
    assert (skipped[["n_pos"]].min(axis=1) < 8).all() | ((skipped.n - skipped.n_pos) < 8).all()
    assert "afib" in set(skipped.task)  # 2 positives among the first 40 records
    auroc = pd.read_csv(out / "probe_auroc.csv")
    assert set(auroc.representation) == {
        "lsemvae/concat_means",
        "lsemvae/fused_mean",
        "random/concat_means",
        "random/fused_mean",
    }
    assert auroc.auroc.between(0, 1).all() and (auroc.ci_lo <= auroc.ci_hi).all()
    subsets = pd.read_csv(out / "subset_robustness.csv")
    assert {"12L>12L", "12L>6L", "12L>II", "12L>I", "6L>6L", "6L>II", "6L>I"} <= set(subsets.setting)
    gen = pd.read_csv(out / "generation.csv").set_index(["method", "lead"])
    # the least-squares limb->V map carries real information; a time-aligned mean template does not
    assert gen.loc[("linear (limb->V)", "all"), "pearson_r"] > gen.loc[("mean template", "all"), "pearson_r"] + 0.2
    waves = pd.read_csv(out / "wave_share.csv")
    assert set(waves.wave) == {"P", "QRS", "T"} and (waves.time_share.dropna() > 0).all()
