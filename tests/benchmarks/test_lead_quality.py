"""The deployed-setting benchmark (benchmarks/lead_quality.py): missing data, arm names, and a --small run on the
real records that writes every figure and table it promises."""

import json
import math

from helpers.scripts import load_benchmark


def _module():
    return load_benchmark("lead_quality")


def test_missing_data_exits_with_code_2(tmp_path, capsys):
    assert _module().main(["--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "PTB-XL not found" in capsys.readouterr().err


def test_unknown_arms_exit_with_code_2(tmp_path, capsys, shared_ecg_with_ptbxl):
    root = shared_ecg_with_ptbxl
    assert _module().main(["--root", str(root), "--arms", "plain,nonsense", "--out", str(tmp_path / "o")]) == 2
    assert "unknown arms" in capsys.readouterr().err


def test_arms_differ_from_the_preset_in_one_named_switch_each():
    module = _module()
    assert all("," not in arm for arm in module.ARMS)  # --arms is comma-separated
    assert module.ARMS["plain"] == {}
    for arm in module.SMALL_ARMS:
        assert arm in module.ARMS
    for switches in module.ARMS.values():
        assert set(switches) <= set(module._BASE)


def test_small_run_measures_gate_posterior_and_downstream(tmp_path, shared_ecg_with_ptbxl):
    root = shared_ecg_with_ptbxl
    module = _module()
    out = tmp_path / "out"
    assert module.main(["--small", "--root", str(root), "--out", str(out), "--n-boot", "50"]) == 0
    payload = json.loads((out / "results.json").read_text())
    results, summary = payload["results"], payload["summary"]
    assert set(results) == set(module.SMALL_ARMS) and payload["small"]
    for arm, runs in results.items():
        assert [r["seed"] for r in runs] == [0]
        r = runs[0]
        gated = r["switches"]["fusion"] == "gate"
        assert (r["gate_12L"] is not None) == gated
        if gated:
            for kind in module.CORRUPTION_KINDS:
                g = r["gate_6L"][kind]
                assert 0.0 <= g["share_below_third"] <= 1.0 and g["median_ratio"] >= 0
                assert 0.0 < g["weight_clean"] < 1.0
            for weights in r["figure"].values():
                assert len(weights) == 13 and abs(sum(weights) - 1.0) < 1e-4  # 12 leads + PoE, a distribution
        assert r["six_lead"]["shift"] >= 0 and -1 <= r["six_lead"]["centred_cosine"] <= 1
        inputs = {(row["task"], row["input"]) for row in r["downstream"]}
        assert inputs == {(t, i) for t in module.TASKS for i in ("clean", *module.CORRUPTION_KINDS)}
        for row in r["downstream"]:
            assert 0 <= row["dev_auroc"] <= 1 and row["test_lo"] <= row["test_auroc"] <= row["test_hi"]
        assert module.arm_path(out, arm, 0).is_file()
    assert summary["choices"]["6-lead pre-training"] == "plain"  # the only item-1 arm in a small run
    text = (out / "results.md").read_text()
    assert "not a result" in text and "| arm | dev AUROC clean |" in text
    assert (out / "gate_weights.png").stat().st_size > 1000
    # a rerun resumes: every arm is read back, none is pre-trained again
    before = {p.name: p.stat().st_mtime_ns for p in (out / "arms").iterdir()}
    assert module.main(["--small", "--root", str(root), "--out", str(out), "--n-boot", "50"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "arms").iterdir()} == before


def _fake_run(module, arm, seed, dev_clean, dev_corrupted=0.6):
    inputs = ("clean", *module.CORRUPTION_KINDS)
    rows = [{"task": t, "input": i, "dev_auroc": dev_clean if i == "clean" else dev_corrupted, "test_auroc": 0.7,
             "test_lo": 0.6, "test_hi": 0.8} for t in module.TASKS for i in inputs]  # fmt: skip
    gate = {k: {"share_below_third": 0.5, "median_ratio": 0.5} for k in module.CORRUPTION_KINDS}
    switches = {**module._BASE, **module.ARMS[arm]}
    gated = switches["fusion"] == "gate"
    return {"arm": arm, "seed": seed, "switches": switches, "downstream": rows, "gate_12L": gate if gated else None,
            "gate_6L": gate if gated else None, "six_lead": {"shift": 0.1, "centred_cosine": 0.9}}  # fmt: skip


def test_a_departure_is_chosen_only_when_it_wins_at_every_seed():
    module = _module()
    runs = {
        "plain": [_fake_run(module, "plain", 0, 0.70), _fake_run(module, "plain", 1, 0.70)],
        "lead dropout 0.5": [
            _fake_run(module, "lead dropout 0.5", 0, 0.75),
            _fake_run(module, "lead dropout 0.5", 1, 0.69),
        ],
        "subset terms": [_fake_run(module, "subset terms", 0, 0.71), _fake_run(module, "subset terms", 1, 0.71)],
        "corruption": [_fake_run(module, "corruption", 0, 0.70)],
        "corruption / balance x3": [_fake_run(module, "corruption / balance x3", 0, 0.72)],
        "corruption / balance 0": [_fake_run(module, "corruption / balance 0", 0, 0.71, 0.5)],
        "corruption / PoE only": [_fake_run(module, "corruption / PoE only", 0, 0.9)],
    }
    summary = module.summarise(runs)
    # lead dropout has the higher mean (0.72 > 0.71) but loses at seed 1; subset terms wins at both seeds
    assert summary["arms"]["lead dropout 0.5"]["dev_clean"] > summary["arms"]["subset terms"]["dev_clean"]
    assert summary["choices"]["6-lead pre-training"] == "subset terms"
    runs["subset terms"][1] = _fake_run(module, "subset terms", 1, 0.70)  # a tie is not a win
    assert module.summarise(runs)["choices"]["6-lead pre-training"] == "plain"
    # balance: x3 beats x1 on clean + corrupted; balance 0 does not (its corrupted AUROC is lower)
    assert summary["choices"]["balance for 'corruption'"] == "corruption / balance x3"
    assert math.isnan(summary["arms"]["corruption / PoE only"]["share_below_third_12L"])  # no gate to read
    assert summary["arms"]["plain"]["seeds"] == 2 and set(summary["arms"]["plain"]["by_seed"]) == {"0", "1"}
