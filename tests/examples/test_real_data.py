"""The example on public-archive layouts: a two-rate record table with a statement-coded label table, several
pre-training sources, table folds, relative data paths and the real-data preset (configs/real_cpu.yaml)."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import wfdb

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "lsemvae_ph"
if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))

import stages  # noqa: E402
from config import load_cfg, resolve_data_path  # noqa: E402
from layout import RunLayout  # noqa: E402

SHARED_ECG = ROOT.parent / "shared" / "data" / "ecg"
LEADS = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]
N = 20


def _record(folder, name, fs, seed):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t = np.arange(int(fs * 6)) / fs
    sig = np.stack(
        [np.sin(2 * np.pi * (1 + seed % 3 + k / 7) * t) * 0.6 + rng.normal(0, 0.05, t.size) for k in range(12)]
    )
    wfdb.wrsamp(name, fs=fs, units=["mV"] * 12, sig_name=LEADS, p_signal=sig.T, fmt=["16"] * 12,
                adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str(folder))  # fmt: skip


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A two-rate record table (50 Hz for all, 100 Hz for half), its statement table, and a second header tree."""
    root = tmp_path_factory.mktemp("archive")
    rows = []
    for i in range(1, N + 1):
        _record(root / "lo" / "00000", f"{i:05d}_lr", 50, i)
        hi = ""
        if i <= N // 2:
            _record(root / "hi" / "00000", f"{i:05d}_hr", 100, i)
            hi = f"hi/00000/{i:05d}_hr"
        patient = 1000 + (i + 1) // 2  # two records per patient
        codes = "{'NORM': 100.0, 'SR': 0.0}" if i % 2 else "{'IMI': 50.0, 'LVH': 100.0}"
        rows.append({"ecg_id": i, "patient_id": f"{patient}.0", "heart_axis": "RAD" if i % 5 == 0 else "MID",
                     "strat_fold": (patient % 10) + 1, "scp_codes": codes, "filename_lr": f"lo/00000/{i:05d}_lr",
                     "filename_hr": hi})  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "ptbxl_database.csv", index=False)
    pd.DataFrame({"": ["NORM", "IMI", "LVH", "SR"], "diagnostic_class": ["NORM", "MI", "HYP", ""]}).to_csv(
        root / "scp_statements.csv", index=False
    )
    other = tmp_path_factory.mktemp("other") / "tree"
    for i in (1, 2, 3):
        _record(other, str(i), 100, 100 + i)
    return root, other


def _run(archive, out, *extra):
    root, other = archive
    opts = ["DATASET.FINETUNE_SOURCE", str(root), "DATASET.LABELS_CSV", str(root / "ptbxl_database.csv"),
            "DATASET.PRETRAIN_SOURCE", f"{root}, {other}", "DATASET.LABEL_ID_COLUMN", "record_id",
            "DATASET.LABELS_CSV_ID_COLUMN", "ecg_id", "DATASET.FS", "50", "DATASET.INPUT_LENGTH", "256",
            "DATASET.PREPARE_WORKERS", "1", "DATASET.CACHE_DIR", str(out / "cache"), "TASK.NAME", "statement",
            "TASK.LABEL", "NORM", "MODEL.LATENT_DIM", "4", "EVAL.N_SPLITS", "2", "EVAL.N_BOOT", "10",
            "FINETUNE.EPOCHS", "2", "TRAINER.PROGRESS_BAR", "False", "TRAINER.ACCELERATOR", "cpu",
            "OUTPUT.DIR", str(out), *extra]  # fmt: skip
    run = RunLayout.from_cfg(load_cfg(["6L.yaml"], opts))
    run.out.mkdir(parents=True, exist_ok=True)
    return run


def test_statement_labels_and_several_pretraining_sources_are_prepared(archive, tmp_path):
    run = _run(archive, tmp_path, "EVAL.FOLD_COLUMN", "strat_fold")
    stages.stage_prepare(run)
    labels = pd.read_csv(run.labels, dtype={"record_id": str})
    assert list(labels.columns) == ["record_id", "label", "table_fold"]
    assert list(labels["record_id"]) == [str(i) for i in range(1, N + 1)]  # ecg_id -> the records' record_id
    assert list(labels["label"]) == [i % 2 for i in range(1, N + 1)]  # NORM on odd ids
    finetune = pd.read_csv(run.finetune_cache / "index.csv", dtype=str)
    assert len(finetune) == N and finetune["source_path"].str.startswith("lo/").all()  # the 50 Hz files
    assert list(finetune["subject_id"][:3]) == ["1001", "1001", "1002"]
    pretrain = pd.read_csv(run.pretrain_cache / "index.csv", dtype=str)
    root, other = archive
    assert len(pretrain) == N + 3 and pretrain["record_id"].is_unique
    assert {s.split(":")[0] for s in pretrain["subject_id"]} == {root.name, other.name}
    assert f"{root.name}:1001" in set(pretrain["subject_id"]) and f"{other.name}:1" in set(pretrain["record_id"])
    # the pre-training fingerprint names every source: dropping one makes a finished model stale
    fingerprint = stages.pretrain_fingerprint(run)["config"]["DATASET.PRETRAIN_SOURCE"]
    assert str(root) in fingerprint and str(other) in fingerprint
    one = _run(archive, tmp_path / "one", "DATASET.PRETRAIN_SOURCE", str(root))
    assert stages.pretrain_fingerprint(one) != stages.pretrain_fingerprint(run)
    # the table's folds: strat_fold v -> (v - 1) mod 2, so each patient stays in one fold
    folds = stages.table_folds(run, finetune["record_id"])
    expected = ((labels.set_index("record_id").loc[finetune["record_id"], "table_fold"] - 1) % 2).to_numpy()
    np.testing.assert_array_equal(folds, expected)
    assert pd.Series(folds).groupby(finetune["subject_id"].to_numpy()).nunique().max() == 1


def test_records_without_a_file_at_the_rate_are_listed(archive, tmp_path):
    root, other = archive
    missing = stages.report_missing_records(_run(archive, tmp_path, "DATASET.FS", "100"), [str(root), str(other)])
    assert list(missing["record_id"]) == [str(i) for i in range(N // 2 + 1, N + 1)]  # no 100 Hz file above N / 2
    assert "filename_hr" in missing["reason"].iloc[0]
    assert len(pd.read_csv(tmp_path / "missing_records.csv")) == N // 2
    assert stages.report_missing_records(_run(archive, tmp_path / "lo"), [str(root)]).empty  # 50 Hz: all there


def test_other_targets_and_a_refused_one(archive, tmp_path):
    root, _ = archive
    lvh = stages.make_labels(_run(archive, tmp_path / "a", "TASK.LABEL", "LVH"), root / "ptbxl_database.csv")
    assert list(lvh["label"]) == [(i + 1) % 2 for i in range(1, N + 1)]
    rad = stages.make_labels(_run(archive, tmp_path / "b", "TASK.LABEL", "RAD"), root / "ptbxl_database.csv")
    assert list(rad["record_id"][rad["label"] == 1]) == ["5", "10", "15", "20"]
    mi = stages.make_labels(_run(archive, tmp_path / "c", "TASK.LABEL", "MI", "TASK.LIKELIHOOD_MIN", "60.0"),
                            root / "ptbxl_database.csv")  # fmt: skip
    assert mi["label"].sum() == 0 and len(mi) == N  # IMI at likelihood 50 is under the threshold
    with pytest.raises(ValueError, match="TASK.LABEL = 'PH'.*classes HYP, MI, NORM"):
        stages.make_labels(_run(archive, tmp_path / "d", "TASK.LABEL", "PH"), root / "ptbxl_database.csv")
    with pytest.raises(ValueError, match="TASK.LABEL is empty"):
        _run(archive, tmp_path / "e", "TASK.LABEL", "")


def test_the_table_folds_reach_finetuning(archive, tmp_path):
    run = _run(archive, tmp_path, "EVAL.FOLD_COLUMN", "strat_fold", "MODEL.NAME", "random_encoder")
    stages.stage_prepare(run)
    stages.stage_pretrain(run)
    stages.stage_finetune(run)
    oof = pd.read_csv(run.finetune_dir / "oof.csv", dtype={"record_id": str})
    labels = pd.read_csv(run.labels, dtype={"record_id": str}).set_index("record_id")
    np.testing.assert_array_equal(oof["fold"], (labels.loc[oof["record_id"], "table_fold"] - 1) % 2)


def test_relative_data_paths_resolve_from_the_current_folder_else_the_repository_root(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (tmp_path / "work" / "here").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    assert resolve_data_path("here", repo) == str((tmp_path / "work" / "here").resolve())  # from the current folder
    assert resolve_data_path("data", repo) == str((repo / "data").resolve())
    assert resolve_data_path("nowhere", repo) == "nowhere" and resolve_data_path("", repo) == ""
    assert resolve_data_path(str(tmp_path), repo) == str(tmp_path)


def test_the_real_data_preset_validates_and_finds_its_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository root: relative paths still find ../shared beside the checkout
    cfg = load_cfg(["6L.yaml", "real_cpu.yaml"])
    run = RunLayout.from_cfg(cfg)
    assert run.leads == ("I", "II", "III", "aVR", "aVL", "aVF") and len(run.pretrain_leads) == 12
    assert (cfg.DATASET.FS, cfg.DATASET.INPUT_LENGTH, cfg.MODEL.LATENT_DIM) == (100, 1000, 32)
    assert (cfg.TASK.NAME, cfg.TASK.LABEL, cfg.EVAL.FOLD_COLUMN) == ("statement", "NORM", "strat_fold")
    sources = [s.strip() for s in cfg.DATASET.PRETRAIN_SOURCE.split(",")]
    assert [Path(s).name for s in sources] == ["ptbxl", "ludb", "cinc2021"]
    floor = load_cfg(["6L.yaml", "real_cpu.yaml"], ["MODEL.NAME", "random_encoder"])
    assert RunLayout.from_cfg(floor).spec.frozen
    if not (SHARED_ECG / "ptbxl" / "ptbxl_database.csv").is_file():
        pytest.skip("real ECG data not found at ../shared/data/ecg: paths not checked")
    for path in [*sources, cfg.DATASET.FINETUNE_SOURCE, cfg.DATASET.LABELS_CSV]:
        assert Path(path).is_absolute() and Path(path).exists(), path
    assert Path(cfg.DATASET.FINETUNE_SOURCE) == (SHARED_ECG / "ptbxl").resolve()


def test_a_multi_valued_diagnosis_table_through_the_example(tmp_path):
    ludb = SHARED_ECG / "ludb"
    if not (ludb / "ludb.csv").is_file():
        pytest.skip("LUDB not found at ../shared/data/ecg/ludb")
    opts = ["DATASET.FINETUNE_SOURCE", str(ludb / "data"), "DATASET.LABELS_CSV", str(ludb / "ludb.csv"),
            "DATASET.LABEL_ID_COLUMN", "record_id", "DATASET.LABELS_CSV_ID_COLUMN", "ID", "TASK.NAME", "statement",
            "TASK.LABEL", "left ventricular hypertrophy", "TASK.VALUE_COLUMN", "Hypertrophies",
            "TASK.EMPTY_VALUE", "negative", "OUTPUT.DIR", str(tmp_path)]  # fmt: skip
    run = RunLayout.from_cfg(load_cfg(["6L.yaml"], opts))
    run.out.mkdir(parents=True, exist_ok=True)
    labels = stages.make_labels(run, ludb / "ludb.csv")
    assert len(labels) == 160 and labels["label"].sum() == 93 and labels["record_id"].iloc[0] == "1"
