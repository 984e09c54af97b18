"""The lead-quality benchmark: a --small run (synthetic records) writes every figure it promises."""

import json

from helpers.scripts import load_benchmark


def _module():
    return load_benchmark("lead_quality")


def test_small_run_reports_both_arms_and_every_kind(tmp_path, capsys):
    module = _module()
    assert module.main(["--small", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "results.json").read_text())
    arms = summary["results"]
    assert len(arms) == 3 and summary["held_out_records"] > 0
    for res in arms.values():
        for kind in module.CORRUPTION_KINDS:
            r = res[kind]
            assert 0.0 <= r["share_below_third"] <= 1.0 and r["median_ratio"] >= 0
            assert 0.0 < r["weight_clean"] < 1.0 and 0.0 <= r["poe_corrupted"] <= 1.0
        assert res["six_lead"]["shift"] >= 0 and -1 <= res["six_lead"]["centred_cosine"] <= 1
        for weights in res["_figure"].values():
            assert len(weights) == 13 and abs(sum(weights) - 1.0) < 1e-4  # 12 leads + PoE, a distribution
    assert "| arm | kind |" in capsys.readouterr().out


def test_missing_data_exits_with_code_2(tmp_path):
    assert _module().main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
