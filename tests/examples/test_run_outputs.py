"""What a run tells its reader: one headline AUROC everywhere, the endpoint's name, quiet logs, few-step warnings.

One tiny run of examples/lsemvae_ph/main.py with its output redirected (not a terminal), progress bars left on in
the config and TASK.LABEL naming the endpoint.
"""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow
_spec = importlib.util.spec_from_file_location("e2e_main_tests", Path(__file__).with_name("test_lsemvae_ph_main.py"))
_e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_e2e)  # the tiny cohort and the environment of the end-to-end tests
MAIN, ROOT, _env, tiny_opts = _e2e.MAIN, _e2e.ROOT, _e2e._env, _e2e.tiny_opts

LABEL = "LVH"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The tiny run (progress bars on in the config, stdout/stderr pipes), its console and output folder."""
    shared, out = tmp_path_factory.mktemp("shared"), tmp_path_factory.mktemp("run")
    opts = [o if o != "False" or tiny_opts(shared)[i - 1] != "TRAINER.PROGRESS_BAR" else "True"
            for i, o in enumerate(tiny_opts(shared))]  # fmt: skip
    assert opts[opts.index("TRAINER.PROGRESS_BAR") + 1] == "True"
    args = ["--cfg", "6L.yaml", *opts, "TASK.LABEL", LABEL, "OUTPUT.DIR", str(out)]
    proc = subprocess.run([sys.executable, str(MAIN), *args], capture_output=True, text=True, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"out": out, "stdout": proc.stdout, "stderr": proc.stderr}


def _number(text: str, pattern: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not found in {text[:500]!r}"
    return float(match.group(1))


def test_headline_auroc_is_the_same_in_console_results_metrics_and_roc_legend(run):
    out = run["out"]
    metrics = json.loads((out / "metrics.json").read_text())
    head = metrics["headline"]
    assert head["name"] == "pooled out-of-fold AUROC, subject level"
    assert head["value"] == metrics["summary"]["auroc"]["pooled"]
    assert head["ci95"] == metrics["summary"]["auroc"]["ci95"]
    assert head["fold_mean"] == metrics["summary"]["auroc"]["mean"]
    assert head["n"] == metrics["n_subjects"] == head["n_positive"] + head["n_negative"]
    pattern = r"pooled out-of-fold AUROC, subject level:? (\d\.\d{3})"
    console = _number(run["stdout"], pattern)
    results = _number((out / "results.md").read_text(), pattern)
    readme = _number((out / "README.md").read_text(), pattern)
    legend = Image.open(out / "roc.png").text["Description"]
    roc = _number(legend, pattern)
    assert console == results == readme == roc == round(head["value"], 3)
    lo, hi = (f"{v:.3f}" for v in head["ci95"])
    for text in (run["stdout"], (out / "results.md").read_text(), legend):
        assert f"95% CI {lo}-{hi}" in text
    results_md = (out / "results.md").read_text()  # n, class balance and the fold spread beside the headline
    assert f"n = {head['n']} subjects, {head['n_positive']} positive" in results_md
    assert f"fold AUROC mean +- std {head['fold_mean']:.3f} +- {head['fold_std']:.3f}" in results_md


def test_the_endpoint_name_is_in_every_title(run):
    out = run["out"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == LABEL
    assert metrics["environment"]["cpu_threads"] == int(_env()["OMP_NUM_THREADS"])  # what reproducibility needs
    assert (out / "README.md").read_text().splitlines()[0].endswith(f"task {LABEL}")
    assert "task ph" not in (out / "README.md").read_text()
    assert f"## {LABEL}:" in (out / "results.md").read_text()
    assert LABEL in Image.open(out / "roc.png").text["Title"]
    curves = Image.open(out / "training_curves.png").text
    assert LABEL in curves["Title"]
    assert {"pre-training loss per epoch", "gate weights per epoch", "fine-tuning loss per fold"} <= set(
        curves["Description"].split("\n")
    )
    assert run["stdout"].strip().splitlines()[-1].startswith(f"{LABEL}, ")


def test_redirected_logs_have_no_bars_no_repeated_banners_and_a_line_per_epoch(run):
    both = run["stdout"] + run["stderr"]
    assert "\r" not in both  # no progress-bar redraws in a file
    assert "litlogger" not in both and "Tip:" not in both
    assert both.count("GPU available") <= 1  # once per process, not once per Trainer (6 before)
    epochs = re.findall(r"pre-training epoch (\d)/2 \(\d+ steps", run["stdout"])
    assert epochs == ["1", "2"]
    assert (run["out"] / "run.log").read_text().count("pre-training epoch") == 2
    # reconstruction r is said once per epoch, in its own line, not repeated in the metrics line
    metric_lines = [line for line in run["stdout"].splitlines() if "pre-training epoch" in line]
    assert metric_lines and not any("recon_r" in line or "gen_r_6to12" in line for line in metric_lines)
    assert len(re.findall(r"epoch \d/2: recon r train", run["stdout"])) == 2


def test_a_run_with_few_optimiser_steps_says_so_with_its_numbers(run):
    log = (run["out"] / "run.log").read_text()
    pre = re.search(r"WARNING .*pre-training will take only (\d+) optimiser steps \((\d+) records / batch size 16", log)
    assert pre and int(pre.group(1)) < 200
    fine = re.search(r"WARNING .*fine-tuning \(per fold\) will take only (\d+) optimiser steps .* x 3 epochs", log)
    assert fine and int(fine.group(1)) == 3  # 24 training subjects per fold, batch 32: 1 step x 3 epochs


def test_help_shows_the_override_syntax_and_where_keys_live():
    proc = subprocess.run([sys.executable, str(MAIN), "--help"], capture_output=True, text=True, env=_env(), cwd=ROOT)
    assert proc.returncode == 0
    assert "KEY VALUE" in proc.stdout and "PRETRAIN.EPOCHS 5" in proc.stdout
    assert "examples/lsemvae_ph/config.py" in proc.stdout


def test_compare_help_shows_defaults_and_how_to_point_it_at_data():
    compare = Path(MAIN).with_name("compare.py")
    proc = subprocess.run([sys.executable, str(compare), "--help"], capture_output=True, text=True, env=_env(),
                          cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0
    assert "default: outputs/compare" in proc.stdout and "DATASET.FINETUNE_SOURCE" in proc.stdout


def test_class_names_and_the_chance_caveat(tmp_path):
    sys.path.insert(0, str(Path(MAIN).parent))
    import main as pipeline
    from layout import RunLayout
    from stages import chance_caveat, class_names

    run = RunLayout.from_cfg(pipeline.load_cfg(["6L.yaml"], ["TASK.LABEL", "LVH", "OUTPUT.DIR", str(tmp_path)]))
    assert class_names(run) == {0: "no LVH", 1: "LVH"}
    ph = RunLayout.from_cfg(pipeline.load_cfg(["6L.yaml"], ["OUTPUT.DIR", str(tmp_path)]))
    assert class_names(ph) == {0: "no PH (mPAP <= 20)", 1: "PH (mPAP > 20)"}
    assert "--stage evaluate" in chance_caveat(tmp_path)  # no metrics.json yet
    head = {"name": "pooled out-of-fold AUROC, subject level", "value": 0.55, "ci95": [0.45, 0.66]}
    (tmp_path / "metrics.json").write_text(json.dumps({"headline": head}))
    assert "includes 0.5" in chance_caveat(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"headline": {**head, "ci95": [0.52, 0.7]}}))
    assert chance_caveat(tmp_path) is None
