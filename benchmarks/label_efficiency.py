"""The paper's claim on open data: does label-free 12-lead pre-training help scarce-label 6-lead detection?

Data: PTB-XL (Wagner et al., Scientific Data 2020; PhysioNet) in its own layout under ``../shared/data/ecg/ptbxl``
(or the full 21,799-record release, ``--ptbxl``), with LUDB (Kalyakulina et al., IEEE Access 2020) and CinC-2021
(Reyna et al. 2021) added, label-free, to pre-training.

Protocol (every number is measured in the run; ``docs/real_ecg.md`` says what the figures show and what not):

1. Split by PTB-XL's ``strat_fold`` (patient-disjoint): folds 1-8 train, 9-10 held out (the test part). Label-free
   pre-training uses every record EXCEPT the held-out PTB-XL folds, so that 6->12 generation is scored on subjects
   no model saw.
2. Pre-train each VAE method once (its registry objective), windowed (random crops, ``PRETRAIN.WINDOW``) and, for
   LS-EMVAE, also on whole records, side by side; the random encoder (LS-EMVAE architecture, seeded, untrained) is the
   floor.
3. For each PTB-XL task (NORM vs rest, MI, STTC, CD, HYP), in the 6-lead and 12-lead settings, fit a logistic probe on
   frozen features of 10 %, 25 %, 50 % and 100 % of the labelled training part (stratified draws, several seeds)
   and score the held-out part: AUROC with a subject-level bootstrap interval. xResNet1d (small widths) is trained
   from scratch on the same labelled subsets.
4. 6->12 generation of V1-V6 from the six limb leads on the held-out subjects against the least-squares linear map
   fitted on the pre-training records.

Outputs in ``--out``: ``label_efficiency.csv`` (one row per task, leads, method, fraction, seed), ``summary.csv``
(mean over seeds with the interval of the pooled seeds' median run), ``generation.csv``, ``label_efficiency_<task>.png``
(one figure per task), ``pretrain_log.csv`` (per-epoch training and held-out reconstruction), ``timings.json`` and
``results.md``. ``--small`` runs a few records, one task and one seed (a test of the script, not a result).

Run: ``python benchmarks/label_efficiency.py [--preset cpu|gpu] [--small] [--out outputs/label_efficiency]``.
Exit code 2 when the data are absent.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from kale_ext.embed.zoo import MODELS, build_model
from kale_ext.evaluate.metrics import auroc, bootstrap_ci
from kale_ext.evaluate.probe import (
    ArraySignals,
    classifier_probability,
    fit_linear_lead_map,
    frozen_features,
    generate_leads,
    generation_metrics,
    make_probe,
)
from kale_ext.loaddata.diagnosis_labels import read_statement_table, statement_labels
from kale_ext.loaddata.ecg_dataset import ECGLeadDataset
from kale_ext.loaddata.leads import CANONICAL_LEADS, LIMB_LEADS
from kale_ext.loaddata.record_table import list_source_records
from kale_ext.loaddata.source_sets import combine_sources
from kale_ext.pipeline.finetune import FinetuneSettings, MaskedInputClassifier, fit_classifier
from kale_ext.pipeline.pretrain import PretrainSettings, run_pretraining
from kale_ext.predict.objectives import build_objective
from kale_ext.prepdata.ecg_cache import prepare_ecg_cache
from kale_ext.prepdata.ecg_transforms import PreprocessSpec
from kale_ext.utils.console import script_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "lsemvae_ph"))
from ecg_tables import (  # noqa: E402 - data set descriptions shared with the example
    PTBXL_CLASS_COLUMN,
    PTBXL_DATABASE,
    PTBXL_FOLD_COLUMN,
    PTBXL_ID,
    PTBXL_STATEMENT_COLUMN,
    PTBXL_STATEMENTS,
    PTBXL_SUBJECT,
    PTBXL_SUPERCLASSES,
)

logger = logging.getLogger("label_efficiency")

V_LEADS = ("V1", "V2", "V3", "V4", "V5", "V6")
SETTINGS = {"12L": CANONICAL_LEADS, "6L": LIMB_LEADS}
TASKS = ("NORM", "MI", "STTC", "CD", "HYP")
FRACTIONS = (0.1, 0.25, 0.5, 1.0)
TEST_FOLDS = (9, 10)
# name -> (registry architecture, windowed pre-training?, kind)
METHODS = {
    "lsemvae": ("lsemvae", True, "vae"),
    "lsemvae (whole records)": ("lsemvae", False, "vae"),
    "mvae": ("mvae", True, "vae"),
    "mopoe": ("mopoe", True, "vae"),
    "stmem": ("stmem", True, "vae"),
    "random encoder": ("lsemvae", True, "random"),
    "xresnet1d (from scratch)": ("xresnet1d", False, "supervised"),
}
PRESETS = {
    # CPU: 100 Hz x 10 s, 2.5-s windows, latent 32; sized for <= 45 min on 2 cores.
    "cpu": {"fs": 100.0, "window": 250, "latent": 32, "epochs": 60, "batch": 32, "lr": 1e-3, "seeds": 3,
            "sup_epochs": 15},
    # GPU: the full 21,799-record release at 500 Hz x 10 s, 2-s windows, the paper's latent 256.
    "gpu": {"fs": 500.0, "window": 1000, "latent": 256, "epochs": 50, "batch": 128, "lr": 1e-4, "seeds": 5,
            "sup_epochs": 30},
}  # fmt: skip


def default_root() -> Path:
    """``../shared/data/ecg`` beside the checkout (searched upwards)."""
    here = Path(__file__).resolve().parents[1]
    for base in [here, *here.parents]:
        candidate = base.parent / "shared" / "data" / "ecg"
        if candidate.is_dir():
            return candidate
    return here.parent / "shared" / "data" / "ecg"


# ---------------------------------------------------------------------------------------------------------------------
# Data: PTB-XL records and labels from the library's readers, LUDB and CinC label-free
# ---------------------------------------------------------------------------------------------------------------------
def read_ptbxl(root: Path, fs: float, n_max: int | None) -> tuple[list, pd.DataFrame]:
    """(record refs, table) of a PTB-XL root: ``record_id``, ``subject_id``, ``strat_fold`` and one 0/1/NaN column per
    superclass, from the library's readers (record table at the rate that suits ``fs``; statement labels)."""
    refs = combine_sources([root], fs=fs, tags=["ptbxl"], separator="_")
    db = pd.read_csv(root / PTBXL_DATABASE)
    statements = read_statement_table(root / PTBXL_STATEMENTS, PTBXL_CLASS_COLUMN)
    table = pd.DataFrame(
        {
            "record_id": "ptbxl_" + db[PTBXL_ID].astype(str),
            "subject_id": "ptbxl_" + db[PTBXL_SUBJECT].astype(float).astype("int64").astype(str),
            "strat_fold": db[PTBXL_FOLD_COLUMN].astype(int),
        }
    )
    for task in PTBXL_SUPERCLASSES:
        table[task] = statement_labels(db[PTBXL_STATEMENT_COLUMN], task, statements)
    if n_max is not None:  # a small run: the first records of the training folds and of the held-out folds
        keep = set(table[~table.strat_fold.isin(TEST_FOLDS)].record_id[: n_max * 2 // 3])
        keep |= set(table[table.strat_fold.isin(TEST_FOLDS)].record_id[: n_max // 3])
        refs = [r for r in refs if r.record_id in keep]
        table = table[table.record_id.isin(keep)]
    return refs, table.reset_index(drop=True)


class Records(NamedTuple):
    """Every cached record (PTB-XL and the label-free sources) with its split."""

    ds: ECGLeadDataset  # all records, 12 leads
    ids: np.ndarray  # (N,) record ids, source-tagged
    table: pd.DataFrame  # PTB-XL labels and folds, indexed by record_id
    labelled: np.ndarray  # (N,) bool: a PTB-XL record
    test: np.ndarray  # (N,) bool: a PTB-XL record of the held-out folds (TEST_FOLDS)
    X: np.ndarray  # (N, 12, T) signals
    pre_idx: np.ndarray  # indices of the label-free pre-training records (all but the held-out folds)
    pre_ds: ECGLeadDataset  # those records
    report: object  # the cache's preparation report (skipped records and why)


def find_ptbxl(root: Path | None, ptbxl: Path | None) -> tuple[Path, Path] | None:
    """(data root, PTB-XL root) from the command line's ``--root`` / ``--ptbxl``; None, said on stderr, if absent."""
    root = root or default_root()
    ptbxl = ptbxl or root / "ptbxl"
    if not (ptbxl / "ptbxl_database.csv").is_file():
        print(f"PTB-XL not found at {ptbxl} (need ptbxl_database.csv, scp_statements.csv, records100/); point "
              "--ptbxl or --root at it (see ../shared/data/ecg/README.md)", file=sys.stderr)  # fmt: skip
        return None
    return root, ptbxl


def load_records(root: Path, ptbxl: Path, fs: float, out: Path, n_ptbxl: int | None, n_extra: int | None) -> Records:
    """PTB-XL and the label-free sources cached at ``fs`` Hz x 10 s under ``out``, split by ``strat_fold``."""
    T = int(round(10 * fs))
    refs, table = read_ptbxl(ptbxl, fs, n_ptbxl)
    extra = read_unlabelled(root, fs, n_extra)
    cache = out / f"cache_{int(fs)}hz_{T}"
    report = prepare_ecg_cache(
        refs + extra, cache, spec=PreprocessSpec(target_fs=fs, target_length=T), leads="12L", num_workers=1,
        progress=False,
    )  # fmt: skip
    if report.n_skipped:
        logger.warning("skipped %d records (reasons in %s/qc.csv)", report.n_skipped, cache)
    ds = ECGLeadDataset(cache, "12L")
    ids = np.asarray(ds.record_ids).astype(str)
    table = table.set_index("record_id")
    labelled = np.isin(ids, table.index)
    test = labelled & np.isin(table["strat_fold"].reindex(ids).to_numpy(), TEST_FOLDS)
    X = ds.get_batch(np.arange(len(ds)))["signals"].numpy()
    pre_idx = np.flatnonzero(~test)  # label-free pre-training: everything but the held-out PTB-XL folds
    return Records(ds, ids, table, labelled, test, X, pre_idx, ECGLeadDataset(cache, "12L", indices=pre_idx), report)


def read_unlabelled(root: Path, fs: float, n_max: int | None) -> list:
    """LUDB and CinC-2021 record refs (whichever are present) for label-free pre-training."""
    sources, tags = [], []
    for name, folder in (("ludb", root / "ludb" / "data"), ("cinc", root / "cinc2021")):
        if folder.is_dir():
            refs = list_source_records(folder, fs=fs)[:n_max]
            sources.append(refs)
            tags.append(name)
    return combine_sources(sources, fs=fs, tags=tags, separator="_") if sources else []


# ---------------------------------------------------------------------------------------------------------------------
# Models: build, pre-train, features, generation
# ---------------------------------------------------------------------------------------------------------------------
def build(arch: str, T: int, D: int, seed: int, leads=CANONICAL_LEADS) -> torch.nn.Module:
    """A method's network (the only place a model is built): CPU-sized ST-MEM and xResNet1d."""
    torch.manual_seed(seed)
    if arch == "xresnet1d":
        options = {"num_classes": 2, "layers": (1, 1, 1, 1), "widths": (8, 16, 32, 64), "stem_channels": (16, 16, 16)}
        return build_model(arch, tuple(leads), T, D, **options)
    if arch == "stmem":
        return build_model(arch, tuple(leads), T, D, preset="small")
    return build_model(arch, tuple(leads), T, D)


def pretrain(model, dataset, out: Path, preset: dict, window: int, seed: int, objective: str) -> tuple:
    """Pre-train label-free with the model's registry objective; returns (model in eval mode, per-epoch log)."""
    settings = PretrainSettings(
        epochs=preset["epochs"], batch_size=preset["batch"], lr=preset["lr"], val_fraction=0.1, seed=seed,
        accelerator="cpu", progress_bar=False, resume=False, log_every_n_steps=10, window=window,
    )  # fmt: skip
    model.train()
    loss = build_objective(objective, beta_warmup_epochs=max(preset["epochs"] / 4, 0.5))
    run_pretraining(model, loss, dataset, out, settings, build_args={}, leads=dataset.leads)
    shutil.rmtree(Path(out) / "checkpoints", ignore_errors=True)
    log = _epoch_log(Path(out))
    return model.eval(), log


def _epoch_log(out: Path) -> pd.DataFrame:
    """Per-epoch rows of the run's CSV log (training and held-out reconstruction r where logged)."""
    files = sorted((out / "logs" / "csv").glob("version_*/metrics.csv"))
    if not files:
        return pd.DataFrame()
    frame = pd.read_csv(files[-1])
    keep = [c for c in frame.columns if c == "epoch" or "recon_r" in c or c.endswith("/loss") or "gen" in c]
    return frame[keep].groupby("epoch").mean(numeric_only=True).reset_index() if "epoch" in frame else pd.DataFrame()


def _mode(model) -> str:
    return "pooled" if hasattr(model, "features") and not hasattr(model, "fuse") else "fused_mean"


# ---------------------------------------------------------------------------------------------------------------------
# Label fractions
# ---------------------------------------------------------------------------------------------------------------------
def draw_fraction(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a stratified draw of ``fraction`` of the labelled training part (at least 2 per class)."""
    rng = np.random.default_rng(seed)
    picks = []
    for cls in (0, 1):
        idx = np.flatnonzero(y == cls)
        k = len(idx) if fraction >= 1 else max(2, int(round(fraction * len(idx))))
        picks.append(rng.permutation(idx)[: min(k, len(idx))])
    return np.sort(np.concatenate(picks))


def score(y: np.ndarray, p: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float]:
    """AUROC of the held-out part with a subject-level percentile bootstrap interval."""
    lo, hi = bootstrap_ci(y, p, "auroc", n_boot=n_boot, seed=seed, groups=groups)
    return auroc(y, p), float(lo), float(hi)


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (every default is shown by --help)."""
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--root", type=Path, default=None, help="folder holding ptbxl/, ludb/, cinc2021/ "
                   "(default: ../shared/data/ecg beside the checkout)")  # fmt: skip
    p.add_argument(
        "--ptbxl", type=Path, default=None, help="PTB-XL root (default <root>/ptbxl); the full release works"
    )
    p.add_argument("--out", type=Path, default=Path("outputs/label_efficiency"), help="output folder")
    p.add_argument("--preset", choices=tuple(PRESETS), default="cpu", help="sizes and budget (see PRESETS)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated PTB-XL superclasses")
    p.add_argument("--fractions", default=",".join(map(str, FRACTIONS)), help="label fractions of the training part")
    p.add_argument("--seeds", type=int, default=None, help="draws per fraction (default: the preset's)")
    p.add_argument("--sup-seeds", type=int, default=1, help="draws per fraction of the supervised xResNet1d")
    p.add_argument("--epochs", type=int, default=None, help="pre-training epochs (default: the preset's)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of each interval")
    p.add_argument("--seed", type=int, default=0, help="base seed")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--small", action="store_true", help="a few records, one task, one seed, one epoch (a test run)")
    return p.parse_args(argv)


def main(argv=None) -> int:  # noqa: C901 - one linear script, sections marked
    """Run the benchmark; returns the exit code."""
    args = parse_args(argv)
    script_logging()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    found = find_ptbxl(args.root, args.ptbxl)
    if found is None:
        return 2
    root, ptbxl = found
    preset = dict(PRESETS[args.preset])
    if args.epochs is not None:
        preset["epochs"] = args.epochs
    methods = [m for m in args.methods.split(",") if m]
    tasks = [t for t in args.tasks.split(",") if t]
    fractions = [float(f) for f in args.fractions.split(",") if f]
    seeds = args.seeds or preset["seeds"]
    n_ptbxl = n_extra = None
    if args.small:
        n_ptbxl, n_extra, seeds = 120, 10, 1
        preset.update(epochs=1, sup_epochs=1)
        tasks, fractions = tasks[:1], [fractions[0], fractions[-1]]
        methods = [m for m in methods if m in ("lsemvae", "random encoder")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"unknown methods {unknown}; choose from {list(METHODS)}", file=sys.stderr)
        return 2
    fs, D, W = preset["fs"], preset["latent"], preset["window"]
    T = int(round(10 * fs))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    # ---- 0. records and cache --------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    records = load_records(root, ptbxl, fs, out, n_ptbxl, n_extra)
    ids, table, labelled, test, X = records.ids, records.table, records.labelled, records.test, records.X
    pre_idx, pre_ds, report = records.pre_idx, records.pre_ds, records.report
    train = labelled & ~test
    timings["records and cache"] = time.perf_counter() - t0
    logger.info("%d records: %d PTB-XL training, %d PTB-XL held out, %d other (pre-training only)", len(ids),
                int(train.sum()), int(test.sum()), int((~labelled).sum()))  # fmt: skip

    # ---- 1. pre-training -------------------------------------------------------------------------------------------
    models, logs = {}, []
    for name in methods:
        arch, windowed, kind = METHODS[name]
        window = W if windowed else 0
        t0 = time.perf_counter()
        if kind == "vae":
            model = build(arch, window or T, D, args.seed)
            folder = out / "models" / name.replace(" ", "_").replace("(", "").replace(")", "")
            models[name], log = pretrain(model, pre_ds, folder, preset, window, args.seed, MODELS[arch].objective)
            if not log.empty:
                logs.append(log.assign(method=name))
        elif kind == "random":
            models[name] = build(arch, window or T, D, args.seed + 7).eval()
        timings[f"pre-train {name}"] = time.perf_counter() - t0
    if logs:
        pd.concat(logs, ignore_index=True).to_csv(out / "pretrain_log.csv", index=False)

    # ---- 2. features -----------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    lab_idx = np.flatnonzero(labelled)
    x_lab = X[lab_idx]
    feats = {}
    for name, model in models.items():
        window = W if METHODS[name][1] else 0
        for setting, present in SETTINGS.items():
            feats[(name, setting)] = frozen_features(model, x_lab, CANONICAL_LEADS, present, _mode(model), window)
    timings["features"] = time.perf_counter() - t0
    is_test = test[lab_idx]
    subjects = table["subject_id"].reindex(ids[lab_idx]).astype(str).to_numpy()

    # ---- 3. label efficiency ---------------------------------------------------------------------------------------
    rows = []
    t0 = time.perf_counter()
    for task in tasks:
        y_all = table[task].reindex(ids[lab_idx]).to_numpy(dtype=np.float64)
        known = ~np.isnan(y_all)  # records without a diagnostic statement are not part of the task
        tr_rows, te_rows = np.flatnonzero(known & ~is_test), np.flatnonzero(known & is_test)
        y_tr, y_te = y_all[tr_rows].astype(int), y_all[te_rows].astype(int)
        if min(y_tr.sum(), len(y_tr) - y_tr.sum(), y_te.sum(), len(y_te) - y_te.sum()) < 2:
            logger.warning("task %s skipped: fewer than 2 records of a class in a part", task)
            continue
        base = {"task": task, "n_train": len(y_tr), "n_test": len(y_te), "test_positive": int(y_te.sum())}
        for fraction in fractions:
            for s in range(seeds):
                pick = draw_fraction(y_tr, fraction, args.seed + 1000 * s + 7)
                for (name, setting), f in feats.items():
                    f_tr, f_te = f[tr_rows], f[te_rows]
                    probe = make_probe("logistic", seed=args.seed + s, c=1.0).fit(f_tr[pick], y_tr[pick])
                    a, lo, hi = score(y_te, probe.predict_proba(f_te)[:, 1], subjects[te_rows], args.n_boot, s)
                    rows.append({**base, "leads": setting, "method": name, "fraction": fraction, "seed": s,
                                 "n_labels": len(pick), "auroc": a, "ci_lo": lo, "ci_hi": hi})  # fmt: skip
                if "xresnet1d (from scratch)" in methods and s < args.sup_seeds:
                    t1 = time.perf_counter()
                    limb = [CANONICAL_LEADS.index(lead) for lead in LIMB_LEADS]
                    for setting, present in SETTINGS.items():
                        cols = list(range(12)) if setting == "12L" else limb
                        x_tr, x_te = x_lab[tr_rows][pick][:, cols], x_lab[te_rows][:, cols]
                        net = MaskedInputClassifier(build("xresnet1d", T, D, args.seed + s, leads=present))
                        fs_ = FinetuneSettings(epochs=preset["sup_epochs"], batch_size=32, lr=1e-3,
                                               loss="cross_entropy", seed=args.seed + s, progress=False)  # fmt: skip
                        fit_classifier(net, ArraySignals(x_tr, y_tr[pick]), y_tr[pick], fs_)
                        a, lo, hi = score(
                            y_te, classifier_probability(net, x_te, present), subjects[te_rows], args.n_boot, s
                        )
                        rows.append({**base, "leads": setting, "method": "xresnet1d (from scratch)",
                                     "fraction": fraction, "seed": s, "n_labels": len(pick), "auroc": a,
                                     "ci_lo": lo, "ci_hi": hi})  # fmt: skip
                    timings["xresnet1d training"] = timings.get("xresnet1d training", 0.0) + time.perf_counter() - t1
    timings["probes"] = time.perf_counter() - t0 - timings.get("xresnet1d training", 0.0)
    results = pd.DataFrame(rows)
    results.to_csv(out / "label_efficiency.csv", index=False)
    summary = (
        results.groupby(["task", "leads", "method", "fraction"], sort=False)
        .agg(auroc=("auroc", "mean"), auroc_sd=("auroc", "std"), ci_lo=("ci_lo", "mean"), ci_hi=("ci_hi", "mean"),
             seeds=("seed", "nunique"), n_labels=("n_labels", "first"))
        .reset_index()
    ) if len(results) else pd.DataFrame()  # fmt: skip
    summary.to_csv(out / "summary.csv", index=False)

    # ---- 4. 6 -> 12 generation on held-out subjects ----------------------------------------------------------------
    t0 = time.perf_counter()
    limb = [CANONICAL_LEADS.index(lead) for lead in LIMB_LEADS]
    v_idx = [CANONICAL_LEADS.index(lead) for lead in V_LEADS]
    x_test = X[test]
    lin = fit_linear_lead_map(X[pre_idx][:, limb], X[pre_idx][:, v_idx])
    gen = {"linear map (limb -> V)": lin.predict(x_test[:, limb])}
    for name, model in models.items():
        if METHODS[name][2] == "vae" and hasattr(model, "fuse"):
            gen[name] = generate_leads(model, x_test[:, limb], LIMB_LEADS, W if METHODS[name][1] else 0)[:, v_idx]
    gen_rows = []
    for name, pred in gen.items():
        r = generation_metrics(pred, x_test[:, v_idx]).pearson
        per_record = np.nanmean(r, axis=1)
        boot = np.random.default_rng(args.seed).integers(0, len(per_record), (args.n_boot, len(per_record)))
        means = np.nanmean(per_record[boot], axis=1)
        gen_rows.append({"method": name, "r": float(np.nanmean(per_record)), "ci_lo": float(np.quantile(means, 0.025)),
                         "ci_hi": float(np.quantile(means, 0.975)), "n_records": len(per_record)})  # fmt: skip
    gen_df = pd.DataFrame(gen_rows)
    gen_df.to_csv(out / "generation.csv", index=False)
    timings["generation"] = time.perf_counter() - t0

    # ---- 5. figures and report -------------------------------------------------------------------------------------
    figures = plot_curves(summary, out) if len(summary) else []
    timings["total"] = time.perf_counter() - t_start
    (out / "timings.json").write_text(json.dumps(timings, indent=2), encoding="utf-8")
    write_report(out, args, preset, summary, gen_df, figures, timings, ids, train, test, labelled, report)
    print(f"results in {out / 'results.md'} ({timings['total']:.0f} s)")
    return 0


def plot_curves(summary: pd.DataFrame, out: Path) -> list[str]:
    """One figure per task: AUROC against the label fraction, 6-lead and 12-lead panels, intervals as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for task, frame in summary.groupby("task", sort=False):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        for ax, leads in zip(axes, ("6L", "12L")):
            for method, d in frame[frame.leads == leads].groupby("method", sort=False):
                d = d.sort_values("fraction")
                ax.errorbar(d.fraction * 100, d.auroc, yerr=[d.auroc - d.ci_lo, d.ci_hi - d.auroc], marker="o",
                            capsize=3, label=method)  # fmt: skip
            ax.axhline(0.5, color="grey", ls="--", lw=0.8, label="chance")
            ax.set_xscale("log")
            ax.set_xticks([10, 25, 50, 100], ["10", "25", "50", "100"])
            ax.set_xlabel("labelled training records used (%)")
            ax.set_title(f"{leads} input", fontsize=9)
        axes[0].set_ylabel("held-out AUROC (95% bootstrap interval)")
        axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.suptitle(f"PTB-XL {task} vs rest: frozen encoders + logistic probe vs xResNet1d from scratch", fontsize=10)
        fig.tight_layout()
        name = f"label_efficiency_{task}.png"
        fig.savefig(out / name, dpi=120, bbox_inches="tight")
        plt.close(fig)
        names.append(name)
    return names


def _md(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines)


def write_report(out, args, preset, summary, gen_df, figures, timings, ids, train, test, labelled, report) -> None:
    """``results.md``: protocol, AUROC at the smallest and full label fraction, generation, timings, limits."""
    lines = [
        "# Label efficiency on PTB-XL (real ECGs)",
        "",
        f"Preset `{args.preset}`{' (--small: a test of the script, not a result)' if args.small else ''}: "
        f"{preset['fs']:g} Hz x 10 s, window {preset['window']} samples, latent {preset['latent']}, "
        f"{preset['epochs']} pre-training epochs, batch {preset['batch']}.",
        f"Records: {int(labelled.sum())} PTB-XL ({int(train.sum())} training folds 1-8, {int(test.sum())} held out, "
        f"strat_fold 9-10), {int((~labelled).sum())} LUDB/CinC records for label-free pre-training only; "
        f"{report.n_skipped} skipped (reasons in the cache's qc.csv).",
        "Probes: logistic regression (C = 1) on standardised frozen features; AUROC on the held-out folds with a "
        "subject-level 95% bootstrap interval; the mean over label draws is shown.",
        "",
    ]
    if len(summary):
        lo_frac, hi_frac = summary.fraction.min(), summary.fraction.max()
        for frac in sorted({lo_frac, hi_frac}):
            part = summary[summary.fraction == frac]
            wide = part.assign(cell=part.apply(lambda r: f"{r.auroc:.3f} [{r.ci_lo:.3f}, {r.ci_hi:.3f}]", axis=1))
            table = wide.pivot_table(index=["task", "method"], columns="leads", values="cell", aggfunc="first")
            table = table.reset_index()
            lines += [f"## AUROC at {frac:.0%} of the training labels", "", _md(table), ""]
    if len(gen_df):
        lines += [
            "## 6 -> 12 generation of V1-V6 on held-out subjects (mean per-record Pearson r)",
            "",
            _md(gen_df),
            "",
        ]
    lines += ["## Figures", ""] + [f"- `{f}`" for f in figures] + [""]
    lines += ["## Time per stage (s)", "", _md(pd.DataFrame({"stage": list(timings), "s": list(timings.values())})), ""]
    lines += [
        "## What this does not show",
        "",
        "- 799 PTB-XL records (or the release you pointed it at) at a CPU budget: far from the paper's 800,000-record "
        "pre-training; intervals are wide.",
        "- PTB-XL diagnostic superclasses are not pulmonary hypertension; no PH claim follows from these numbers.",
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
