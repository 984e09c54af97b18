"""LS-EMVAE for pulmonary hypertension: prepare, pre-train, fine-tune, evaluate, predict, interpret.

Usage::

    python examples/lsemvae_ph/main.py --cfg 6L.yaml [--cfg quick.yaml] [--stage all] [KEY VALUE ...]

``--cfg`` takes a path or a bare name looked up in ``configs/``; it may be repeated (later files override earlier
ones); trailing ``KEY VALUE`` pairs override both. Stages: ``prepare`` (synthetic cohort when no data are configured,
caches, labels), ``pretrain`` (self-supervised, Lightning), ``finetune`` (head on frozen encoders or supervised
baselines, K-fold), ``evaluate`` (metrics.json, predictions.csv, results.md, roc.png), ``predict`` (score new WFDB
records), ``interpret`` (attribution, gates, lead ablation) and ``all`` (prepare, pretrain, finetune, evaluate, plus
interpret when INTERPRET.ENABLED). Each stage reuses the finished outputs of earlier ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from yacs.config import CfgNode

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CONFIG_DIR = ROOT / "configs"
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from config import STAGES, SUPERVISED_MODELS, get_cfg_defaults, parse_leads, validate_cfg  # noqa: E402

logger = logging.getLogger("lsemvae_ph")
SYNTHETIC_NOTE = (
    "SYNTHETIC DATA: these outputs come from the embedded synthetic ECG cohort (generated, not physiology-grade); "
    "they check the pipeline and are not clinical results."
)
PIPELINE_STAGES = ("prepare", "pretrain", "finetune", "evaluate")


# ---------------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------------
def resolve_cfg_path(name: str) -> Path:
    """A config file given as a path, or as a bare name (with or without .yaml) looked up in ``configs/``."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"config {name!r} not found as a path or in {CONFIG_DIR}; available: {known}")


def load_cfg(cfg_files: list[str] | None = None, opts: list[str] | None = None) -> CfgNode:
    """Merge the defaults, the config files (in order) and ``KEY VALUE`` overrides; validate; freeze."""
    cfg = get_cfg_defaults()
    for name in cfg_files or []:
        cfg.merge_from_file(str(resolve_cfg_path(name)))
    if opts:
        if len(opts) % 2:
            raise ValueError(f"overrides must be KEY VALUE pairs, got an odd list: {opts}")
        cfg.merge_from_list(list(opts))
    validate_cfg(cfg)
    cfg.freeze()
    return cfg


def is_synthetic(cfg: CfgNode) -> bool:
    """True when no data source is configured: the embedded synthetic cohort is used."""
    return not cfg.DATASET.FINETUNE_SOURCE


def output_dir(cfg: CfgNode) -> Path:
    """The run's output folder."""
    return Path(cfg.OUTPUT.DIR)


def cache_root(cfg: CfgNode) -> Path:
    """Folder holding the caches."""
    return Path(cfg.DATASET.CACHE_DIR) if cfg.DATASET.CACHE_DIR else output_dir(cfg) / "cache"


def synthetic_dir(cfg: CfgNode) -> Path:
    """Folder of the generated synthetic cohort."""
    return Path(cfg.DATASET.SYNTHETIC.DIR) if cfg.DATASET.SYNTHETIC.DIR else output_dir(cfg) / "data" / "synthetic"


def pretrain_dir(cfg: CfgNode) -> Path:
    """Folder of the pre-trained model."""
    return Path(cfg.PRETRAIN.DIR) if cfg.PRETRAIN.DIR else output_dir(cfg) / "pretrain"


def finetune_dir(cfg: CfgNode) -> Path:
    """Folder of the fine-tuned fold models and out-of-fold predictions."""
    return output_dir(cfg) / "finetune"


def leads_in_use(cfg: CfgNode) -> tuple[str, ...]:
    """Lead names used for fine-tuning and evaluation."""
    from kale_ext.loaddata.leads import resolve_leads

    return resolve_leads(parse_leads(cfg.DATASET.LEADS))


def pretrain_leads(cfg: CfgNode) -> tuple[str, ...]:
    """Lead names of the pre-trained encoders."""
    from kale_ext.loaddata.leads import resolve_leads

    return resolve_leads(parse_leads(cfg.DATASET.PRETRAIN_LEADS))


def preprocess_spec(cfg: CfgNode):
    """The preprocessing of every cache of the run."""
    from kale_ext.prepdata.ecg_transforms import PreprocessSpec

    return PreprocessSpec(target_fs=float(cfg.DATASET.FS), target_length=int(cfg.DATASET.INPUT_LENGTH))


def _lead_tag(leads: tuple[str, ...]) -> str:
    from kale_ext.loaddata.leads import LEAD_SETS

    for name, members in LEAD_SETS.items():
        if tuple(members) == tuple(leads):
            return name
    return "-".join(leads)


def pretrain_cache_dir(cfg: CfgNode) -> Path:
    """Cache of the pre-training records (depends on the preprocessing and the required leads)."""
    return cache_root(cfg) / f"pretrain_{_lead_tag(pretrain_leads(cfg))}_{preprocess_spec(cfg).fingerprint()}"


def finetune_cache_dir(cfg: CfgNode) -> Path:
    """Cache of the labelled records."""
    return cache_root(cfg) / f"finetune_{_lead_tag(leads_in_use(cfg))}_{preprocess_spec(cfg).fingerprint()}"


def labels_path(cfg: CfgNode) -> Path:
    """Label table of the run (id column + ``label``), written by the prepare stage."""
    return output_dir(cfg) / "labels.csv"


def method_label(cfg: CfgNode) -> str:
    """Method name shown in results."""
    if cfg.OUTPUT.METHOD_LABEL:
        return cfg.OUTPUT.METHOD_LABEL
    names = {
        "lsemvae": "LS-EMVAE",
        "lsemvae_reference": "LS-EMVAE (reference code)",
        "mvae": "MVAE",
        "mopoe": "MoPoE-VAE",
        "mmvae": "MMVAE",
        "betavae": "beta-VAE",
        "multimodal_cnn": "Multimodal-CNN",
        "resnet1d": "ResNet1d",
        "xresnet1d": "xResNet1d",
    }
    label = names[cfg.MODEL.NAME]
    flags = [
        f
        for f, on in (("no PoE", cfg.MODEL.NO_POE), ("no MoE", cfg.MODEL.NO_MOE), ("no gate", cfg.MODEL.NO_GATE))
        if on
    ]
    if cfg.PRETRAIN.GAMMA == 0 and cfg.MODEL.NAME not in SUPERVISED_MODELS:
        flags.append("no alignment")
    return label + (f" ({', '.join(flags)})" if flags else "")


def task_name(cfg: CfgNode) -> str:
    """Task label written to metrics.json."""
    return {"ph": "ph_detection", "phenotype": "ph_phenotype", "pawp": "elevated_pawp"}[cfg.TASK.NAME]


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _global_rank() -> int:
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if key in os.environ:
            try:
                return int(os.environ[key])
            except ValueError:
                pass
    return 0


def model_build_args(cfg: CfgNode, lead_names: tuple[str, ...]) -> dict:
    """Arguments of ``kale_ext.embed.lsemvae.build_model`` for this config (JSON-serialisable)."""
    options = {}
    if cfg.MODEL.NAME in ("lsemvae", "multimodal_cnn"):
        options.update(no_poe=cfg.MODEL.NO_POE, no_moe=cfg.MODEL.NO_MOE, no_gate=cfg.MODEL.NO_GATE)
    if cfg.MODEL.NAME in ("mvae", "mopoe") and not cfg.MODEL.USE_PRIOR:
        options["use_prior"] = False
    if cfg.MODEL.NAME in ("resnet1d", "xresnet1d") and len(cfg.MODEL.BASELINE_WIDTHS):
        options["widths"] = [int(w) for w in cfg.MODEL.BASELINE_WIDTHS]
    return {
        "name": cfg.MODEL.NAME,
        "lead_names": list(lead_names),
        "input_dim": int(cfg.DATASET.INPUT_LENGTH),
        "latent_dim": int(cfg.MODEL.LATENT_DIM),
        **options,
    }


def build_from_args(**args) -> torch.nn.Module:
    """Rebuild a model from ``model_build_args`` output."""
    from kale_ext.embed.lsemvae import build_model

    args = dict(args)
    return build_model(args.pop("name"), args.pop("lead_names"), args.pop("input_dim"), args.pop("latent_dim"), **args)


# ---------------------------------------------------------------------------------------------------------------------
# Stage: prepare
# ---------------------------------------------------------------------------------------------------------------------
def _synthetic_sources(cfg: CfgNode) -> tuple[Path, Path, Path]:
    """Generate (once) the labelled synthetic cohort and an unlabelled archive; return their roots and labels CSV."""
    from kale_ext.loaddata.synthetic import write_synthetic_archive, write_synthetic_cohort

    root = synthetic_dir(cfg)
    syn = cfg.DATASET.SYNTHETIC
    labelled, archive = root / "labelled", root / "archive"
    # Written at the run's sampling rate (10 s records), so short CPU runs do not resample 500 Hz files.
    fs = float(cfg.DATASET.FS)
    jobs = (
        (labelled, syn.N_SUBJECTS, lambda: write_synthetic_cohort(labelled, int(syn.N_SUBJECTS), int(syn.SEED), fs)),
        (
            archive,
            syn.N_ARCHIVE_SUBJECTS,
            lambda: write_synthetic_archive(
                archive,
                int(syn.N_ARCHIVE_SUBJECTS),
                int(syn.SEED) + 1,
                records_per_subject=syn.ARCHIVE_RECORDS_PER_SUBJECT,
                fs=fs,
            ),
        ),
    )
    for folder, n, write in jobs:
        done = folder / "DONE"
        if n <= 0 or done.exists():
            continue
        if _global_rank() != 0:
            _wait_for(done)
            continue
        logger.info("generating synthetic ECG records (%d subjects) in %s", n, folder)
        write()
        done.write_text("synthetic cohort complete\n", encoding="utf-8")
    return labelled, archive, _find_haemodynamics(labelled)


def _find_haemodynamics(folder: Path) -> Path:
    for name in ("haemodynamics.csv", "hemodynamics.csv"):
        if (folder / name).is_file():
            return folder / name
    candidates = [p for p in folder.glob("*.csv") if p.name != "record_list.csv"]
    if not candidates:
        raise FileNotFoundError(f"no haemodynamics CSV in {folder}; regenerate the synthetic cohort")
    return candidates[0]


def _wait_for(path: Path, timeout_s: float = 3600.0) -> None:
    start = time.time()
    while not path.exists():
        if time.time() - start > timeout_s:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {path}; run --stage prepare on one process first")
        time.sleep(2.0)


def _build_cache(source, out_dir: Path, cfg: CfgNode, leads: tuple[str, ...]) -> None:
    from kale_ext.prepdata.ecg_cache import prepare_ecg_cache

    if (out_dir / "spec.json").exists():
        logger.info("reusing cache %s", out_dir)
        return
    if _global_rank() != 0:
        _wait_for(out_dir / "spec.json")
        return
    workers = cfg.DATASET.PREPARE_WORKERS if cfg.DATASET.PREPARE_WORKERS > 0 else None
    report = prepare_ecg_cache(
        source,
        out_dir,
        spec=preprocess_spec(cfg),
        leads=list(leads),
        num_workers=workers,
        progress=cfg.TRAINER.PROGRESS_BAR,
    )
    logger.info(
        "cache %s: %d of %d records written, %d skipped", out_dir, report.n_written, report.n_input, report.n_skipped
    )
    if report.n_written == 0:
        raise RuntimeError(f"no record of {source} passed quality control; see {out_dir / 'qc.csv'}")


def make_labels(cfg: CfgNode, labels_csv: str | Path) -> pd.DataFrame:
    """Label table (id column, ``label``) from a ready label column or the task's threshold rule."""
    from kale_ext.loaddata.ecg_dataset import label_from_threshold

    id_col = cfg.DATASET.LABEL_ID_COLUMN
    if cfg.DATASET.LABEL_COLUMN:
        table = pd.read_csv(labels_csv, dtype={id_col: str})
        missing = [c for c in (id_col, cfg.DATASET.LABEL_COLUMN) if c not in table.columns]
        if missing:
            raise ValueError(f"{labels_csv} lacks columns {missing}; it has {list(table.columns)}")
        out = table[[id_col, cfg.DATASET.LABEL_COLUMN]].dropna().rename(columns={cfg.DATASET.LABEL_COLUMN: "label"})
        out["label"] = out["label"].astype(int)
        return out
    task = cfg.TASK
    if task.NAME == "ph":
        return label_from_threshold(labels_csv, "detection", task.MPAP_COLUMN, task.MPAP_THRESHOLD, id_col)
    if task.NAME == "phenotype":
        return label_from_threshold(
            labels_csv,
            "phenotype",
            [task.MPAP_COLUMN, task.PAWP_COLUMN],
            [task.MPAP_THRESHOLD, task.PAWP_THRESHOLD],
            id_col,
        )
    return label_from_threshold(labels_csv, "elevated", task.PAWP_COLUMN, task.PAWP_THRESHOLD, id_col)


def stage_prepare(cfg: CfgNode) -> None:
    """Synthetic cohort (when no data are configured), the caches and the label table."""
    from kale_ext.loaddata.wfdb_sources import list_records

    supervised = cfg.MODEL.NAME in SUPERVISED_MODELS
    if is_synthetic(cfg):
        labelled, archive, haemo = _synthetic_sources(cfg)
        finetune_source, labels_csv = labelled, haemo
        # Pre-training sees the unlabelled archive and the labelled cohort's records without their labels.
        pretrain_source = list_records(archive) + list_records(labelled) if archive.exists() else labelled
    else:
        finetune_source = cfg.DATASET.FINETUNE_SOURCE
        labels_csv = cfg.DATASET.LABELS_CSV
        if not labels_csv:
            raise ValueError("DATASET.LABELS_CSV is empty; give the labels CSV of DATASET.FINETUNE_SOURCE")
        pretrain_source = cfg.DATASET.PRETRAIN_SOURCE or finetune_source
    _build_cache(finetune_source, finetune_cache_dir(cfg), cfg, leads_in_use(cfg))
    if not supervised:
        from kale_ext.pipeline.pretrain import is_pretrained

        if not is_pretrained(pretrain_dir(cfg)):
            _build_cache(pretrain_source, pretrain_cache_dir(cfg), cfg, pretrain_leads(cfg))
    if _global_rank() == 0:
        table = make_labels(cfg, labels_csv)
        labels_path(cfg).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(labels_path(cfg), index=False)
        logger.info("labels: %d ids, %d positive (%s)", len(table), int(table["label"].sum()), cfg.TASK.NAME)


# ---------------------------------------------------------------------------------------------------------------------
# Stage: pretrain
# ---------------------------------------------------------------------------------------------------------------------
def pretrain_settings(cfg: CfgNode):
    """``PretrainSettings`` from the config."""
    from kale_ext.pipeline.pretrain import PretrainSettings

    p, t = cfg.PRETRAIN, cfg.TRAINER
    return PretrainSettings(
        epochs=p.EPOCHS,
        batch_size=p.BATCH_SIZE,
        lr=p.LR,
        weight_decay=p.WEIGHT_DECAY,
        grad_clip=p.GRAD_CLIP,
        beta=p.BETA,
        beta_warmup_epochs=p.BETA_WARMUP_EPOCHS,
        gamma=p.GAMMA,
        loss_mode=p.LOSS_MODE,
        val_fraction=p.VAL_FRACTION,
        seed=cfg.SEED,
        num_workers=cfg.DATASET.NUM_WORKERS,
        accelerator=t.ACCELERATOR,
        devices=t.DEVICES if t.DEVICES != 0 else "auto",
        num_nodes=t.NUM_NODES,
        strategy=t.STRATEGY,
        precision=t.PRECISION,
        log_every_n_steps=t.LOG_EVERY_N_STEPS,
        progress_bar=t.PROGRESS_BAR,
        resume=p.RESUME,
        fail_at_epoch=p.DEBUG_FAIL_AT_EPOCH,
        log_indices=p.DEBUG_LOG_INDICES,
        compile=p.COMPILE,
    )


def stage_pretrain(cfg: CfgNode) -> bool:
    """Pre-train the VAE (skipped for supervised baselines and when a finished model exists).

    Returns:
        True on the global rank 0 (or when nothing ran); False on other DDP ranks, which stop after this stage.
    """
    from kale_ext.loaddata.ecg_dataset import ECGLeadDataset
    from kale_ext.pipeline.pretrain import is_pretrained, run_pretraining

    if cfg.MODEL.NAME in SUPERVISED_MODELS:
        logger.info("%s is supervised: no pre-training", cfg.MODEL.NAME)
        return True
    out = pretrain_dir(cfg)
    if is_pretrained(out):
        logger.info("reusing the pre-trained model in %s", out)
        return True
    dataset = ECGLeadDataset(
        pretrain_cache_dir(cfg), leads=pretrain_leads(cfg), expected_fingerprint=preprocess_spec(cfg)
    )
    if cfg.DATASET.MAX_PRETRAIN_RECORDS > 0 and len(dataset) > cfg.DATASET.MAX_PRETRAIN_RECORDS:
        dataset = ECGLeadDataset(
            pretrain_cache_dir(cfg), leads=pretrain_leads(cfg), indices=np.arange(cfg.DATASET.MAX_PRETRAIN_RECORDS)
        )
    torch.manual_seed(cfg.SEED)
    args = model_build_args(cfg, pretrain_leads(cfg))
    model = build_from_args(**args)
    logger.info("pre-training %s (%d parameters) on %d records", cfg.MODEL.NAME, model.num_parameters(), len(dataset))
    result = run_pretraining(model, dataset, out, pretrain_settings(cfg), build_args=args, leads=pretrain_leads(cfg))
    return result.is_global_zero


# ---------------------------------------------------------------------------------------------------------------------
# Stage: finetune
# ---------------------------------------------------------------------------------------------------------------------
def finetune_settings(cfg: CfgNode):
    """``FinetuneSettings`` from the config."""
    from kale_ext.pipeline.finetune import FinetuneSettings

    f = cfg.FINETUNE
    threshold = f.THRESHOLD if f.THRESHOLD in ("youden", "argmax") else float(f.THRESHOLD)
    epochs = f.EPOCHS
    if cfg.MODEL.NAME in SUPERVISED_MODELS and f.SUPERVISED_EPOCHS > 0:
        epochs = f.SUPERVISED_EPOCHS
    return FinetuneSettings(
        epochs=epochs,
        batch_size=f.BATCH_SIZE,
        lr=f.LR,
        weight_decay=f.WEIGHT_DECAY,
        optimizer=f.OPTIMIZER,
        loss=f.LOSS,
        focal_gamma=f.FOCAL_GAMMA,
        focal_alpha=None if f.FOCAL_ALPHA < 0 else f.FOCAL_ALPHA,
        threshold=threshold,
        hidden_dim=f.HIDDEN_DIM,
        dropout=f.DROPOUT,
        seed=cfg.SEED,
        device=_device(),
        progress=cfg.TRAINER.PROGRESS_BAR,
    )


def feature_mode(cfg: CfgNode) -> str:
    """Feature mode actually used: a joint-encoder model (beta-VAE) has one expert, so its features are fused."""
    return "fused_mean" if cfg.MODEL.NAME == "betavae" else cfg.FINETUNE.FEATURES


def labelled_dataset(cfg: CfgNode):
    """The labelled records of the run (``ECGLeadDataset`` with ``label``)."""
    from kale_ext.loaddata.ecg_dataset import ECGLeadDataset

    return ECGLeadDataset(
        finetune_cache_dir(cfg),
        leads=leads_in_use(cfg),
        labels=labels_path(cfg),
        label_column="label",
        id_column=cfg.DATASET.LABEL_ID_COLUMN,
        expected_fingerprint=preprocess_spec(cfg),
    )


def make_classifier_factory(cfg: CfgNode, in_features: int | None = None):
    """Builder of a fresh fold classifier for this config (head, or supervised network)."""
    from kale_ext.pipeline.finetune import MaskedInputClassifier, head_factory
    from kale_ext.predict.heads import ClassificationHead, FeatureClassifier, LatentFeatureExtractor

    settings = finetune_settings(cfg)
    leads = leads_in_use(cfg)
    if cfg.MODEL.NAME == "multimodal_cnn":

        def make():
            net = build_from_args(**model_build_args(cfg, leads))
            extractor = LatentFeatureExtractor(net, leads, "concat_means")
            head = ClassificationHead(len(leads) * cfg.MODEL.LATENT_DIM, 2, settings.hidden_dim, settings.dropout)
            return FeatureClassifier(extractor, head, freeze_extractor=False)

        return make
    if cfg.MODEL.NAME in SUPERVISED_MODELS:
        return lambda: MaskedInputClassifier(build_from_args(**model_build_args(cfg, leads)))
    return head_factory(in_features, settings)


def stage_finetune(cfg: CfgNode) -> None:
    """Cross-validated fine-tuning; writes fold models, ``folds.csv`` and ``finetune/oof.csv``."""
    from kale_ext.evaluate.cross_validation import make_folds
    from kale_ext.pipeline.finetune import cross_validate, extract_features, feature_dataset
    from kale_ext.pipeline.pretrain import load_model
    from kale_ext.predict.heads import LatentFeatureExtractor

    out = finetune_dir(cfg)
    if (out / "DONE").exists():
        logger.info("reusing the fine-tuned models in %s", out)
        return
    out.mkdir(parents=True, exist_ok=True)
    dataset = labelled_dataset(cfg)
    labels = np.asarray(dataset.labels)
    folds = make_folds(labels, groups=dataset.subject_ids, n_splits=cfg.EVAL.N_SPLITS, seed=cfg.EVAL.SEED)
    settings = finetune_settings(cfg)
    leads = leads_in_use(cfg)
    info = {"model": cfg.MODEL.NAME, "leads": list(leads), "input_dim": int(cfg.DATASET.INPUT_LENGTH)}
    if cfg.MODEL.NAME in SUPERVISED_MODELS:
        data = dataset
        make = make_classifier_factory(cfg)
        info.update(kind="supervised", build_args=model_build_args(cfg, leads))
    else:
        vae = load_model(pretrain_dir(cfg), build_from_args, device=settings.device)
        extractor = LatentFeatureExtractor(vae, leads, feature_mode(cfg))
        logger.info(
            "computing frozen %s features of %d records once (sliced per fold)", feature_mode(cfg), len(dataset)
        )
        features = extract_features(
            extractor, dataset, cfg.FINETUNE.FEATURE_BATCH_SIZE, settings.device, cfg.TRAINER.PROGRESS_BAR
        )
        np.save(out / "features.npy", features)
        data = feature_dataset(features, labels)
        make = make_classifier_factory(cfg, features.shape[1])
        info.update(
            kind="head",
            features=feature_mode(cfg),
            in_features=int(features.shape[1]),
            pretrain_dir=str(pretrain_dir(cfg)),
        )

    def save_fold(outcome) -> None:
        fold_dir = out / f"fold{outcome.fold}"
        fold_dir.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in outcome.model.state_dict().items()}, fold_dir / "model.pt")
        (fold_dir / "metrics.json").write_text(
            json.dumps({**outcome.metrics, "threshold": outcome.threshold}, indent=2), encoding="utf-8"
        )

    result = cross_validate(make, data, labels, folds, settings, on_fold_end=save_fold)
    (out / "classifier.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    oof = pd.DataFrame(
        {
            "record_id": dataset.record_ids,
            "subject_id": dataset.subject_ids,
            "label": labels,
            "fold": folds,
            "threshold": result.threshold,
            "probability": result.prob,
        }
    )
    oof.to_csv(out / "oof.csv", index=False)
    oof[["record_id", "subject_id", "label", "fold", "threshold"]].to_csv(output_dir(cfg) / "folds.csv", index=False)
    (out / "DONE").write_text("fine-tuning finished\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------------
# Stage: evaluate
# ---------------------------------------------------------------------------------------------------------------------
def subject_level(oof: pd.DataFrame) -> pd.DataFrame:
    """One row per subject: mean probability of its records (all in one fold), its label, fold and threshold."""
    grouped = oof.groupby("subject_id", sort=False)
    return pd.DataFrame(
        {
            "subject_id": grouped["subject_id"].first().astype(str),
            "record_id": grouped["record_id"].agg(lambda s: ";".join(map(str, s))),
            "label": grouped["label"].first().astype(int),
            "probability": grouped["probability"].mean(),
            "fold": grouped["fold"].first().astype(int),
            "threshold": grouped["threshold"].first(),
        }
    ).reset_index(drop=True)


def stage_evaluate(cfg: CfgNode) -> dict:
    """Metrics per fold, mean +- std, bootstrap CI; metrics.json, predictions.csv, results.md, results.csv, roc.png."""
    from kale_ext.evaluate.metrics import binary_metrics
    from kale_ext.evaluate.reports import (
        plot_roc,
        predictions_frame,
        results_row,
        summary_with_ci,
        write_metrics_json,
        write_predictions_csv,
        write_results_table,
    )

    out = output_dir(cfg)
    oof_path = finetune_dir(cfg) / "oof.csv"
    if not oof_path.exists():
        raise FileNotFoundError(f"{oof_path} not found; run --stage finetune first")
    subjects = subject_level(pd.read_csv(oof_path, dtype={"subject_id": str, "record_id": str}))
    y, p = subjects["label"].to_numpy(), subjects["probability"].to_numpy()
    fold_ids, thr = subjects["fold"].to_numpy(), subjects["threshold"].to_numpy()
    fold_metrics = []
    for k in sorted(np.unique(fold_ids)):
        sel = fold_ids == k
        fold_metrics.append(binary_metrics(y[sel], p[sel], float(thr[sel][0])))
    summary = summary_with_ci(fold_metrics, y, p, thr, n_boot=cfg.EVAL.N_BOOT, seed=cfg.SEED)
    synthetic = is_synthetic(cfg)
    leads = leads_in_use(cfg)
    method = method_label(cfg)
    extra = {"note": SYNTHETIC_NOTE} if synthetic else {}
    write_metrics_json(
        out / "metrics.json",
        synthetic=synthetic,
        task=task_name(cfg),
        method=method,
        leads=leads,
        folds=fold_metrics,
        summary=summary,
        n_subjects=int(len(subjects)),
        **extra,
    )
    table = predictions_frame(subjects["subject_id"], y, p, fold_ids, thr, record_ids=subjects["record_id"])
    table["synthetic"] = synthetic
    write_predictions_csv(out / "predictions.csv", table)
    title = f"{task_name(cfg)}: {method}, {_lead_tag(leads)}"
    write_results_table(
        [results_row(method, _lead_tag(leads), summary)],
        out / "results.md",
        out / "results.csv",
        title=title,
        synthetic=synthetic,
    )
    plot_roc(y, p, fold_ids, out / "roc.png", title=("[synthetic] " if synthetic else "") + title)
    _write_output_readme(cfg, summary)
    return summary


def _write_output_readme(cfg: CfgNode, summary: dict) -> None:
    lines = [f"# Outputs of {method_label(cfg)}, {cfg.DATASET.LEADS}, task {cfg.TASK.NAME}", ""]
    if is_synthetic(cfg):
        lines += [f"**{SYNTHETIC_NOTE}**", ""]
    lines += [
        "- `config.yaml`: the merged configuration",
        "- `metrics.json`: per-fold metrics and mean/std/bootstrap 95% CI",
        "- `predictions.csv`: out-of-fold probability per subject (`synthetic` column says whether data are generated)",
        "- `results.md` / `results.csv`: Table-2-style row; `roc.png`: ROC curves per fold and pooled",
        "- `pretrain/`: pre-trained model (`model.pt`, `model_args.json`), checkpoints, TensorBoard/CSV logs",
        "- `finetune/`: fold models, features, out-of-fold predictions; `folds.csv`: fold and threshold per record",
        "",
        "| metric | mean | std | 95% CI |",
        "| --- | --- | --- | --- |",
    ]
    for name in ("accuracy", "auroc", "mcc"):
        e = summary.get(name)
        if e:
            lines.append(f"| {name} | {e['mean']:.3f} | {e['std']:.3f} | [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}] |")
    (output_dir(cfg) / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------------
# Stage: predict
# ---------------------------------------------------------------------------------------------------------------------
def stage_predict(cfg: CfgNode) -> pd.DataFrame:
    """Score new WFDB records with the fold models: mean probability over folds, threshold = mean fold threshold.

    Records lacking a lead of DATASET.LEADS are refused: they get no probability and a ``status`` naming the lead.
    """
    from artifacts import load_fold_classifier

    from kale_ext.loaddata.ecg_dataset import ECGLeadDataset
    from kale_ext.pipeline.finetune import predict_proba

    if not cfg.PREDICT.SOURCE:
        raise ValueError("PREDICT.SOURCE is empty; give a folder of WFDB records or a manifest CSV to score")
    folds = pd.read_csv(output_dir(cfg) / "folds.csv")
    fold_thresholds = folds.groupby("fold")["threshold"].first()
    threshold = float(fold_thresholds.mean())
    leads = leads_in_use(cfg)
    cache = output_dir(cfg) / "predict" / f"cache_{preprocess_spec(cfg).fingerprint()}"
    from kale_ext.prepdata.ecg_cache import prepare_ecg_cache

    prepare_ecg_cache(
        cfg.PREDICT.SOURCE,
        cache,
        spec=preprocess_spec(cfg),
        leads=list(leads),
        num_workers=1,
        progress=cfg.TRAINER.PROGRESS_BAR,
        overwrite=True,
    )
    rows = []
    qc = pd.read_csv(cache / "qc.csv", dtype=str, keep_default_na=False)
    refused = qc[qc["status"] != "ok"] if "status" in qc.columns else qc.iloc[0:0]
    for _, r in refused.iterrows():
        reason = r.get("reason", "")
        message = f"refused: {reason}"
        logger.warning(
            "record %s %s; it needs the leads %s (DATASET.LEADS %s)",
            r["record_id"],
            message,
            ", ".join(leads),
            cfg.DATASET.LEADS,
        )
        rows.append({"record_id": r["record_id"], "probability": np.nan, "prediction": np.nan, "status": message})
    scored = pd.DataFrame()
    if (cache / "signals.npy").exists() and len(pd.read_csv(cache / "index.csv")) > 0:
        data = ECGLeadDataset(cache, leads=leads)
        ok = data.masks.all(axis=1)
        for i in np.flatnonzero(~ok):
            absent = [lead for lead, present in zip(leads, data.masks[i]) if not present]
            message = f"refused: lacks lead {', '.join(absent)}"
            logger.warning("record %s %s required by DATASET.LEADS %s", data.record_ids[i], message, cfg.DATASET.LEADS)
            rows.append(
                {"record_id": data.record_ids[i], "probability": np.nan, "prediction": np.nan, "status": message}
            )
        keep = np.flatnonzero(ok)
        if len(keep):
            subset = torch.utils.data.Subset(data, keep.tolist())
            probs = [
                predict_proba(load_fold_classifier(cfg, int(k)), subset, device="cpu") for k in fold_thresholds.index
            ]
            prob = np.mean(probs, axis=0)
            scored = pd.DataFrame(
                {
                    "record_id": data.record_ids[keep],
                    "subject_id": data.subject_ids[keep],
                    "probability": prob,
                    "prediction": (prob >= threshold).astype(int),
                    "status": "ok",
                }
            )
    parts = [part for part in (scored, pd.DataFrame(rows)) if len(part)]
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["record_id", "status"])
    table["threshold"] = threshold
    out_csv = Path(cfg.PREDICT.OUT_CSV) if cfg.PREDICT.OUT_CSV else output_dir(cfg) / "predict" / "scores.csv"
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_csv, index=False)
    print(
        f"scored {int((table['status'] == 'ok').sum())} records, refused {int((table['status'] != 'ok').sum())}; "
        f"wrote {out_csv}"
    )
    return table


# ---------------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------------
def setup_logging(cfg: CfgNode) -> None:
    """Log to the console and to <OUTPUT.DIR>/run.log; the first line says whether the data are synthetic."""
    output_dir(cfg).mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_lsemvae", False)]:
        root.removeHandler(handler)  # a new run (e.g. in a comparison) logs to its own run.log
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(output_dir(cfg) / "run.log")):
        handler.setFormatter(fmt)
        handler._lsemvae = True
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    if is_synthetic(cfg):
        logger.info(SYNTHETIC_NOTE)
    else:
        logger.info(
            "data: fine-tuning %s, labels %s, pre-training %s",
            cfg.DATASET.FINETUNE_SOURCE,
            cfg.DATASET.LABELS_CSV,
            cfg.DATASET.PRETRAIN_SOURCE or cfg.DATASET.FINETUNE_SOURCE,
        )


def run(cfg: CfgNode, stage: str = "all") -> dict | None:
    """Run one stage, or all of them, for a validated config. Returns the metrics summary after evaluation."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not accepted; use one of: {', '.join(STAGES)}")
    setup_logging(cfg)
    if _global_rank() == 0:
        (output_dir(cfg) / "config.yaml").write_text(cfg.dump(), encoding="utf-8")
    stages = list(PIPELINE_STAGES) if stage == "all" else [stage]
    if stage == "all" and cfg.INTERPRET.ENABLED:
        stages.append("interpret")
    summary = None
    for name in stages:
        start = time.time()
        logger.info("stage %s", name)
        if name == "prepare":
            stage_prepare(cfg)
        elif name == "pretrain":
            if not stage_pretrain(cfg):
                return None  # a non-zero DDP rank: its work ends with pre-training
        elif name == "finetune":
            stage_finetune(cfg)
        elif name == "evaluate":
            summary = stage_evaluate(cfg)
        elif name == "predict":
            stage_predict(cfg)
        elif name == "interpret":
            from interpret_stage import run_interpret

            run_interpret(cfg)
        logger.info("stage %s done in %.1f s", name, time.time() - start)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line: --cfg (repeatable) and --stage anywhere, the other words are KEY VALUE overrides."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], usage="%(prog)s [--cfg CFG ...] [--stage STAGE] [KEY VALUE ...]"
    )
    parser.add_argument("--cfg", action="append", default=[], help="config path or name in configs/ (repeatable)")
    parser.add_argument("--stage", default="all", help=f"one of: {', '.join(STAGES)}")
    args, rest = parser.parse_known_args(argv)
    unknown = [word for word in rest if word.startswith("--")]
    if unknown:
        parser.error(f"unknown options {unknown}; overrides are KEY VALUE pairs such as OUTPUT.DIR outputs/x")
    args.opts = rest
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    if args.stage not in STAGES:
        print(f"error: --stage {args.stage!r} is not accepted; use one of: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    try:
        cfg = load_cfg(args.cfg, args.opts)
    except (ValueError, FileNotFoundError, KeyError, AssertionError) as err:
        print(f"error: invalid configuration: {err}", file=sys.stderr)
        return 2
    start = time.time()
    summary = run(cfg, args.stage)
    if summary is not None:
        auroc = summary["auroc"]
        tag = " [SYNTHETIC DATA]" if is_synthetic(cfg) else ""
        print(
            f"{method_label(cfg)} {cfg.DATASET.LEADS}{tag}: AUROC {auroc['mean']:.3f} +- {auroc['std']:.3f} "
            f"(95% CI {auroc['ci95'][0]:.3f}-{auroc['ci95'][1]:.3f}); accuracy {summary['accuracy']['mean']:.3f}, "
            f"MCC {summary['mcc']['mean']:.3f}; {time.time() - start:.0f} s; outputs in {output_dir(cfg)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
