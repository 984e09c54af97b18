"""End-to-end tests of examples/lsemvae_ph/main.py on a tiny synthetic cohort (subprocess and in-process)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "lsemvae_ph"
MAIN = EXAMPLE / "main.py"
if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))

pytestmark = pytest.mark.slow


def tiny_opts(shared: Path) -> list[str]:
    """Overrides for a run of a few seconds: 36 labelled subjects, 50 Hz x 256 samples, latent 4, 3 folds."""
    return [
        "DATASET.FS",
        "50",
        "DATASET.INPUT_LENGTH",
        "256",
        "DATASET.SYNTHETIC.N_SUBJECTS",
        "36",
        "DATASET.SYNTHETIC.N_ARCHIVE_SUBJECTS",
        "8",
        "DATASET.SYNTHETIC.ARCHIVE_RECORDS_PER_SUBJECT",
        "1",
        "DATASET.SYNTHETIC.DIR",
        str(shared / "data"),
        "DATASET.CACHE_DIR",
        str(shared / "cache"),
        "DATASET.PREPARE_WORKERS",
        "1",
        "MODEL.LATENT_DIM",
        "4",
        "PRETRAIN.EPOCHS",
        "2",
        "PRETRAIN.BATCH_SIZE",
        "16",
        "PRETRAIN.LR",
        "0.001",
        "PRETRAIN.BETA_WARMUP_EPOCHS",
        "1.0",
        "FINETUNE.EPOCHS",
        "3",
        "FINETUNE.LR",
        "0.001",
        "EVAL.N_SPLITS",
        "3",
        "EVAL.N_BOOT",
        "20",
        "TRAINER.PROGRESS_BAR",
        "False",
        "TRAINER.ACCELERATOR",
        "cpu",
    ]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run_main(args):
    return subprocess.run([sys.executable, str(MAIN), *args], capture_output=True, text=True, env=_env(), cwd=ROOT)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One full run (prepare, pretrain, finetune, evaluate) of the 6-lead LS-EMVAE on the tiny cohort."""
    shared = tmp_path_factory.mktemp("shared")
    out = tmp_path_factory.mktemp("run")
    proc = _run_main(["--cfg", "6L.yaml", *tiny_opts(shared), "OUTPUT.DIR", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"shared": shared, "out": out, "stdout": proc.stdout}


def _cfg(shared, out, *extra, files=("6L.yaml",)):
    import main as pipeline

    return pipeline.load_cfg(list(files), [*tiny_opts(shared), "OUTPUT.DIR", str(out), *extra])


# ---------------------------------------------------------------------------------------------------------------------
def test_config_names_resolve_and_later_files_override_earlier():
    import main as pipeline
    import yaml

    quick = yaml.safe_load((ROOT / "configs" / "quick.yaml").read_text())
    cfg = pipeline.load_cfg(["6L.yaml", "quick"], ["MODEL.LATENT_DIM", "16"])
    assert cfg.DATASET.LEADS == "6L" and cfg.MODEL.LATENT_DIM == 16
    assert cfg.PRETRAIN.EPOCHS == quick["PRETRAIN"]["EPOCHS"] != pipeline.get_cfg_defaults().PRETRAIN.EPOCHS
    cfg = pipeline.load_cfg(["quick.yaml", str(ROOT / "configs" / "12L.yaml")])
    assert cfg.DATASET.LEADS == "12L" and cfg.OUTPUT.DIR == "outputs/lsemvae_12L"
    defaults = pipeline.get_cfg_defaults()
    defaults.MODEL.LATENT_DIM = 3
    assert pipeline.get_cfg_defaults().MODEL.LATENT_DIM == 256  # a clone each time
    for name in sorted(p.name for p in (ROOT / "configs").glob("*.yaml")):
        pipeline.load_cfg([name])  # every shipped config validates


@pytest.mark.parametrize(
    "key,value,accepted",
    [
        ("MODEL.NAME", "transformer", "lsemvae"),
        ("DATASET.LEADS", "7L", "12L"),
        ("TASK.NAME", "diabetes", "phenotype"),
        ("FINETUNE.FEATURES", "max", "concat_means"),
        ("PRETRAIN.LOSS_MODE", "mine", "reference"),
    ],
)
def test_invalid_values_fail_early_naming_accepted_values(key, value, accepted):
    import main as pipeline

    with pytest.raises(ValueError, match=accepted):
        pipeline.load_cfg(["6L.yaml"], [key, value])


def test_invalid_stage_and_model_fail_before_any_work(tmp_path):
    out = tmp_path / "never"
    proc = _run_main(["--cfg", "6L.yaml", "OUTPUT.DIR", str(out), "--stage", "train"])  # any order
    assert proc.returncode == 2 and "prepare" in proc.stderr and "interpret" in proc.stderr
    proc = _run_main(["--cfg", "6L.yaml", "MODEL.NAME", "gpt", "OUTPUT.DIR", str(out)])
    assert proc.returncode == 2 and "xresnet1d" in proc.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------------
def test_end_to_end_outputs(tiny_run):
    out = tiny_run["out"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["synthetic"] is True and metrics["task"] == "ph_detection" and metrics["method"] == "LS-EMVAE"
    assert metrics["leads"] == ["I", "II", "III", "aVR", "aVL", "aVF"]
    assert len(metrics["folds"]) == 3 and all({"accuracy", "auroc", "mcc"} <= set(f) for f in metrics["folds"])
    for name in ("accuracy", "auroc", "mcc"):
        entry = metrics["summary"][name]
        assert set(entry) == {"mean", "std", "ci95", "pooled"} and len(entry["ci95"]) == 2
        assert np.isclose(entry["mean"], np.mean([f[name] for f in metrics["folds"]]))
    labels = pd.read_csv(out / "labels.csv")
    pred = pd.read_csv(out / "predictions.csv")
    assert pred["subject_id"].is_unique and len(pred) == len(labels) == 36
    assert pred["probability"].between(0, 1).all() and pred["synthetic"].all()
    assert set(pred["fold"]) == {0, 1, 2}
    assert (out / "results.md").read_text().lower().count("synthetic") >= 1
    assert "LS-EMVAE" in (out / "results.md").read_text()
    assert (out / "roc.png").stat().st_size > 5000
    assert "SYNTHETIC" in (out / "README.md").read_text()
    assert "SYNTHETIC DATA" in (out / "run.log").read_text().splitlines()[0]
    assert "MODEL:" in (out / "config.yaml").read_text()
    assert list((out / "pretrain" / "logs").rglob("events.out.tfevents*")) and list((out / "pretrain").rglob("*.csv"))
    assert "AUROC" in tiny_run["stdout"] and "SYNTHETIC" in tiny_run["stdout"]


def test_checkpoints_and_models_load_weights_only(tiny_run):
    out = tiny_run["out"]
    ckpt = torch.load(out / "pretrain" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["epoch"] == 1 and any(k.startswith("model.") for k in ckpt["state_dict"])
    state = torch.load(out / "pretrain" / "model.pt", weights_only=True)
    assert all(torch.equal(state[k], ckpt["state_dict"]["model." + k]) for k in state)
    head = torch.load(out / "finetune" / "fold0" / "model.pt", weights_only=True)
    assert any(v.dim() == 2 for v in head.values())


def test_artifacts_reproduce_out_of_fold_probabilities(tiny_run):
    import artifacts

    cfg = _cfg(tiny_run["shared"], tiny_run["out"])
    data = artifacts.finetune_dataset(cfg)
    folds = artifacts.load_folds(cfg)
    assert list(folds.columns) == ["record_id", "subject_id", "label", "fold", "threshold"]
    assert list(folds["record_id"]) == [str(r) for r in data.record_ids]
    vae = artifacts.load_pretrained_model(cfg)
    assert vae is not None and vae.lead_names == tuple(
        ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
    )
    oof = pd.read_csv(tiny_run["out"] / "finetune" / "oof.csv")
    test_idx = np.flatnonzero(folds["fold"].to_numpy() == 1)
    clf = artifacts.load_fold_classifier(cfg, 1)
    batch = [data[int(i)] for i in test_idx]
    x = torch.stack([b["signals"] for b in batch])
    mask = torch.stack([b["mask"] for b in batch])
    with torch.no_grad():
        logits = clf(x, mask)
    assert logits.shape == (len(test_idx), 2)
    prob = torch.softmax(logits, -1)[:, 1].numpy()
    assert np.allclose(prob, oof["probability"].to_numpy()[test_idx], atol=1e-5)


def test_stages_reuse_outputs_and_same_seed_gives_same_metrics(tiny_run, tmp_path):
    before = (tiny_run["out"] / "pretrain" / "model.pt").stat().st_mtime_ns
    pretrained = str(tiny_run["out"] / "pretrain")
    # same command and environment as the first run (thread counts can change float summation order)
    proc = _run_main(
        ["--cfg", "6L.yaml", *tiny_opts(tiny_run["shared"]), "OUTPUT.DIR", str(tmp_path), "PRETRAIN.DIR", pretrained]
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tiny_run["out"] / "pretrain" / "model.pt").stat().st_mtime_ns == before  # pre-training reused
    log = (tmp_path / "run.log").read_text()
    assert "reusing the pre-trained model" in log and "reusing cache" in log
    first = json.loads((tiny_run["out"] / "metrics.json").read_text())
    second = json.loads((tmp_path / "metrics.json").read_text())
    assert first["folds"] == second["folds"] and first["summary"] == second["summary"]
    assert pd.read_csv(tiny_run["out"] / "folds.csv").equals(pd.read_csv(tmp_path / "folds.csv"))


def test_predict_scores_records_and_refuses_a_missing_lead(tiny_run, tmp_path):
    import main as pipeline
    import wfdb

    from kale_ext.loaddata.synthetic import write_synthetic_cohort

    cohort = write_synthetic_cohort(tmp_path / "gen", 2, seed=5, fs=50)
    paths = sorted(cohort.root.rglob("*.hea"))
    new = tmp_path / "new"
    new.mkdir()
    for k, hea in enumerate(paths):
        rec = wfdb.rdrecord(str(hea.with_suffix("")))
        keep = [i for i, n in enumerate(rec.sig_name) if not (k == 1 and n == "aVL")]
        wfdb.wrsamp(
            f"rec{k}",
            fs=rec.fs,
            units=[rec.units[i] for i in keep],
            sig_name=[rec.sig_name[i] for i in keep],
            p_signal=rec.p_signal[:, keep],
            fmt=["16"] * len(keep),
            write_dir=str(new),
        )
    cfg = _cfg(
        tiny_run["shared"], tiny_run["out"], "PREDICT.SOURCE", str(new), "PREDICT.OUT_CSV", str(tmp_path / "scores.csv")
    )
    pipeline.run(cfg, "predict")
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert len(scores) == 2
    ok = scores[scores["status"] == "ok"]
    refused = scores[scores["status"] != "ok"]
    assert len(ok) == 1 and 0 <= ok["probability"].iloc[0] <= 1 and ok["prediction"].iloc[0] in (0, 1)
    assert len(refused) == 1 and "aVL" in refused["status"].iloc[0] and np.isnan(refused["probability"].iloc[0])
    folds = pd.read_csv(tiny_run["out"] / "folds.csv")
    assert np.isclose(scores["threshold"].iloc[0], folds.groupby("fold")["threshold"].first().mean())
    # provenance: what model, what task, what a 1 means, trained on what kind of data
    assert set(scores["model"]) == {"lsemvae"} and set(scores["trained_on"]) == {"synthetic"}
    assert scores["positive_class"].iloc[0].startswith("mPAP > 20") and set(scores["task"]) == {"ph_detection"}
    raw = pd.read_csv(tmp_path / "scores.csv", dtype=str, keep_default_na=False).set_index("status")
    assert raw.loc["ok", "prediction"] in ("0", "1") and raw.drop(index="ok")["prediction"].eq("").all()  # integers


def _tiny_cohort(folder, n=12, seed=9):
    from kale_ext.loaddata.synthetic import write_synthetic_cohort

    cohort = write_synthetic_cohort(folder, n, seed=seed, fs=50)
    return cohort.root, next(cohort.root.glob("haemo*.csv"))


def test_rerun_with_another_task_or_latent_size_recomputes_instead_of_reusing(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run["out"], run)
    proc = _run_main(["--cfg", "6L.yaml", *tiny_opts(tiny_run["shared"]), "OUTPUT.DIR", str(run), "TASK.NAME", "pawp"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "elevated_pawp"
    labels = pd.read_csv(run / "labels.csv", dtype={"subject_id": str}).set_index("subject_id")["label"]
    predictions = pd.read_csv(run / "predictions.csv", dtype={"subject_id": str}).set_index("subject_id")
    assert (predictions["label"] == labels.loc[predictions.index]).all()  # evaluated on the new task's labels
    assert (run / "finetune.stale-1").is_dir() and not (run / "pretrain.stale-1").exists()  # pre-training reused
    proc = _run_main(
        ["--cfg", "6L.yaml", *tiny_opts(tiny_run["shared"]), "OUTPUT.DIR", str(run), "MODEL.LATENT_DIM", "3"]
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run / "pretrain.stale-1").is_dir()  # the old model is kept aside, not reused and not deleted
    assert json.loads((run / "pretrain" / "model_args.json").read_text())["latent_dim"] == 3
    assert "LATENT_DIM: 3" in (run / "config.yaml").read_text()


def test_prepare_rebuilds_a_cache_of_another_source_and_stops_on_unusable_labels(tiny_run, tmp_path):
    cache = tmp_path / "cache"
    base = [*tiny_opts(tiny_run["shared"]), "DATASET.CACHE_DIR", str(cache), "OUTPUT.DIR", str(tmp_path / "out")]
    proc = _run_main(["--cfg", "6L.yaml", "--stage", "prepare", *base])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    other, haemo = _tiny_cohort(tmp_path / "other")
    real = [*base, "DATASET.FINETUNE_SOURCE", str(other), "DATASET.LABELS_CSV", str(haemo), "EVAL.N_SPLITS", "2"]
    proc = _run_main(["--cfg", "6L.yaml", "--stage", "prepare", *real])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "built from other inputs" in proc.stdout  # not "reusing cache"
    index = next(cache.glob("finetune_6L_*")) / "index.csv"
    assert len(pd.read_csv(index)) == 12  # the other source's 12 records, not the 36 of the first
    # labels whose ids match no record: a one-line error before any pre-training
    bad = tmp_path / "bad.csv"
    bad.write_text("subject_id,mPAP,PAWP\nnobody1,30,10\nnobody2,15,8\n", encoding="utf-8")
    proc = _run_main(["--cfg", "6L.yaml", *base[:-2], "OUTPUT.DIR", str(tmp_path / "bad"),
                      "DATASET.FINETUNE_SOURCE", str(other), "DATASET.LABELS_CSV", str(bad)])  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr
    assert "match" in proc.stderr and not (tmp_path / "bad" / "pretrain").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_pretraining_with_two_cpu_processes_runs_from_the_command_line(tiny_run, tmp_path):
    env_port = str(_free_port())
    args = [
        "--cfg",
        "6L.yaml",
        "--stage",
        "pretrain",
        *tiny_opts(tiny_run["shared"]),
        "OUTPUT.DIR",
        str(tmp_path),
        "TRAINER.DEVICES",
        "2",
        "TRAINER.STRATEGY",
        "ddp",
        "PRETRAIN.EPOCHS",
        "1",
        "PRETRAIN.BATCH_SIZE",
        "4",
    ]
    os.environ["MASTER_PORT"] = env_port
    try:
        proc = _run_main(args)
    finally:
        os.environ.pop("MASTER_PORT", None)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # both ranks ran (the sharding itself is tested on the library: tests/pipeline/test_pretrain.py)
    assert (tmp_path / "pretrain" / "model.pt").exists()
    logs = list((tmp_path / "pretrain" / "logs").rglob("metrics.csv"))
    assert logs and "train/loss" in logs[0].read_text()


def test_comparison_writes_one_table_for_methods_and_lead_settings(tiny_run, tmp_path):
    import compare

    opts = [o for o in tiny_opts(tiny_run["shared"])]
    methods = ["lsemvae", "resnet1d", "betavae", "stmem", "random_encoder"]
    rows = compare.run_comparison(tmp_path, methods, ["12L", "6L"], opts=[*opts, "MODEL.STMEM_PRESET", "small"])
    assert len(rows) == 10
    md = (tmp_path / "table2.md").read_text()
    assert "LS-EMVAE" in md and "ResNet1d" in md and "6L" in md and "12L" in md and "YNTHETIC" in md
    assert "*Unimodal*" in md and "*Multimodal*" in md and "✓" in md and "×" in md
    assert "beta-VAE, 6L: – = one joint 12-channel encoder" in md  # a method that does not apply, with the reason
    assert "6L pooled AUROC [95% CI]" in md  # each cell's headline beside the fold mean +- std
    table = pd.read_csv(tmp_path / "table2.csv")
    assert len(table) == 10 and set(table["leads"]) == {"6L", "12L"} and table["synthetic"].all()
    assert "ST-MEM" in md and "Random encoder" in md
    # the random encoder is frozen at its seeded initialisation: fine-tuning leaves its weights as built
    from kale_ext.embed.zoo import build_from_args
    from kale_ext.pipeline.artifacts import load_fold_classifier

    args = json.loads((tmp_path / "pretrain" / "random_encoder" / "model_args.json").read_text())
    torch.manual_seed(42)  # the run's SEED: the initialisation the stage saved
    init = build_from_args(**args).state_dict()
    clf = load_fold_classifier(tmp_path / "ph" / "random_encoder" / "6L" / "finetune", 0)
    frozen = clf.extractor.vae.state_dict()
    assert init.keys() == frozen.keys() and all(torch.equal(init[k], frozen[k]) for k in init)
    # one pre-training per pre-trained method, shared by both lead settings
    assert (tmp_path / "pretrain" / "lsemvae" / "model.pt").exists()
    assert not (tmp_path / "ph" / "lsemvae" / "6L" / "pretrain").exists()
    folds6 = pd.read_csv(tmp_path / "ph" / "lsemvae" / "6L" / "folds.csv")
    folds_r = pd.read_csv(tmp_path / "ph" / "resnet1d" / "6L" / "folds.csv")
    assert folds6["fold"].equals(folds_r["fold"])  # same folds for every method
    # a rerun reuses every finished cell; a changed config recomputes that cell only
    again = compare.run_comparison(tmp_path, ["lsemvae", "resnet1d"], ["6L"], opts=opts)
    assert [r["auroc_mean"] for r in again] == [
        r["auroc_mean"] for r in rows if r["leads"] == "6L" and "note" not in r
    ][:2]
    stamp = (tmp_path / "ph" / "resnet1d" / "6L" / "cell.json").stat().st_mtime
    compare.run_comparison(tmp_path, ["resnet1d"], ["6L"], opts=[*opts, "FINETUNE.SUPERVISED_EPOCHS", "1"])
    assert (tmp_path / "ph" / "resnet1d" / "6L" / "cell.json").stat().st_mtime > stamp


def test_command_line_options_may_follow_overrides():
    import main as pipeline

    args = pipeline.parse_args(["OUTPUT.DIR", "x", "--stage", "finetune", "--cfg", "6L", "TRAINER.DEVICES", "-1"])
    assert args.stage == "finetune" and args.cfg == ["6L"]
    assert args.opts == ["OUTPUT.DIR", "x", "TRAINER.DEVICES", "-1"]


def test_comparison_command_line_separates_lists_from_overrides():
    import compare

    args = compare.parse_args(["--methods", "lsemvae", "mvae", "--leads", "6L", "12L", "TRAINER.PROGRESS_BAR", "False"])
    assert args.methods == ["lsemvae", "mvae"] and args.leads == ["6L", "12L"]
    assert args.opts == ["TRAINER.PROGRESS_BAR", "False"]


def test_interpret_stage_on_the_runs_own_outputs(tiny_run):
    """--stage interpret reads the finished run (no stand-ins): one row per lead in use, shares summing to 1."""
    out = tiny_run["out"]
    opts = [*tiny_opts(tiny_run["shared"]), "OUTPUT.DIR", str(out), "INTERPRET.N_STEPS", "8", "INTERPRET.SUBJECTS", "1"]
    proc = _run_main(["--cfg", "6L.yaml", "--stage", "interpret", *opts])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = out / "interpret"
    leads = ["I", "II", "III", "aVR", "aVL", "aVF"]
    importance = pd.read_csv(folder / "lead_importance.csv")
    assert sorted(importance["lead"]) == sorted(leads)
    assert np.isclose(importance["share_mean"].sum(), 1.0, atol=1e-6)
    assert sorted(pd.read_csv(folder / "lead_ablation.csv")["lead"]) == sorted(leads)
    waves = pd.read_csv(folder / "wave_attribution.csv")
    share_cols = [c for c in waves.columns if c.startswith("share_")]
    assert np.allclose(waves[share_cols].sum(axis=1), 1.0, atol=1e-6)
    gates = pd.read_csv(folder / "gate_weights.csv")
    assert np.isclose(gates["weight_mean"].sum(), 1.0, atol=1e-5) and "shared (PoE)" in set(gates["expert"])
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert "lead_importance.png" in pngs and any(p.startswith("subject_") for p in pngs)


# ---------------------------------------------------------------------------------------------------------------------
# Issue 19: nothing silent, nothing lost
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, words",
    [
        ("DATASET: !!python/object:os.system {}\n", "line 1: a YAML tag is not accepted"),
        ("DATASET:\n\tFS: 50\n", "line 2: a tab character; indent YAML with spaces"),
        ("- DATASET\n- MODEL\n", "holds a list, not 'SECTION: KEY: value' mappings"),
    ],
)
def test_config_files_that_are_not_plain_yaml_mappings_give_one_line_errors(tmp_path, capsys, text, words):
    import main as pipeline

    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    assert pipeline.main(["--cfg", str(path), "OUTPUT.DIR", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert words in err and str(path) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_an_output_dir_that_is_a_file_or_in_use_is_refused(tmp_path, capsys):
    import main as pipeline

    from kale_ext.utils.files import file_lock

    a_file = tmp_path / "out.txt"
    a_file.write_text("not a folder")
    assert pipeline.main(["--cfg", "6L.yaml", "OUTPUT.DIR", str(a_file / "sub"), "--stage", "prepare"]) == 1
    err = capsys.readouterr().err
    assert f"{a_file} is a file, not a folder" in err and "OUTPUT.DIR" in err and "Errno" not in err
    busy = tmp_path / "busy"
    with file_lock(busy / pipeline.LOCK_FILE, timeout_s=0):  # another run holds the folder
        assert pipeline.main(["--cfg", "6L.yaml", "OUTPUT.DIR", str(busy), "--stage", "prepare"]) == 1
    err = capsys.readouterr().err
    assert "is in use by another run" in err and "another OUTPUT.DIR" in err
    assert not (busy / "config.yaml").exists()  # the running run's outputs are untouched


@pytest.mark.parametrize(
    "stage, earlier",
    [("pretrain", "prepare"), ("finetune", "prepare"), ("evaluate", "finetune"), ("predict", "finetune")],
)
def test_a_single_stage_on_a_fresh_output_dir_names_the_stage_to_run_first(tmp_path, capsys, stage, earlier):
    import main as pipeline

    out = tmp_path / "fresh"
    opts = ["OUTPUT.DIR", str(out), "PREDICT.SOURCE", str(tmp_path)]
    assert pipeline.main(["--cfg", "6L.yaml", "--stage", stage, *opts]) == 1
    err = capsys.readouterr().err
    assert f"run --stage {earlier} first" in err and "No such file" not in err and "prepare_ecg_cache" not in err


def test_sigterm_ends_the_run_with_143_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    import os
    import signal
    import time

    import main as pipeline
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    def killed(cfg, stage):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this

    def unhandled(signum, frame):  # what the test sees when main installs no handler of its own
        raise RuntimeError("SIGTERM reached the caller's handler")

    before = signal.signal(signal.SIGTERM, unhandled)
    try:
        monkeypatch.setattr(pipeline, "run", killed)
        assert pipeline.main(["--cfg", "6L.yaml", "OUTPUT.DIR", str(tmp_path)]) == 143
        assert "interrupted by SIGTERM; rerun the same command to resume" in capsys.readouterr().err
        assert signal.getsignal(signal.SIGTERM) is unhandled  # the handler is the caller's again
    finally:
        signal.signal(signal.SIGTERM, before)

    def lightning_saw_it(cfg, stage):
        raise SIGTERMException()  # Lightning's own signal path: a SystemExit with status 0

    monkeypatch.setattr(pipeline, "run", lightning_saw_it)
    assert pipeline.main(["--cfg", "6L.yaml", "OUTPUT.DIR", str(tmp_path)]) == 143
    assert "rerun the same command to resume" in capsys.readouterr().err


def test_a_missing_label_column_names_its_key_before_any_cache_is_built(tiny_run, tmp_path, capsys):
    import main as pipeline

    cache = tmp_path / "cache"
    opts = [*tiny_opts(tiny_run["shared"]), "DATASET.CACHE_DIR", str(cache), "OUTPUT.DIR", str(tmp_path / "out")]
    for key, value in (("DATASET.LABEL_COLUMN", "ph_flag"), ("DATASET.LABEL_ID_COLUMN", "patient")):
        assert pipeline.main(["--cfg", "6L.yaml", "--stage", "prepare", *opts, key, value]) == 1
        err = capsys.readouterr().err
        assert f"no column {value!r}" in err and f"set {key}" in err
        assert not list(cache.glob("*/spec.json"))  # refused before the caches


def _copy_run(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run["out"], run)
    return run


def test_damaged_models_are_not_trusted_and_root_outputs_of_another_config_are_moved_aside(tiny_run, tmp_path):
    import stages
    from layout import RunLayout

    run = _copy_run(tiny_run, tmp_path)
    layout = RunLayout.from_cfg(_cfg(tiny_run["shared"], run))
    record = json.loads((run / "outputs.json").read_text())
    assert set(record["files"]) >= {"metrics.json", "predictions.csv", "results.md"}
    assert stages.retire_stale_outputs(layout) is None  # the outputs of this very config stay
    # a truncated pre-trained model: DONE is not trusted, the stage runs again
    assert stages.finished(layout.pretrain_dir, stages.pretrain_fingerprint(layout), "DONE")
    model = layout.pretrain_dir / "model.pt"
    model.write_bytes(model.read_bytes()[:100])
    assert not stages.finished(layout.pretrain_dir, stages.pretrain_fingerprint(layout), "DONE")
    assert not (layout.pretrain_dir / "DONE").exists()
    # a damaged fold model: the fine-tuning is redone rather than reused
    fold = layout.finetune_dir / "fold0" / "model.pt"
    fold.write_bytes(fold.read_bytes()[:-10])
    assert not stages.finished(layout.finetune_dir, stages.finetune_fingerprint(layout), "DONE")
    # another fine-tuning config: the root outputs of the previous one are moved aside before it starts
    other = RunLayout.from_cfg(_cfg(tiny_run["shared"], run, "FINETUNE.LR", "0.01"))
    moved = stages.retire_stale_outputs(other)
    assert (
        moved == run / "stale-outputs-1" and (moved / "metrics.json").is_file() and (moved / "outputs.json").is_file()
    )
    assert not (run / "metrics.json").exists() and not (run / "predictions.csv").exists()


def test_a_nan_record_stops_finetuning_before_any_output_naming_record_and_cache(tiny_run, tmp_path):
    import shutil

    import stages
    from layout import RunLayout

    from kale_ext.loaddata.ecg_dataset import cache_checksums

    run = _copy_run(tiny_run, tmp_path)
    cache_root = tmp_path / "cache"
    shutil.copytree(tiny_run["shared"] / "cache", cache_root)
    layout = RunLayout.from_cfg(_cfg(tiny_run["shared"], run, "DATASET.CACHE_DIR", str(cache_root)))
    signals = np.load(layout.finetune_cache / "signals.npy", mmap_mode="r+")
    signals[3, 1, 10:20] = np.nan  # lead II of the fourth record
    signals.flush()
    del signals
    spec = json.loads((layout.finetune_cache / "spec.json").read_text())
    spec["checksums"] = cache_checksums(layout.finetune_cache)  # as if the builder itself had written the NaN
    (layout.finetune_cache / "spec.json").write_text(json.dumps(spec))
    shutil.rmtree(layout.finetune_dir)
    (run / "folds.csv").unlink()
    record = pd.read_csv(layout.finetune_cache / "index.csv", dtype=str)["record_id"].iloc[3]
    with pytest.raises(ValueError, match="NaN or infinite") as err:
        stages.stage_finetune(layout)
    assert record in str(err.value) and str(layout.finetune_cache) in str(err.value)
    assert not (layout.finetune_dir / "DONE").exists() and not (layout.finetune_dir / "oof.csv").exists()
    assert not (run / "folds.csv").exists()


def test_predict_names_its_source_clears_old_scores_and_refuses_other_preprocessing(tiny_run, tmp_path):
    import main as pipeline

    source, _ = _tiny_cohort(tmp_path / "new", n=2)
    run = _copy_run(tiny_run, tmp_path)
    scores = tmp_path / "scores.csv"
    opts = ["PREDICT.SOURCE", str(source), "PREDICT.OUT_CSV", str(scores)]
    pipeline.run(_cfg(tiny_run["shared"], run, *opts), "predict")
    table = pd.read_csv(scores)
    assert set(table["source"]) == {str(source.resolve())} and len(table) == 2
    assert str(source) in (run / "config.yaml").read_text()  # a single stage records its config too
    assert json.loads((run / "finetune" / "preprocess.json").read_text())["derive_limb_leads"] is False
    derive = _cfg(tiny_run["shared"], run, *opts, "DATASET.PREPROCESS.DERIVE_LIMB_LEADS", "True")
    with pytest.raises(ValueError, match=r"derive_limb_leads False -> True"):
        pipeline.run(derive, "predict")
    assert not scores.exists()  # the earlier source's scores do not stay in place looking complete
    assert (run / "metrics.json").exists()  # a refused predict moves nothing aside


def test_evaluate_refuses_fine_tuned_models_of_another_config(tiny_run, tmp_path):
    import stages
    from layout import RunLayout

    run = _copy_run(tiny_run, tmp_path)
    other = RunLayout.from_cfg(_cfg(tiny_run["shared"], run, "FINETUNE.LR", "0.01"))
    with pytest.raises(RuntimeError, match=r"from other inputs \(config.FINETUNE.LR.*run --stage finetune first"):
        stages.stage_evaluate(other)
    assert json.loads((run / "metrics.json").read_text()) == json.loads((tiny_run["out"] / "metrics.json").read_text())


def test_windowed_run_pretrains_on_windows_and_scores_whole_records(tiny_run, tmp_path):
    """PRETRAIN.WINDOW 64 of 256 samples: the model is built for windows, its classifiers and predict take records."""
    import main as pipeline

    out = tmp_path / "windowed"
    opts = [*tiny_opts(tiny_run["shared"]), "OUTPUT.DIR", str(out), "PRETRAIN.WINDOW", "64"]
    proc = _run_main(["--cfg", "6L.yaml", *opts])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((out / "pretrain" / "model_args.json").read_text())["input_dim"] == 64
    info = json.loads((out / "finetune" / "classifier.json").read_text())
    assert info["window"] == 64 and info["window_pooling"] == "mean"
    log = (out / "run.log").read_text()
    assert "epoch 2/2: recon r train" in log and "| held-out " in log
    cfg = _cfg(
        tiny_run["shared"],
        out,
        "PRETRAIN.WINDOW",
        "64",
        "PREDICT.SOURCE",
        str(tiny_run["shared"] / "data" / "labelled"),
    )
    pipeline.run(cfg, "predict")
    scores = pd.read_csv(out / "predict" / "scores.csv")
    assert (scores["status"] == "ok").sum() == 36 and scores["probability"].between(0, 1).all()
    proc = _run_main(
        ["--cfg", "6L.yaml", "--stage", "interpret", *opts, "INTERPRET.N_STEPS", "4", "INTERPRET.SUBJECTS", "1"]
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    gates = pd.read_csv(out / "interpret" / "gate_weights.csv")
    assert np.isclose(gates["weight_mean"].sum(), 1.0, atol=1e-5)
