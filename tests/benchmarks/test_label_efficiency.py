"""The label-efficiency benchmark: missing-data exit code, label draws, and a --small run on the real records."""

import numpy as np
import pandas as pd
from helpers.scripts import load_benchmark


def _module():
    return load_benchmark("label_efficiency")


def test_missing_data_exits_with_code_2(tmp_path, capsys):
    code = _module().main(["--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "PTB-XL not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_fraction_draws_are_stratified_nested_sizes_and_seeded():
    draw = _module().draw_fraction
    y = np.array([0] * 80 + [1] * 20)
    small = draw(y, 0.1, 0)
    assert (y[small] == 1).sum() == 2 and (y[small] == 0).sum() == 8
    assert np.array_equal(draw(y, 0.1, 0), small)
    assert not np.array_equal(draw(y, 0.1, 1), small)
    assert len(draw(y, 1.0, 3)) == 100
    rare = np.array([0] * 50 + [1] * 3)
    assert (rare[draw(rare, 0.1, 0)] == 1).sum() == 2  # at least two of a rare class


def test_small_run_writes_tables_and_figures(tmp_path, shared_ecg_with_ptbxl):
    root = shared_ecg_with_ptbxl
    out = tmp_path / "out"
    assert _module().main(["--small", "--root", str(root), "--out", str(out), "--n-boot", "50"]) == 0
    rows = pd.read_csv(out / "label_efficiency.csv")
    assert set(rows.method) == {"lsemvae", "random encoder"}
    assert set(rows.leads) == {"6L", "12L"} and set(rows.fraction) == {0.1, 1.0}
    assert rows.auroc.between(0, 1).all() and (rows.ci_lo <= rows.auroc).all() and (rows.auroc <= rows.ci_hi).all()
    gen = pd.read_csv(out / "generation.csv")
    assert {"linear map (limb -> V)", "lsemvae"} <= set(gen.method)
    assert (out / "label_efficiency_NORM.png").stat().st_size > 1000
    text = (out / "results.md").read_text()
    assert "not a result" in text and "AUROC at 10% of the training labels" in text
