"""The stages of the PH example: prepare, pretrain, finetune, evaluate, predict.

Each stage takes the ``RunLayout`` of the run (``layout.py``), composes library parts and reuses finished outputs of
earlier runs. What a model is comes from the registry ``kale_ext.embed.zoo.MODELS``; saving and loading trained
models is ``kale_ext.pipeline.artifacts``; subject-level metrics are ``kale_ext.evaluate.aggregate``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from config import get_key
from ecg_tables import PTBXL_STATEMENTS
from layout import SYNTHETIC_NOTE, RunLayout, lead_tag

import kale_ext
from kale_ext.embed.zoo import build_from_args
from kale_ext.evaluate.aggregate import per_fold_metrics, subject_level
from kale_ext.evaluate.cross_validation import make_folds
from kale_ext.evaluate.reports import (
    format_headline,
    headline_auroc,
    plot_roc,
    predictions_frame,
    results_row,
    summary_with_ci,
    write_metrics_json,
    write_predictions_csv,
    write_results_table,
)
from kale_ext.evaluate.training_curves import plot_training_curves, read_training_logs
from kale_ext.loaddata.diagnosis_labels import (
    ValueRule,
    column_values,
    parse_groups,
    read_statement_table,
    statement_labels,
    target_kind,
    value_labels,
)
from kale_ext.loaddata.ecg_dataset import ECGLeadDataset, label_from_threshold
from kale_ext.loaddata.label_table import match_labels, read_label_table
from kale_ext.loaddata.record_table import list_table_records, source_kind
from kale_ext.loaddata.source_sets import combine_sources, split_sources
from kale_ext.loaddata.synthetic import write_synthetic_archive, write_synthetic_cohort
from kale_ext.loaddata.wfdb_sources import list_records
from kale_ext.pipeline import artifacts
from kale_ext.pipeline.epoch_log import EpochLogLine
from kale_ext.pipeline.finetune import FinetuneSettings, cross_validate, extract_features, feature_dataset
from kale_ext.pipeline.pretrain import PretrainSettings, run_pretraining
from kale_ext.pipeline.scoring import score_records
from kale_ext.predict.heads import LatentFeatureExtractor
from kale_ext.predict.objectives import build_objective
from kale_ext.prepdata.corruption import LeadCorruption
from kale_ext.prepdata.ecg_cache import cache_matches, prepare_ecg_cache
from kale_ext.utils.console import interactive
from kale_ext.utils.distributed import global_rank, wait_for
from kale_ext.utils.files import atomic_save_npy, atomic_write_text, file_digest, short_hash
from kale_ext.utils.stage_marker import stage_status, write_fingerprint

logger = logging.getLogger("lsemvae_ph")
#: Fewer optimiser steps than this in a training run draw a warning: too few for a model to learn much.
MIN_OPTIMISER_STEPS = 200


def show_bars(run: RunLayout) -> bool:
    """Progress bars only when TRAINER.PROGRESS_BAR is on and the output is a terminal (a log file gets lines)."""
    return bool(run.cfg.TRAINER.PROGRESS_BAR) and interactive()


def warn_if_few_steps(what: str, n_records: int, batch_size: int, epochs: int, drop_last: bool, hint: str) -> int:
    """Log a warning when ``epochs`` passes over ``n_records`` in batches give fewer than MIN_OPTIMISER_STEPS steps.

    Args:
        what: the training run, in words (``"pre-training"``, ``"fine-tuning (per fold)"``).
        n_records: training records per pass.
        batch_size: records per optimiser step.
        epochs: passes.
        drop_last: whether a short last batch is dropped (no step) or kept (a step).
        hint: the config keys that raise the count.

    Returns:
        The number of optimiser steps.
    """
    per_epoch = n_records // batch_size if drop_last else math.ceil(n_records / batch_size)
    steps = max(per_epoch, 0) * epochs
    if steps < MIN_OPTIMISER_STEPS:
        logger.warning(
            "%s will take only %d optimiser steps (%d records / batch size %d = %d steps per epoch x %d epochs), "
            "fewer than %d: the model may learn little; raise %s", what, steps, n_records, batch_size, per_epoch,
            epochs, MIN_OPTIMISER_STEPS, hint,
        )  # fmt: skip
    return steps


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _slice(cfg, keys: list[str]) -> dict:
    return {key: json.loads(json.dumps(get_key(cfg, key), default=str)) for key in keys}


def pretrain_fingerprint(run: RunLayout) -> dict:
    """What a pre-trained model is made from: the model it builds, the objective settings, the records, the code."""
    keys = ["SEED", "DATASET.PRETRAIN_LEADS", "DATASET.FS", "DATASET.INPUT_LENGTH",
            "DATASET.MAX_PRETRAIN_RECORDS", "DATASET.PRETRAIN_SOURCE", "DATASET.SYNTHETIC",
            "DATASET.PREPROCESS"]  # fmt: skip
    if not run.cfg.DATASET.PRETRAIN_SOURCE:
        keys.append("DATASET.FINETUNE_SOURCE")
    config = _slice(run.cfg, keys)
    config.update(_slice(run.cfg, [f"PRETRAIN.{k}" for k in run.cfg.PRETRAIN if k not in ("DIR", "RESUME")]))
    # The model by the registry record it is built from: keys that do not reach this model do not count.
    return {"code": kale_ext.__version__, "model": run.build_args(run.pretrain_leads), "config": config}


def finetune_fingerprint(run: RunLayout) -> dict:
    """What the fold classifiers are made from: labels, records, folds, head settings and the pre-trained model."""
    keys = ["SEED", "FINETUNE", "EVAL.N_SPLITS", "EVAL.SEED", "EVAL.FOLD_COLUMN", "TASK", "DATASET.LEADS",
            "DATASET.LABEL_ID_COLUMN", "DATASET.LABEL_COLUMN", "DATASET.LABELS_CSV", "DATASET.LABELS_CSV_ID_COLUMN",
            "DATASET.STATEMENTS_CSV"]  # fmt: skip
    cache = run.finetune_cache
    return {
        "code": kale_ext.__version__,
        "model": run.build_args(run.leads),
        "features": run.features,
        "config": _slice(run.cfg, keys),
        "labels": file_digest(run.labels),
        "records": file_digest(cache / "index.csv", cache / "spec.json"),
        "pretrain": pretrain_fingerprint(run) if not run.spec.end_to_end else None,
    }


def distrust_damaged(folder: Path, done_file: str) -> None:
    """Remove the completion marker of a folder whose models fail their checksums, so the stage runs again."""
    damaged = artifacts.damaged_models(folder) if (folder / done_file).exists() else []
    if damaged:
        logger.warning("%s; the %s marker is removed and the stage runs again", damaged[0], folder / done_file)
        (folder / done_file).unlink()


def finished(folder: Path, fingerprint: dict, done_file: str) -> bool:
    """True when ``folder`` holds a finished output of these inputs whose models pass their checksums."""
    distrust_damaged(folder, done_file)
    return stage_status(folder, fingerprint, done_file)[0] == "match"


def reuse_or_retire(folder: Path, fingerprint: dict, done_file: str, keep: bool, what: str) -> bool:
    """True when ``folder`` holds a finished output of these inputs; a stale one is moved aside (or refused).

    A finished output, or an unfinished one with checkpoints, made from other inputs is renamed to
    ``<folder>.stale-<k>`` (nothing is deleted) and the stage recomputes; with ``keep`` (the user named the folder
    to be shared) it is refused with the differences named.
    """
    distrust_damaged(folder, done_file)
    started = any((folder / "checkpoints").glob("*.ckpt"))  # an interrupted run resumes only from the same inputs
    status, diffs = stage_status(folder, fingerprint, done_file, in_progress=started)
    if status == "match":
        logger.info("reusing the %s in %s (same inputs)", what, folder)
        return True
    if status == "stale":
        changes = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        if keep:
            raise RuntimeError(f"the {what} in {folder} was made from other inputs ({changes}); use another folder "
                               "or delete it to recompute")  # fmt: skip
        k = 1
        while folder.with_name(f"{folder.name}.stale-{k}").exists():
            k += 1
        shutil.move(str(folder), str(folder.with_name(f"{folder.name}.stale-{k}")))
        logger.warning("the %s in %s was made from other inputs (%s): moved to %s.stale-%d, recomputing", what,
                       folder, changes, folder.name, k)  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    write_fingerprint(folder, fingerprint)
    return False


ROOT_OUTPUTS = ("metrics.json", "predictions.csv", "results.md", "results.csv", "roc.png", "training_curves.png",
                "README.md")  # fmt: skip
OUTPUTS_RECORD = "outputs.json"  # which fine-tuned models the root outputs were computed from, with file digests


def retire_stale_outputs(run: RunLayout) -> Path | None:
    """Move root outputs of other fine-tuned models (or of an interrupted evaluation) to ``stale-outputs-<k>/``.

    ``outputs.json`` (written last by the evaluation) names the fine-tuning fingerprint the root outputs come from;
    outputs without it, or from another fingerprint, would describe models this run no longer has.

    Returns:
        The folder they were moved to, or None when nothing was stale.
    """
    present = [run.out / name for name in ROOT_OUTPUTS if (run.out / name).exists()]
    if not present:
        return None
    record = run.out / OUTPUTS_RECORD
    stored = json.loads(record.read_text(encoding="utf-8")).get("finetune") if record.is_file() else None
    if stored == short_hash(finetune_fingerprint(run)):
        return None
    k = 1
    while (run.out / f"stale-outputs-{k}").exists():
        k += 1
    target = run.out / f"stale-outputs-{k}"
    target.mkdir()
    for path in [*present, record] if record.is_file() else present:
        shutil.move(str(path), str(target / path.name))
    why = "made from other fine-tuned models" if stored else "not marked complete (an interrupted or older run)"
    logger.warning("root outputs %s were %s: moved to %s", ", ".join(p.name for p in present), why, target)
    return target


# ---------------------------------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------------------------------
def _synthetic_sources(run: RunLayout) -> tuple[Path, Path, Path]:
    """Generate (once) the labelled synthetic cohort and an unlabelled archive; return their roots and labels CSV."""
    syn, fs = run.cfg.DATASET.SYNTHETIC, float(run.cfg.DATASET.FS)  # written at the run's rate: no resampling
    labelled, archive = run.synthetic_dir / "labelled", run.synthetic_dir / "archive"
    jobs = (
        (labelled, syn.N_SUBJECTS, lambda: write_synthetic_cohort(labelled, int(syn.N_SUBJECTS), int(syn.SEED), fs)),
        (
            archive,
            syn.N_ARCHIVE_SUBJECTS,
            lambda: write_synthetic_archive(
                archive, int(syn.N_ARCHIVE_SUBJECTS), int(syn.SEED) + 1, syn.ARCHIVE_RECORDS_PER_SUBJECT, fs=fs
            ),
        ),
    )
    for folder, n, write in jobs:
        done = folder / "DONE"
        if n <= 0 or done.exists():
            continue
        if global_rank() != 0:
            wait_for(done)
            continue
        logger.info("generating synthetic ECG records (%d subjects) in %s", n, folder)
        write()
        done.write_text("synthetic cohort complete\n", encoding="utf-8")
    haemo = [labelled / n for n in ("haemodynamics.csv", "hemodynamics.csv") if (labelled / n).is_file()]
    if not haemo:
        raise FileNotFoundError(f"no haemodynamics CSV in {labelled}; delete the folder to regenerate the cohort")
    return labelled, archive, haemo[0]


def _build_cache(run: RunLayout, source, out_dir: Path, leads: tuple[str, ...], spec=None) -> None:
    spec = spec or run.preprocess
    if global_rank() != 0:
        wait_for(out_dir / "spec.json")
        return
    match = cache_matches(out_dir, source, spec, list(leads)) if (out_dir / "spec.json").exists() else False
    if match is True:
        logger.info("reusing cache %s (same records and preprocessing)", out_dir)
        return
    if match:
        logger.warning("cache %s was built from other inputs (%s); rebuilding it", out_dir, match)
    workers = run.cfg.DATASET.PREPARE_WORKERS if run.cfg.DATASET.PREPARE_WORKERS > 0 else None
    report = prepare_ecg_cache(
        source, out_dir, spec=spec, leads=list(leads), num_workers=workers,
        progress=show_bars(run), overwrite=bool(match),
    )  # fmt: skip
    counts = ", ".join(f"{k} {v}" for k, v in sorted(report.qc_counts.items()))
    logger.info("cache %s: %d of %d records written, %d skipped (%s); quality control: %s", out_dir,
                report.n_written, report.n_input, report.n_skipped, counts, report.qc_path)  # fmt: skip
    if report.n_written == 0:
        raise RuntimeError(f"no record of {source} passed quality control; see {out_dir / 'qc.csv'}")


def _id_text(value: str) -> str:
    text = str(value).strip()
    return text[:-2] if text.endswith(".0") and text[:-2].lstrip("+-").isdigit() else text  # '15709.0' is 15709


def statements_csv(run: RunLayout, labels_csv: str | Path) -> Path | None:
    """The statement table of TASK.NAME statement: DATASET.STATEMENTS_CSV, else the default beside the labels."""
    if run.cfg.DATASET.STATEMENTS_CSV:
        path = Path(run.cfg.DATASET.STATEMENTS_CSV)
        if not path.is_file():
            raise FileNotFoundError(f"DATASET.STATEMENTS_CSV {path} does not exist; give the statement table's path")
        return path
    beside = Path(labels_csv).parent / PTBXL_STATEMENTS
    return beside if beside.is_file() else None


def statement_task_labels(run: RunLayout, labels_csv: str | Path) -> pd.DataFrame:
    """Labels of TASK.NAME statement: TASK.LABEL as a class, a statement or a value of a diagnosis table.

    Returns the id column (DATASET.LABEL_ID_COLUMN), ``label`` (0/1) and, with EVAL.FOLD_COLUMN, ``table_fold``;
    records outside the task (no classed statement for a class target, an empty or unlisted value) are left out.
    """
    cfg, task = run.cfg, run.cfg.TASK
    path = Path(labels_csv)
    if not path.is_file():
        raise FileNotFoundError(f"DATASET.LABELS_CSV {path} does not exist; give the diagnosis table's path")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    id_col = cfg.DATASET.LABEL_ID_COLUMN
    source_id = cfg.DATASET.LABELS_CSV_ID_COLUMN or id_col
    for key, column in (("DATASET.LABELS_CSV_ID_COLUMN", source_id), ("EVAL.FOLD_COLUMN", cfg.EVAL.FOLD_COLUMN)):
        if column and column not in frame.columns:
            raise ValueError(f"{path} has no column {column!r} ({key}); it has: {', '.join(frame.columns)}")
    has_statements = bool(task.STATEMENT_COLUMN) and task.STATEMENT_COLUMN in frame.columns
    table_path = statements_csv(run, path) if has_statements else None
    statements = read_statement_table(table_path, task.CLASS_COLUMN) if table_path else None
    groups = parse_groups(list(task.VALUE_GROUPS))
    has_values = bool(task.VALUE_COLUMN) and task.VALUE_COLUMN in frame.columns
    values = [*groups, *column_values(frame, task.VALUE_COLUMN, task.VALUE_SEPARATOR)] if has_values else []
    try:
        kind = target_kind(task.LABEL, statements, values)
    except ValueError as err:
        sources = [f"statement table {table_path}" if table_path else "no statement table (DATASET.STATEMENTS_CSV)"]
        sources.append(f"column {task.VALUE_COLUMN!r}" if has_values else "no TASK.VALUE_COLUMN in the labels")
        where = ", ".join(sources)
        raise ValueError(f"TASK.LABEL = {task.LABEL!r} is not accepted ({err}); looked in {where}") from err
    if kind == "value":
        positive = groups.get(task.LABEL, (task.LABEL,))
        rule = ValueRule(task.VALUE_COLUMN, positive, empty=task.EMPTY_VALUE, separator=task.VALUE_SEPARATOR)
        label = value_labels(frame, rule)
    else:
        label = statement_labels(
            frame[task.STATEMENT_COLUMN], task.LABEL, statements, task.LIKELIHOOD_MIN, task.UNCERTAIN
        )
    out = pd.DataFrame({id_col: frame[source_id].map(_id_text), "label": label})
    if cfg.EVAL.FOLD_COLUMN:
        out["table_fold"] = pd.to_numeric(frame[cfg.EVAL.FOLD_COLUMN], errors="coerce")
    out = out.dropna(subset=["label"]).astype({"label": int})
    logger.info("%s (%s): %d records, %d positive, %d left out of the task", task.LABEL, kind, len(out),
                int(out["label"].sum()), len(frame) - len(out))  # fmt: skip
    return out


def table_folds(run: RunLayout, ids) -> np.ndarray:
    """Cross-validation folds from EVAL.FOLD_COLUMN: table fold v -> (v - 1) mod EVAL.N_SPLITS, per record.

    Args:
        run: the run layout.
        ids: the dataset's ids of the kind DATASET.LABEL_ID_COLUMN names, in dataset order.

    Raises:
        ValueError: a record without a fold number (the message names it and the column).
    """
    table = pd.read_csv(run.labels, dtype={run.cfg.DATASET.LABEL_ID_COLUMN: str})
    fold_of = table.set_index(run.cfg.DATASET.LABEL_ID_COLUMN)["table_fold"]
    values = fold_of.reindex([str(i) for i in ids])
    if values.isna().any():
        missing = values[values.isna()].index[0]
        raise ValueError(f"record {missing!r} has no number in EVAL.FOLD_COLUMN {run.cfg.EVAL.FOLD_COLUMN!r} of "
                         "DATASET.LABELS_CSV; fill it or set EVAL.FOLD_COLUMN empty")  # fmt: skip
    return ((values.to_numpy().astype(int) - 1) % run.cfg.EVAL.N_SPLITS).astype(int)


def make_labels(run: RunLayout, labels_csv: str | Path) -> pd.DataFrame:
    """Label table (id column, ``label``) from a ready label column, a diagnosis table or the task's threshold rule.

    Values are parsed strictly: unparseable cells (``25 mmHg``, ``31,5``) and implausible ones (outside
    TASK.MPAP_RANGE / PAWP_RANGE, e.g. kPa or 9999) are left out and listed, with their rows, in
    ``OUTPUT.DIR/label_problems.csv``.
    """
    cfg, task = run.cfg, run.cfg.TASK
    if task.NAME == "statement" and not cfg.DATASET.LABEL_COLUMN:
        (run.out / "label_problems.csv").write_text("row,column,value,kind,message\n", encoding="utf-8")
        return statement_task_labels(run, labels_csv)
    id_col = cfg.DATASET.LABEL_ID_COLUMN
    if cfg.DATASET.LABEL_COLUMN:
        columns, ranges = [cfg.DATASET.LABEL_COLUMN], {}
    else:
        columns = [task.MPAP_COLUMN] + ([task.PAWP_COLUMN] if task.NAME in ("phenotype", "pawp") else [])
        # mPAP in kPa (6-8 kPa = 45-60 mmHg) would lie inside the mmHg range: such values are listed, not used.
        ranges = {task.MPAP_COLUMN: (*task.MPAP_RANGE, "mmHg", "kPa"), task.PAWP_COLUMN: (*task.PAWP_RANGE, "mmHg")}
    keys = {id_col: "DATASET.LABEL_ID_COLUMN", cfg.DATASET.LABEL_COLUMN: "DATASET.LABEL_COLUMN",
            task.MPAP_COLUMN: "TASK.MPAP_COLUMN", task.PAWP_COLUMN: "TASK.PAWP_COLUMN"}  # fmt: skip
    try:
        report = read_label_table(labels_csv, id_col, columns, {c: r for c, r in ranges.items() if c in columns})
    except ValueError as err:
        missing = [name for name in [id_col, *columns] if f"has no column {name!r}" in str(err)]
        if missing:  # name the key that fixes it
            raise ValueError(f"{err}; set {keys[missing[0]]} to the column that holds it") from None
        raise
    problems = pd.DataFrame([dataclasses.asdict(p) for p in report.problems])
    atomic_write_text(run.out / "label_problems.csv", problems.to_csv(index=False))
    if report.problems:
        logger.warning("%s; the cells are left out (listed in %s)", report.summary(5), run.out / "label_problems.csv")
    table = report.table
    if cfg.DATASET.LABEL_COLUMN:
        out = table[[id_col, cfg.DATASET.LABEL_COLUMN]].dropna().rename(columns={cfg.DATASET.LABEL_COLUMN: "label"})
        return out.astype({"label": int}) if out["label"].isin([0, 1]).all() else out
    rules = {
        "ph": ("detection", task.MPAP_COLUMN, task.MPAP_THRESHOLD),
        "phenotype": ("phenotype", [task.MPAP_COLUMN, task.PAWP_COLUMN], [task.MPAP_THRESHOLD, task.PAWP_THRESHOLD]),
        "pawp": ("elevated", task.PAWP_COLUMN, task.PAWP_THRESHOLD),
    }
    return label_from_threshold(table, *rules[task.NAME], id_col)


def check_labels(run: RunLayout, table: pd.DataFrame) -> None:
    """Stop before any training when the labels cannot be used with the fine-tuning records (ids, classes, folds)."""
    index = pd.read_csv(run.finetune_cache / "index.csv", dtype=str, keep_default_na=False)
    id_col = run.cfg.DATASET.LABEL_ID_COLUMN
    if id_col not in index.columns:
        raise ValueError(f"DATASET.LABEL_ID_COLUMN {id_col!r} is not a column of the records' index "
                         f"({list(index.columns)}); use subject_id or record_id")  # fmt: skip
    match = match_labels(table, index[id_col], run.cfg.EVAL.N_SPLITS, id_column=id_col)
    logger.info("labels: %d of %d record ids matched (%.0f%%), classes %s", match.n_matched, match.n_ids,
                100 * match.match_rate, match.class_counts)  # fmt: skip
    match.raise_if_blocking()


def report_missing_records(run: RunLayout, sources: list[str]) -> pd.DataFrame:
    """Rows of record tables without a file at DATASET.FS, written to ``OUTPUT.DIR/missing_records.csv``.

    Args:
        run: the run layout.
        sources: the run's source paths (other layouts have nothing to report).

    Returns:
        ``source, record_id, reason`` per missing record (empty when none).
    """
    rows = []
    for source in dict.fromkeys(str(s) for s in sources):
        if Path(source).is_dir() and source_kind(source) == "record_table":
            listing = list_table_records(source, float(run.cfg.DATASET.FS))
            rows += [{"source": source, "record_id": rid, "reason": why} for rid, why in listing.missing]
    table = pd.DataFrame(rows, columns=["source", "record_id", "reason"])
    run.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(run.out / "missing_records.csv", index=False)
    if len(table):
        logger.warning("%d records of record tables have no file at %s Hz and are not used; listed in %s", len(table),
                       run.cfg.DATASET.FS, run.out / "missing_records.csv")  # fmt: skip
    return table


def stage_prepare(run: RunLayout) -> None:
    """Synthetic cohort (when no data are configured), the caches and the label table."""
    cfg = run.cfg
    if run.synthetic:
        labelled, archive, labels_csv = _synthetic_sources(run)
        finetune_source = labelled
        # Pre-training sees the unlabelled archive and the labelled cohort's records without their labels.
        pretrain_source = list_records(archive) + list_records(labelled) if archive.exists() else labelled
    else:
        finetune_source, labels_csv = cfg.DATASET.FINETUNE_SOURCE, cfg.DATASET.LABELS_CSV
        if not labels_csv:
            raise ValueError("DATASET.LABELS_CSV is empty; give the labels CSV of DATASET.FINETUNE_SOURCE")
        sources = split_sources(cfg.DATASET.PRETRAIN_SOURCE)
        if len(sources) > 1:  # ids tagged by source: records and subjects of different archives cannot collide
            pretrain_source = combine_sources(sources, fs=float(cfg.DATASET.FS))
        else:
            pretrain_source = sources[0] if sources else finetune_source
        if global_rank() == 0:
            report_missing_records(run, [finetune_source, *sources])
    if global_rank() == 0:  # the label table's columns are checked before hours of cache building
        run.labels.parent.mkdir(parents=True, exist_ok=True)
        table = make_labels(run, labels_csv)
    _build_cache(run, finetune_source, run.finetune_cache, run.leads)
    if run.spec.pretrained and not finished(run.pretrain_dir, pretrain_fingerprint(run), artifacts.DONE_FILE):
        _build_cache(run, pretrain_source, run.pretrain_cache, run.pretrain_leads, run.pretrain_preprocess)
    if global_rank() == 0:
        check_labels(run, table)
        atomic_write_text(run.labels, table.to_csv(index=False))  # fine-tuning trusts it: whole or absent
        logger.info("labels: %d ids, %d positive (%s)", len(table), int(table["label"].sum()), run.task)


# ---------------------------------------------------------------------------------------------------------------------
# pretrain
# ---------------------------------------------------------------------------------------------------------------------
def pretrain_settings(run: RunLayout) -> PretrainSettings:
    """``PretrainSettings`` from the config."""
    p, t = run.cfg.PRETRAIN, run.cfg.TRAINER
    return PretrainSettings(
        epochs=p.EPOCHS, batch_size=p.BATCH_SIZE, lr=p.LR, weight_decay=p.WEIGHT_DECAY, grad_clip=p.GRAD_CLIP,
        val_fraction=p.VAL_FRACTION, seed=run.cfg.SEED, num_workers=run.cfg.DATASET.NUM_WORKERS,
        accelerator=t.ACCELERATOR, devices=t.DEVICES if t.DEVICES != 0 else "auto", num_nodes=t.NUM_NODES,
        strategy=t.STRATEGY, precision=t.PRECISION, log_every_n_steps=t.LOG_EVERY_N_STEPS,
        progress_bar=show_bars(run), resume=p.RESUME, compile=p.COMPILE, loader=p.LOADER,
        resident={"auto": "auto", "always": True, "never": False}[p.RESIDENT], window=run.window,
        early_stop_patience=p.EARLY_STOP_PATIENCE,
    )  # fmt: skip


def make_objective(run: RunLayout):
    """The pre-training objective: the model's registry objective, or the authors' one in reference mode."""
    p = run.cfg.PRETRAIN
    name = p.OBJECTIVE or ("reference" if p.LOSS_MODE == "reference" else run.spec.objective)
    return build_objective(
        name, beta=p.BETA, beta_warmup_epochs=p.BETA_WARMUP_EPOCHS, gamma=p.GAMMA, recon_reduction=p.RECON,
        sigma=p.SIGMA, gate_importance=p.GATE_IMPORTANCE, gate_balance_kl=p.GATE_BALANCE_KL,
        subset_terms=p.SUBSET_TERMS, subset_weight=p.SUBSET_WEIGHT, capacity_gamma=p.CAPACITY_GAMMA,
        c_max=p.CAPACITY_MAX, warmup_epochs=p.BETA_WARMUP_EPOCHS, learn_sigma=p.LEARN_SIGMA,
        num_leads=len(run.pretrain_leads), sigma_min=p.SIGMA_MIN, sigma_max=p.SIGMA_MAX,
    )  # fmt: skip


def make_augment(run: RunLayout) -> LeadCorruption | None:
    """The corruption augmentation of the training batches (PRETRAIN.CORRUPT_PROB > 0), else None."""
    p = run.cfg.PRETRAIN
    return LeadCorruption(p.CORRUPT_PROB, list(p.CORRUPT_KINDS)) if p.CORRUPT_PROB > 0 else None


def stage_pretrain(run: RunLayout, callbacks=()) -> bool:
    """Pre-train the model (skipped for models without pre-training and when a finished model exists).

    Returns:
        True on the global rank 0 (or when nothing ran); False on other DDP ranks, which stop after this stage.
    """
    if run.spec.end_to_end:
        logger.info("%s has no pre-training: it is trained end to end in fine-tuning", run.cfg.MODEL.NAME)
        return True
    if global_rank() == 0:
        explicit = bool(run.cfg.PRETRAIN.DIR)
        if reuse_or_retire(
            run.pretrain_dir, pretrain_fingerprint(run), artifacts.DONE_FILE, explicit, "pre-trained model"
        ):
            return True
    elif artifacts.is_pretrained(run.pretrain_dir):
        return True
    if not run.spec.pretrained:  # a frozen random encoder: its seeded initialisation is "the pre-trained model"
        if global_rank() == 0:
            torch.manual_seed(run.cfg.SEED)
            args = run.build_args(run.pretrain_leads)
            artifacts.save_model(build_from_args(**args), run.pretrain_dir, args)
            logger.info("%s: saved the seeded initialisation (no training) in %s", args["name"], run.pretrain_dir)
        return True
    n_max = run.cfg.DATASET.MAX_PRETRAIN_RECORDS
    dataset = ECGLeadDataset(
        run.pretrain_cache, leads=run.pretrain_leads, expected_fingerprint=run.pretrain_preprocess, verify=True
    )
    if 0 < n_max < len(dataset):
        dataset = ECGLeadDataset(run.pretrain_cache, leads=run.pretrain_leads, indices=np.arange(n_max))
    torch.manual_seed(run.cfg.SEED)
    args = run.build_args(run.pretrain_leads)
    model = build_from_args(**args)
    logger.info("pre-training %s (%d parameters) on %d records", args["name"], model.num_parameters(), len(dataset))
    settings = pretrain_settings(run)
    n_train = len(dataset) - int(round(len(dataset) * settings.val_fraction))  # the validation subjects are held out
    # Both loaders keep the short last batch (kale_ext.pipeline.pretrain.ECGPretrainDataModule): it is a step.
    warn_if_few_steps("pre-training", n_train, settings.batch_size, settings.epochs, False,
                      "PRETRAIN.EPOCHS, lower PRETRAIN.BATCH_SIZE or give more records")  # fmt: skip
    # A line per epoch instead of a bar; reconstruction r has its own readable line (kale_ext.pipeline.pretrain).
    lines = [] if settings.progress_bar else [EpochLogLine("pre-training", skip=("recon_r", "gen_r_6to12"))]
    result = run_pretraining(
        model, make_objective(run), dataset, run.pretrain_dir, settings, build_args=args,
        leads=run.pretrain_leads, callbacks=[*lines, *callbacks], augment=make_augment(run),
    )  # fmt: skip
    return result.is_global_zero


# ---------------------------------------------------------------------------------------------------------------------
# finetune
# ---------------------------------------------------------------------------------------------------------------------
def finetune_settings(run: RunLayout) -> FinetuneSettings:
    """``FinetuneSettings`` from the config (end-to-end models may have their own epoch count)."""
    f = run.cfg.FINETUNE
    threshold = f.THRESHOLD if f.THRESHOLD in ("youden", "argmax") else float(f.THRESHOLD)
    epochs = f.SUPERVISED_EPOCHS if run.spec.end_to_end and f.SUPERVISED_EPOCHS > 0 else f.EPOCHS
    return FinetuneSettings(
        epochs=epochs, batch_size=f.BATCH_SIZE, lr=f.LR, weight_decay=f.WEIGHT_DECAY, optimizer=f.OPTIMIZER,
        loss=f.LOSS, focal_gamma=f.FOCAL_GAMMA, focal_alpha=None if f.FOCAL_ALPHA < 0 else f.FOCAL_ALPHA,
        threshold=threshold, hidden_dim=f.HIDDEN_DIM, dropout=f.DROPOUT, seed=run.cfg.SEED, device=_device(),
        progress=show_bars(run),
    )  # fmt: skip


def labelled_dataset(run: RunLayout) -> ECGLeadDataset:
    """The labelled records of the run (``ECGLeadDataset`` with ``label``)."""
    return ECGLeadDataset(
        run.finetune_cache, leads=run.leads, labels=run.labels, label_column="label",
        id_column=run.cfg.DATASET.LABEL_ID_COLUMN, expected_fingerprint=run.preprocess, verify=True,
    )  # fmt: skip


def refuse_nonfinite(run: RunLayout, dataset: ECGLeadDataset, bad: np.ndarray, what: str) -> None:
    """Stop before any output is written when some records gave NaN/inf ``what``, naming them and their cache."""
    rows = np.flatnonzero(bad)
    if len(rows):
        names = ", ".join(str(dataset.record_ids[i]) for i in rows[:5]) + (" ..." if len(rows) > 5 else "")
        raise ValueError(f"{what} are NaN or infinite for {len(rows)} record(s) ({names}) of the cache "
                         f"{run.finetune_cache}; check those records (qc.csv there), or delete the cache folder and "
                         "rerun --stage prepare")  # fmt: skip


PREPROCESS_RECORD = "preprocess.json"  # the preprocessing of the records the fold models were trained on


def check_predict_preprocessing(run: RunLayout) -> None:
    """Refuse scoring with other preprocessing than the fold models were trained with (e.g. DERIVE_LIMB_LEADS)."""
    path = run.finetune_dir / PREPROCESS_RECORD
    if not path.is_file():
        logger.warning("%s not found (fine-tuned by an older version): the preprocessing of the scored records "
                       "cannot be compared with the training's", path)  # fmt: skip
        return
    trained = json.loads(path.read_text(encoding="utf-8"))
    now = run.preprocess.to_dict()
    diffs = [f"{k} {trained.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(trained) | set(now))
             if trained.get(k) != now.get(k)]  # fmt: skip
    if diffs:
        raise ValueError(f"the records to score would be preprocessed differently from the fine-tuning records "
                         f"({'; '.join(diffs)}; see {path}); keep DATASET.PREPROCESS, DATASET.FS and "
                         "DATASET.INPUT_LENGTH as in training (or fine-tune again with the new settings)")  # fmt: skip


def stage_finetune(run: RunLayout) -> None:
    """Cross-validated fine-tuning; writes fold models, ``classifier.json``, ``folds.csv`` and ``finetune/oof.csv``."""
    out, settings = run.finetune_dir, finetune_settings(run)
    if reuse_or_retire(out, finetune_fingerprint(run), "DONE", False, "fine-tuned models"):
        return
    retire_stale_outputs(run)
    dataset = labelled_dataset(run)
    labels = np.asarray(dataset.labels)
    if run.cfg.EVAL.FOLD_COLUMN:  # the table's own (subject-disjoint) folds
        by_record = run.cfg.DATASET.LABEL_ID_COLUMN == "record_id"
        folds = table_folds(run, dataset.record_ids if by_record else dataset.subject_ids)
    else:
        folds = make_folds(labels, groups=dataset.subject_ids, n_splits=run.cfg.EVAL.N_SPLITS, seed=run.cfg.EVAL.SEED)
    n_train = len(labels) - int(pd.Series(np.asarray(folds)).value_counts().max())  # the smallest training part
    warn_if_few_steps("fine-tuning (per fold)", n_train, settings.batch_size, settings.epochs, False,
                      "FINETUNE.EPOCHS (FINETUNE.SUPERVISED_EPOCHS for end-to-end models) or lower "
                      "FINETUNE.BATCH_SIZE")  # fmt: skip
    hidden, dropout = settings.hidden_dim, settings.dropout
    if run.spec.end_to_end:
        bad = np.zeros(len(dataset), dtype=bool)
        for start in range(0, len(dataset), 256):  # one pass over the signals: NaN in one record spoils a fold
            rows = np.arange(start, min(start + 256, len(dataset)))
            bad[rows] = ~np.isfinite(dataset.read_signals(rows)).reshape(len(rows), -1).all(axis=1)
        refuse_nonfinite(run, dataset, bad, "signals")
        info = artifacts.classifier_info(run.build_args(run.leads), run.leads, hidden, dropout, run.features)
        data, make = dataset, artifacts.end_to_end_factory(info)
    else:
        vae = artifacts.load_model(run.pretrain_dir, device=settings.device)
        logger.info("computing frozen %s features of %d records once (sliced per fold)", run.features, len(dataset))
        pooling = run.cfg.FINETUNE.WINDOW_POOLING
        extractor = LatentFeatureExtractor(vae, run.leads, run.features, window=run.window, pooling=pooling)
        batch, bar = run.cfg.FINETUNE.FEATURE_BATCH_SIZE, show_bars(run)
        features = extract_features(extractor, dataset, batch, settings.device, bar)
        refuse_nonfinite(run, dataset, ~np.isfinite(features).all(axis=1), "frozen features")
        atomic_save_npy(out / "features.npy", features)
        info = artifacts.classifier_info(
            artifacts.read_model_args(run.pretrain_dir),
            run.leads,
            hidden,
            dropout,
            run.features,
            features.shape[1],
            run.pretrain_dir,
            window=run.window,
            window_pooling=pooling,
        )
        data, make = feature_dataset(features, labels), artifacts.head_factory(info)

    def save_fold(outcome) -> None:
        artifacts.save_fold_classifier(
            out, outcome.fold, outcome.model, {**outcome.metrics, "threshold": outcome.threshold}
        )

    result = cross_validate(make, data, labels, folds, settings, on_fold_end=save_fold, log_dir=out / "logs")
    refuse_nonfinite(run, dataset, ~np.isfinite(np.asarray(result.prob, dtype=float)), "out-of-fold probabilities")
    artifacts.write_classifier_info(out, info)
    oof = pd.DataFrame(
        {"record_id": dataset.record_ids, "subject_id": dataset.subject_ids, "label": labels, "fold": folds,
         "threshold": result.threshold, "probability": result.prob}
    )  # fmt: skip
    atomic_write_text(out / "oof.csv", oof.to_csv(index=False))
    atomic_write_text(run.folds, oof[["record_id", "subject_id", "label", "fold", "threshold"]].to_csv(index=False))
    atomic_write_text(out / PREPROCESS_RECORD, json.dumps(run.preprocess.to_dict(), indent=2))  # checked by predict
    atomic_write_text(out / "DONE", "fine-tuning finished\n")


# ---------------------------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------------------------
def environment() -> dict:
    """What CPU results depend on beyond config and seed: same code, torch version and thread count = same bits."""
    return {"code": kale_ext.__version__, "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
            "device": _device()}  # fmt: skip


def stage_evaluate(run: RunLayout) -> dict:
    """Metrics per fold, mean +- std, bootstrap CI; metrics.json, predictions.csv, results.md, results.csv, roc.png."""
    oof_path = run.finetune_dir / "oof.csv"
    if not oof_path.exists():
        raise FileNotFoundError(f"{oof_path} not found; run --stage finetune first")
    status, diffs = stage_status(run.finetune_dir, finetune_fingerprint(run), "DONE")
    if status != "match":  # metrics of other models would be written under this config's name
        raise RuntimeError(f"the fine-tuned models in {run.finetune_dir} are "
                           + (f"from other inputs ({'; '.join(diffs[:4])})" if diffs else "not finished")
                           + "; run --stage finetune first with this config (or --stage all)")  # fmt: skip
    (run.out / OUTPUTS_RECORD).unlink(missing_ok=True)  # written again last: until then the outputs are incomplete
    subjects = subject_level(pd.read_csv(oof_path, dtype={"subject_id": str, "record_id": str}))
    y, p = subjects["label"].to_numpy(), subjects["probability"].to_numpy()
    fold_ids, thr = subjects["fold"].to_numpy(), subjects["threshold"].to_numpy()
    fold_metrics = per_fold_metrics(subjects)
    summary = summary_with_ci(fold_metrics, y, p, thr, n_boot=run.cfg.EVAL.N_BOOT, seed=run.cfg.SEED)
    headline = headline_auroc(summary, y)
    method, tag = run.method_label, lead_tag(run.leads)
    extra = {"note": SYNTHETIC_NOTE} if run.synthetic else {}
    write_metrics_json(
        run.out / "metrics.json", synthetic=run.synthetic, task=run.task, method=method, leads=run.leads,
        folds=fold_metrics, summary=summary, n_subjects=int(len(subjects)), headline=headline,
        positive_class=positive_class(run), environment=environment(), **extra,
    )  # fmt: skip
    table = predictions_frame(subjects["subject_id"], y, p, fold_ids, thr, record_ids=subjects["record_id"])
    table["synthetic"] = run.synthetic
    write_predictions_csv(run.out / "predictions.csv", table)
    title = f"{run.task}: {method}, {tag}"
    rows = [results_row(method, tag, summary)]
    cohort = (
        f"n = {headline['n']} subjects, {headline['n_positive']} positive ({positive_class(run)}) / "
        f"{headline['n_negative']} negative; {run.cfg.EVAL.N_SPLITS}-fold cross-validation, "
        f"{run.cfg.EVAL.N_BOOT} bootstrap resamples"
    )
    lines = [f"**Headline: {format_headline(headline)}**", "", f"Cohort: {cohort}."]
    write_results_table(rows, run.out / "results.md", run.out / "results.csv", title=title, synthetic=run.synthetic,
                        extra_lines=lines)  # fmt: skip
    plot_roc(y, p, fold_ids, run.out / "roc.png", title=("[synthetic] " if run.synthetic else "") + title,
             ci95=headline["ci95"])  # fmt: skip
    logs = read_training_logs(None if run.spec.end_to_end else run.pretrain_dir, run.finetune_dir)
    plot_training_curves(logs, run.out / "training_curves.png", title=("[synthetic] " if run.synthetic else "")
                         + f"{title}: training curves")  # fmt: skip
    write_output_readme(run, summary, headline)
    files = {name: file_digest(run.out / name) for name in ROOT_OUTPUTS if (run.out / name).exists()}
    record = {"finetune": short_hash(finetune_fingerprint(run)), "files": files}
    atomic_write_text(run.out / OUTPUTS_RECORD, json.dumps(record, indent=2))  # last: the outputs are complete
    return {**summary, "headline": headline}


def write_output_readme(run: RunLayout, summary: dict, headline: dict | None = None) -> None:
    """``OUTPUT.DIR/README.md``: what each output is, whether the data are synthetic, the headline metrics."""
    lines = [f"# Outputs of {run.method_label}, {run.cfg.DATASET.LEADS}, task {run.task}", ""]
    if run.synthetic:
        lines += [f"**{SYNTHETIC_NOTE}**", ""]
    lines += [f"Endpoint: {run.task}; positive class: {positive_class(run)}.", ""]
    if headline is not None:
        lines += [f"Headline: {format_headline(headline)}.", ""]
    lines += [
        "- `config.yaml`: the merged configuration",
        "- `metrics.json`: per-fold metrics and mean/std/bootstrap 95% CI",
        "- `predictions.csv`: out-of-fold probability per subject (`synthetic` column says whether data are generated)",
        "- `results.md` / `results.csv`: headline, cohort and Table-2-style row; `roc.png`: ROC curves per fold and "
        "pooled; `training_curves.png`: pre-training loss terms and gate weights per epoch, fine-tuning loss per fold",
        "- `pretrain/`: pre-trained model (`model.pt`, `model_args.json`), checkpoints, TensorBoard/CSV logs",
        "- `finetune/`: fold models, features, out-of-fold predictions, per-fold logs; `folds.csv`: fold and "
        "threshold per record",
        "",
        "| metric | pooled out-of-fold | 95% CI (bootstrap, pooled) | fold mean | fold std |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in ("accuracy", "auroc", "mcc"):
        e = summary.get(name)
        if e:
            pooled = "n/a" if e.get("pooled") is None else f"{e['pooled']:.3f}"
            lines.append(
                f"| {name} | {pooled} | [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}] | {e['mean']:.3f} | {e['std']:.3f} |"
            )
    (run.out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------------------------------------------------
def positive_class(run: RunLayout) -> str:
    """What a prediction of 1 means, in words (for the provenance of scores)."""
    cfg, task = run.cfg, run.cfg.TASK
    if cfg.DATASET.LABEL_COLUMN:
        return f"{cfg.DATASET.LABEL_COLUMN} = 1"
    return {
        "ph": f"{task.MPAP_COLUMN} > {task.MPAP_THRESHOLD:g} mmHg (pulmonary hypertension)",
        "phenotype": f"{task.PAWP_COLUMN} > {task.PAWP_THRESHOLD:g} mmHg among {task.MPAP_COLUMN} > "
        f"{task.MPAP_THRESHOLD:g} mmHg (post-capillary PH)",
        "pawp": f"{task.PAWP_COLUMN} > {task.PAWP_THRESHOLD:g} mmHg (elevated PAWP)",
        "statement": f"{task.LABEL} stated in the record's labels",
    }.get(task.NAME, f"{run.task} = 1")


def class_names(run: RunLayout) -> dict[int, str]:
    """Names of the label values 0 and 1 for figures and tables (``{0: "no LVH", 1: "LVH"}``), never bare 0/1."""
    cfg, task = run.cfg, run.cfg.TASK
    name = task.LABEL or cfg.DATASET.LABEL_COLUMN
    if name:
        return {0: f"no {name}", 1: name}
    mpap, pawp = f"{task.MPAP_COLUMN} {{}} {task.MPAP_THRESHOLD:g}", f"{task.PAWP_COLUMN} {{}} {task.PAWP_THRESHOLD:g}"
    return {
        "ph": {0: f"no PH ({mpap.format('<=')})", 1: f"PH ({mpap.format('>')})"},
        "phenotype": {0: f"pre-capillary PH ({pawp.format('<=')})", 1: f"post-capillary PH ({pawp.format('>')})"},
        "pawp": {0: f"normal PAWP ({pawp.format('<=')})", 1: f"elevated PAWP ({pawp.format('>')})"},
    }.get(task.NAME, {0: f"no {run.task}", 1: run.task})


def chance_caveat(out_dir: Path) -> str | None:
    """A caveat for interpretation figures when the run's headline AUROC interval (metrics.json) includes 0.5."""
    path = Path(out_dir) / "metrics.json"
    if not path.is_file():
        return "no metrics.json in this run: run --stage evaluate to see whether the model beats chance"
    headline = json.loads(path.read_text(encoding="utf-8")).get("headline") or {}
    lo, hi = headline.get("ci95") or (None, None)
    if lo is None or hi is None:
        return "the model's AUROC interval is unknown (metrics.json has no headline): it may not beat chance"
    if lo <= 0.5 <= hi:
        return (
            f"Caveat: the model's {headline.get('name', 'AUROC')} is {headline.get('value', float('nan')):.3f} with "
            f"95% CI {lo:.3f}-{hi:.3f}, which includes 0.5 (chance): these attributions explain a model that is not "
            "shown to beat chance; do not read them as findings about the ECG."
        )
    return None


def stage_predict(run: RunLayout) -> pd.DataFrame:
    """Score new WFDB records with the fold models: mean probability over folds, threshold = mean fold threshold.

    Records lacking a lead of DATASET.LEADS are refused: they get no probability and a ``status`` naming the lead.
    """
    cfg = run.cfg
    if not cfg.PREDICT.SOURCE:
        raise ValueError("PREDICT.SOURCE is empty; give a folder of WFDB records or a manifest CSV to score")
    if not (run.finetune_dir / "DONE").is_file() or not run.folds.is_file():
        raise FileNotFoundError(f"no finished fine-tuning in {run.finetune_dir} ({run.folds}); run --stage finetune "
                                "first with this config (or --stage all)")  # fmt: skip
    out_csv = Path(cfg.PREDICT.OUT_CSV) if cfg.PREDICT.OUT_CSV else run.predict_dir / "scores.csv"
    if out_csv.exists():  # scores of an earlier source must not stay in place looking complete if this run fails
        logger.info("removing the previous scores %s before scoring %s", out_csv, cfg.PREDICT.SOURCE)
        out_csv.unlink()
    check_predict_preprocessing(run)
    fold_thresholds = pd.read_csv(run.folds).groupby("fold")["threshold"].first()
    cache = run.predict_dir / f"cache_{run.preprocess.fingerprint()}"
    prepare_ecg_cache(
        cfg.PREDICT.SOURCE, cache, spec=run.preprocess, leads=list(run.leads), num_workers=1,
        progress=show_bars(run), overwrite=True,
    )  # fmt: skip
    qc = pd.read_csv(cache / "qc.csv", dtype=str, keep_default_na=False)
    has_records = (cache / "signals.npy").exists() and len(pd.read_csv(cache / "index.csv")) > 0
    data = ECGLeadDataset(cache, leads=run.leads) if has_records else None
    classifiers = [artifacts.load_fold_classifier(run.finetune_dir, int(k)) for k in fold_thresholds.index]
    provenance = {
        "method": run.method_label, "model": cfg.MODEL.NAME, "task": run.task, "positive_class": positive_class(run),
        "leads": lead_tag(run.leads), "trained_on": "synthetic" if run.synthetic else "real",
        "synthetic_training_data": run.synthetic, "finetune_dir": str(run.finetune_dir),
        "source": str(Path(cfg.PREDICT.SOURCE).resolve()), "preprocess": run.preprocess.fingerprint(),
    }  # fmt: skip
    table = score_records(classifiers, data, run.leads, float(fold_thresholds.mean()), qc=qc, provenance=provenance)
    atomic_write_text(out_csv, table.to_csv(index=False))
    n_ok = int((table["status"] == "ok").sum())
    print(f"scored {n_ok} records, refused {len(table) - n_ok}; wrote {out_csv}")
    return table
