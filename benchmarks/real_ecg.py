"""Evidence on real ECGs: representations, lead subsets, 6->12 generation and wave-level attribution on LUDB.

Data: the 160 LUDB records (Kalyakulina et al., IEEE Access 2020; cardiologists' diagnoses and per-lead P/QRS/T
marks) under ``../shared/data/ecg/ludb`` and, for label-free pre-training only, the 50 CinC-2021 records beside it
(Reyna et al. 2021). Both are read by the library's generic WFDB reader (lower-case lead names are mapped by name;
the per-lead annotation files beside the records are ignored: the wave marks come from ``annotations.csv``).

What runs (every number is measured in this run; see ``docs/real_ecg.md`` for the protocol and its limits):

1. Label-free pre-training of each VAE method on all real records at a CPU preset (default 100 Hz x 10 s = 1000
   samples, latent 32); a random-initialised frozen encoder (the LS-EMVAE architecture, untrained) as the floor; a
   supervised xResNet1d (small widths) trained end to end per fold.
2. Probes (``kale_ext.evaluate.probe``): repeated subject-level stratified 5-fold CV of a logistic-regression probe on
   frozen features; AUROC per fold and a pooled bootstrap 95% interval; LUDB's tasks as defined in
   ``examples/lsemvae_ph/ecg_tables.py`` (read by ``kale_ext.loaddata.diagnosis_labels``).
3. Lead subsets: probes fitted on 12-lead features scored with 12 / 6 limb / II / I leads (others masked), and probes
   fitted on 6-lead features scored with 6 / II / I.
4. 6 -> 12 generation: V1-V6 from the six limb leads by each VAE's lead-conditioned (or per-lead) decoder, the VAE
   pre-trained per fold on the training folds only, against a mean template and a per-sample linear regression.
5. Integrated gradients of the 6-lead probe on the frozen encoder; share of |attribution| inside the cardiologists'
   P, QRS and T windows vs the share of time they cover (``kale_ext.interpret.wave_share``).

Run: ``python benchmarks/real_ecg.py [--out outputs/real_ecg] [--fs 100] [--epochs 8] [--window-s 2.5] [--small]``
(``--window-s 0``: whole-record pre-training, the paper's setting, for comparison).
Exit code 2 when the data folder is absent.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kale_ext.embed.zoo import MODELS, build_model
from kale_ext.evaluate.probe import (
    ArraySignals,
    classifier_probability,
    cross_validated_probe,
    fit_linear_lead_map,
    frozen_features,
    generate_leads,
    generation_metrics,
    intervals_overlap,
    make_probe,
    probe_to_torch,
    repeated_folds,
    summarise_probe,
)
from kale_ext.interpret.attribution import integrated_gradients
from kale_ext.interpret.wave_share import wave_share_table, window_shares
from kale_ext.loaddata.ecg_dataset import ECGLeadDataset
from kale_ext.loaddata.leads import CANONICAL_LEADS, LIMB_LEADS
from kale_ext.loaddata.source_sets import combine_sources
from kale_ext.loaddata.wave_annotations import read_wave_annotations, wave_windows
from kale_ext.loaddata.wfdb_sources import RecordRef, list_records
from kale_ext.pipeline.finetune import FinetuneSettings, MaskedInputClassifier, fit_classifier
from kale_ext.pipeline.pretrain import PretrainSettings, run_pretraining
from kale_ext.predict.heads import FeatureClassifier, LatentFeatureExtractor
from kale_ext.predict.objectives import build_objective
from kale_ext.prepdata.ecg_cache import prepare_ecg_cache
from kale_ext.prepdata.ecg_transforms import PreprocessSpec
from kale_ext.utils.console import script_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "lsemvae_ph"))
from ecg_tables import LUDB_PREFIX, ludb_labels  # noqa: E402 - data set descriptions shared with the example

logger = logging.getLogger("real_ecg")

# Every compared method. kind: "vae" (pre-trained label-free, frozen, probed), "random" (the architecture at
# initialisation, frozen, probed) or "supervised" (trained end to end per fold). arch: the build() name.
METHODS = [
    {"name": "lsemvae", "kind": "vae", "arch": "lsemvae"},
    {"name": "mvae", "kind": "vae", "arch": "mvae"},
    {"name": "mopoe", "kind": "vae", "arch": "mopoe"},
    {"name": "stmem", "kind": "vae", "arch": "stmem", "modes": ("pooled",)},
    {"name": "random", "kind": "random", "arch": "lsemvae"},
    {"name": "xresnet1d", "kind": "supervised", "arch": "xresnet1d"},
]
SMALL_METHODS = ("lsemvae", "random")
FEATURE_MODES = ("concat_means", "fused_mean")
V_LEADS = ("V1", "V2", "V3", "V4", "V5", "V6")
SUBSETS = {"12L": CANONICAL_LEADS, "6L": LIMB_LEADS, "II": ("II",), "I": ("I",)}
SUBSETS_6 = ("6L", "II", "I")
MIN_POSITIVES = 8
ANNOTATION_FS = 500.0
CINC_PREFIX = "cinc_"
LEAD_DROPOUT = 0.25  # every VAE is pre-trained with the same lead dropout, so that lead subsets are trained for


# ---------------------------------------------------------------------------------------------------------------------
# The two swappable calls: model construction and pre-training
# ---------------------------------------------------------------------------------------------------------------------
def build(name: str, leads, T: int, D: int, seed: int = 0) -> torch.nn.Module:
    """Build a method's network (the only place a model is constructed).

    Args:
        name: an ``arch`` of :data:`METHODS` (``lsemvae``, ``mvae``, ``mopoe``, ``xresnet1d``).
        leads: lead names of the model.
        T: samples per lead.
        D: latent size (VAEs).
        seed: initialisation seed.

    Returns:
        The network, in eval mode.
    """
    torch.manual_seed(seed)
    if name == "xresnet1d":
        options = {"num_classes": 2, "layers": (1, 1, 1, 1), "widths": (8, 16, 32, 64), "stem_channels": (16, 16, 16)}
        return build_model(name, tuple(leads), T, D, **options).eval()
    if name == "stmem":  # the CPU preset; patches chosen for ~30 per lead at this length
        return build_model(name, tuple(leads), T, D, preset="small").eval()
    return build_model(name, tuple(leads), T, D, lead_dropout=LEAD_DROPOUT).eval()


def pretrain(
    model,
    dataset,
    out: Path,
    epochs: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    reuse_from: Path | None = None,
    objective: str = "elbo",
    window: int = 0,
    val_fraction: float = 0.1,
):
    """Pre-train a model label-free with its registry objective on ``dataset``; returns it in eval mode.

    The only place pre-training is called; the objective is ``kale_ext.predict.objectives.build_objective(objective)``
    with the library's defaults.

    With ``reuse_from`` holding a ``model.pt`` of an earlier run of the same preset, its weights are loaded (strictly)
    instead of training again; the caller vouches that the preset and the training records are the same.
    ``window`` > 0 trains on a fresh random crop of every record per step (the model is built for that length);
    ``val_fraction`` of the subjects is held out and its reconstruction r logged every epoch (memorising shows).
    """
    if reuse_from is not None and (Path(reuse_from) / "model.pt").is_file():
        state = torch.load(Path(reuse_from) / "model.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        logger.info("reused pre-trained weights from %s", reuse_from)
        return model.eval()
    settings = PretrainSettings(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        val_fraction=val_fraction,
        seed=seed,
        window=window,
        accelerator="cpu",
        progress_bar=False,
        resume=False,
        log_every_n_steps=1,
    )
    model.train()  # Lightning keeps the mode a module arrives in: lead dropout needs training mode
    # The library defaults of the objective (Gaussian likelihood, beta = 1, gamma = 0.5, gate balance) with beta
    # warmed up over the first half of the epochs.
    loss = build_objective(objective, beta_warmup_epochs=max(epochs / 2, 0.5))
    run_pretraining(model, loss, dataset, out, settings, build_args={}, leads=dataset.leads)
    shutil.rmtree(Path(out) / "checkpoints", ignore_errors=True)  # Lightning checkpoints are not needed here
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------
def default_data() -> Path:
    """``../shared/data/ecg/ludb`` relative to the repository (searched upwards from the checkout)."""
    here = Path(__file__).resolve().parents[1]
    for base in [here, *here.parents]:
        candidate = base.parent / "shared" / "data" / "ecg" / "ludb"
        if candidate.is_dir():
            return candidate
    return here.parent / "shared" / "data" / "ecg" / "ludb"


def record_refs(ludb: Path, cinc: Path | None, n_ludb: int | None, n_cinc: int | None) -> list[RecordRef]:
    """The records as RecordRefs with source-tagged ids (LUDB first, in record number order, then CinC)."""
    src = ludb / "data" if (ludb / "data").is_dir() else ludb
    ludb_refs = sorted(list_records(src, "header_tree"), key=lambda r: int(r.record_id) if r.record_id.isdigit() else 0)
    sources, tags = [ludb_refs[:n_ludb]], [LUDB_PREFIX.rstrip("_")]
    if cinc is not None and cinc.is_dir():
        sources.append(list_records(cinc, "header_tree")[:n_cinc])
        tags.append(CINC_PREFIX.rstrip("_"))
    return combine_sources(sources, tags=tags, separator="_")


TASK_TITLES = {
    "sinus": "sinus rhythm vs not",
    "afib": "atrial fibrillation vs not",
    "lad": "left axis deviation vs normal axis",
    "lvh": "left ventricular hypertrophy vs not",
    "irbbb": "incomplete RBBB vs not",
}


# ---------------------------------------------------------------------------------------------------------------------
# Features, probes, supervised baseline
# ---------------------------------------------------------------------------------------------------------------------
def supervised_oof(x12: np.ndarray, y: np.ndarray, folds: np.ndarray, T: int, D: int, epochs: int, seed: int) -> dict:
    """Out-of-fold probabilities of xResNet1d trained end to end (12-lead and 6-lead nets) on every subset."""
    prob = {f"12L>{s}": np.full(folds.shape, np.nan) for s in SUBSETS}
    prob.update({f"6L>{s}": np.full(folds.shape, np.nan) for s in SUBSETS_6})
    limb = [CANONICAL_LEADS.index(lead) for lead in LIMB_LEADS]
    for r, row in enumerate(folds):
        for k in sorted(np.unique(row).tolist()):
            train, test = row != k, row == k
            for trained, leads, x in (("12L", CANONICAL_LEADS, x12), ("6L", LIMB_LEADS, x12[:, limb])):
                s = seed + 100 * r + k
                net = MaskedInputClassifier(build("xresnet1d", leads, T, D, seed=s))
                settings = FinetuneSettings(
                    epochs=epochs, batch_size=32, lr=1e-3, loss="cross_entropy", seed=s, progress=False
                )
                fit_classifier(net, ArraySignals(x[train], y[train]), y[train], settings)
                subsets = SUBSETS if trained == "12L" else SUBSETS_6
                for name in subsets:
                    prob[f"{trained}>{name}"][r, test] = classifier_probability(net, x[test], leads, SUBSETS[name])
    return prob


# ---------------------------------------------------------------------------------------------------------------------
# Reporting helpers
# ---------------------------------------------------------------------------------------------------------------------
def md_table(frame: pd.DataFrame, floatfmt: str = "{:.3f}") -> str:
    """A pipe table of a DataFrame (no extra dependency)."""
    cols = list(frame.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for row in frame.itertuples(index=False):
        cells = [floatfmt.format(v) if isinstance(v, (float, np.floating)) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=None, help="LUDB folder (default ../shared/data/ecg/ludb)")
    p.add_argument("--cinc", type=Path, default=None, help="CinC-2021 folder (default: beside --data)")
    p.add_argument("--out", type=Path, default=Path("outputs/real_ecg"))
    p.add_argument("--fs", type=float, default=100.0, help="preset sampling rate (10 s records)")
    p.add_argument("--epochs", type=int, default=8, help="pre-training epochs")
    p.add_argument(
        "--window-s", type=float, default=2.5,
        help="pre-training window in seconds (random crop per step; features pool every window); 0 = whole records",
    )  # fmt: skip
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="repeats of the 5-fold probe CV")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--sup-epochs", type=int, default=12, help="epochs of the supervised xResNet1d per fold")
    p.add_argument("--sup-repeats", type=int, default=1, help="CV repeats of the supervised baseline (its first)")
    p.add_argument("--gen-methods", default="lsemvae,mvae,mopoe", help="VAEs pre-trained per fold for generation")
    p.add_argument("--ig-steps", type=int, default=16)
    p.add_argument("--methods", default=None, help="comma-separated subset of METHODS names")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--probe-c", default="cv", help="inverse L2 strength of the logistic probe, or 'cv' (inner CV)")
    p.add_argument(
        "--reuse-models", type=Path, default=None, help="an earlier --out of the same preset: load its weights"
    )
    p.add_argument("--small", action="store_true", help="few records, 1 epoch, 1 repeat, 2 methods (a test run)")
    return p.parse_args(argv)


def main(argv=None) -> int:  # noqa: C901 - one linear script, sections marked
    """Run the benchmark; returns the exit code."""
    args = parse_args(argv)
    script_logging()
    torch.set_num_threads(args.threads)  # one thread is fastest for these small convolutions on shared cores
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    ludb = args.data or default_data()
    if not (ludb / "ludb.csv").is_file():
        print(
            f"LUDB data not found at {ludb} (need ludb.csv, annotations.csv and data/*.hea); point --data to the "
            "LUDB folder (see ../shared/data/ecg/README.md)",
            file=sys.stderr,
        )
        return 2
    cinc = args.cinc or (ludb.parent / "cinc2021")
    if args.small:
        n_ludb, n_cinc, epochs, repeats, methods = 40, 8, 1, 1, list(SMALL_METHODS)
        gen_methods, gen_folds, sup_epochs, ig_steps, attr_tasks = ["lsemvae"], 2, 2, 8, 1
    else:
        n_ludb, n_cinc, epochs, repeats = None, None, args.epochs, args.repeats
        methods = [m["name"] for m in METHODS]
        gen_methods, gen_folds, sup_epochs = [m for m in args.gen_methods.split(",") if m], args.folds, args.sup_epochs
        ig_steps, attr_tasks = args.ig_steps, None
    if args.methods:
        methods = [m for m in args.methods.split(",") if m]
    method_of = {m["name"]: m for m in METHODS}
    unknown = [m for m in methods + gen_methods if m not in method_of]
    if unknown:
        print(f"unknown methods {unknown}; choose from {[m['name'] for m in METHODS]}", file=sys.stderr)
        return 2
    sup_repeats = min(args.sup_repeats, repeats)
    probe_c = args.probe_c if args.probe_c == "cv" else float(args.probe_c)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    T, D, fs = int(round(10 * args.fs)), args.latent, args.fs
    window = int(round(args.window_s * fs)) if args.window_s > 0 else 0  # 0: whole records (the paper's setting)
    W = window or T  # input length of the pre-trained and random encoders
    seed = args.seed

    # ---- 0. cache --------------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    refs = record_refs(ludb, cinc, n_ludb, n_cinc)
    cache = out / f"cache_{int(fs)}hz_{T}"
    report = prepare_ecg_cache(
        refs, cache, spec=PreprocessSpec(target_fs=fs, target_length=T), leads="12L", num_workers=1, progress=False
    )
    if report.n_skipped:
        logger.warning("skipped records: %s", report.skipped[:10])
    ds = ECGLeadDataset(cache, "12L")
    batch = ds.get_batch(np.arange(len(ds)))
    X = batch["signals"].numpy()  # (N, 12, T)
    ids = np.asarray(batch["record_id"])
    is_ludb = np.char.startswith(ids.astype(str), LUDB_PREFIX)
    n_total, n_ludb_used, n_cinc_used = len(ids), int(is_ludb.sum()), int((~is_ludb).sum())
    timings["cache"] = time.perf_counter() - t0
    logger.info("cache: %d records (%d LUDB, %d CinC), %s", n_total, n_ludb_used, n_cinc_used, X.shape)
    tag = f"real data, n = {n_ludb_used} LUDB records (+{n_cinc_used} CinC-2021 for pre-training)"

    # ---- 1. pre-training (label-free, all records) -----------------------------------------------------------------
    models = {}
    for name in methods:
        m = method_of[name]
        t0 = time.perf_counter()
        if m["kind"] == "vae":
            models[name] = pretrain(
                build(m["arch"], CANONICAL_LEADS, W, D, seed),
                ds,
                out / "models" / name,
                epochs,
                seed=seed,
                reuse_from=None if args.reuse_models is None else args.reuse_models / "models" / name,
                objective=MODELS[m["arch"]].objective,
                window=window,
            )
        elif m["kind"] == "random":
            models[name] = build(m["arch"], CANONICAL_LEADS, W, D, seed + 7)
        timings[f"pretrain {name}"] = time.perf_counter() - t0

    logger.info("stage: probes and lead subsets (%.0f s so far)", time.perf_counter() - t_start)
    # ---- 2./3. probes and lead subsets -----------------------------------------------------------------------------
    labels = ludb_labels(ludb / "ludb.csv").set_index("record_id")
    ludb_ids = ids[is_ludb]
    x_ludb = X[is_ludb]
    limb_idx = [CANONICAL_LEADS.index(lead) for lead in LIMB_LEADS]
    feats: dict[str, dict[str, np.ndarray]] = {}
    t0 = time.perf_counter()
    for name, model in models.items():
        for mode in method_of[name].get("modes", FEATURE_MODES):
            key = f"{name}/{mode}"
            feats[key] = {
                f"12L>{s}": frozen_features(model, x_ludb, CANONICAL_LEADS, leads, mode, window=window)
                for s, leads in SUBSETS.items()
            }
            feats[key].update(
                {
                    f"6L>{s}": frozen_features(model, x_ludb[:, limb_idx], LIMB_LEADS, SUBSETS[s], mode, window=window)
                    for s in SUBSETS_6
                }
            )
    timings["features"] = time.perf_counter() - t0
    task_rows, auroc_rows, fold_rows, subset_rows = [], [], [], []
    oof_store: dict = {}
    t0 = time.perf_counter()
    for task, title in TASK_TITLES.items():
        y_all = labels.reindex(ludb_ids)[task].to_numpy(dtype=np.float64)
        sel = ~np.isnan(y_all)
        y = y_all[sel].astype(int)
        n_pos, n = int(y.sum()), int(sel.sum())
        if n_pos < MIN_POSITIVES or n - n_pos < MIN_POSITIVES:
            task_rows.append(
                {"task": task, "title": title, "n": n, "n_pos": n_pos, "status": "skipped (< 8 per class)"}
            )
            continue
        task_rows.append({"task": task, "title": title, "n": n, "n_pos": n_pos, "status": "run"})
        groups = ludb_ids[sel]
        folds = repeated_folds(y, groups, n_splits=args.folds, repeats=repeats, seed=seed)
        results = {}
        for key, fset in feats.items():
            f = {k: v[sel] for k, v in fset.items()}
            o12 = cross_validated_probe(
                f["12L>12L"],
                y,
                folds,
                {f"12L>{s}": f[f"12L>{s}"] for s in SUBSETS if s != "12L"},
                name="12L>12L",
                seed=seed,
                c=probe_c,
            )
            o6 = cross_validated_probe(
                f["6L>6L"],
                y,
                folds,
                {f"6L>{s}": f[f"6L>{s}"] for s in SUBSETS_6 if s != "6L"},
                name="6L>6L",
                seed=seed,
                c=probe_c,
            )
            results[key] = ({**o12.prob, **o6.prob}, folds)
        if "xresnet1d" in methods:
            t1 = time.perf_counter()
            sfolds = folds[:sup_repeats]
            results["xresnet1d/end-to-end"] = (supervised_oof(x_ludb[sel], y, sfolds, T, D, sup_epochs, seed), sfolds)
            timings[f"supervised {task}"] = time.perf_counter() - t1
        for key, (prob, fl) in results.items():
            for setting, p in prob.items():
                s = summarise_probe(y, p, fl, groups=groups, n_boot=args.n_boot, seed=seed)
                row = {
                    "task": task,
                    "representation": key,
                    "setting": setting,
                    "auroc": s.auroc,
                    "ci_lo": s.ci[0],
                    "ci_hi": s.ci[1],
                    "fold_mean": s.fold_mean,
                    "fold_std": s.fold_std,
                    "repeats": len(fl),
                    "n": s.n,
                    "n_pos": s.n_pos,
                }
                (auroc_rows if setting == "12L>12L" else subset_rows).append(row)
                if setting == "12L>12L":
                    subset_rows.append(row)
                    for r in range(s.fold_auroc.shape[0]):
                        for k in range(s.fold_auroc.shape[1]):
                            fold_rows.append(
                                {
                                    "task": task,
                                    "representation": key,
                                    "repeat": r,
                                    "fold": k,
                                    "auroc": s.fold_auroc[r, k],
                                }
                            )
                elif setting == "6L>6L":
                    auroc_rows.append(row)
        oof_store[task] = (sel, y, folds)
    timings["probes (incl. supervised)"] = time.perf_counter() - t0
    tasks_df = pd.DataFrame(task_rows)
    auroc_df = pd.DataFrame(auroc_rows)
    subset_df = pd.DataFrame(subset_rows).drop_duplicates(["task", "representation", "setting"])
    tasks_df.to_csv(out / "tasks.csv", index=False)
    auroc_df.to_csv(out / "probe_auroc.csv", index=False)
    pd.DataFrame(fold_rows).to_csv(out / "probe_fold_auroc.csv", index=False)
    subset_df.to_csv(out / "subset_robustness.csv", index=False)

    logger.info("stage: generation (%.0f s so far)", time.perf_counter() - t_start)
    # ---- 4. 6 -> 12 generation ---------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    from sklearn.model_selection import GroupKFold

    v_idx = [CANONICAL_LEADS.index(lead) for lead in V_LEADS]
    ludb_pos = np.flatnonzero(is_ludb)
    gen_pred = {
        name: np.zeros((n_ludb_used, len(V_LEADS), T)) for name in [*gen_methods, "mean template", "linear (limb->V)"]
    }
    gen_fold = np.zeros(n_ludb_used, dtype=int)
    order = np.random.default_rng(seed).permutation(n_ludb_used)
    splitter = GroupKFold(n_splits=gen_folds)
    for k, (_, test_o) in enumerate(splitter.split(order, groups=ludb_ids[order])):
        test = np.sort(order[test_o])
        gen_fold[test] = k
        train_mask = np.ones(n_total, dtype=bool)
        train_mask[ludb_pos[test]] = False
        train_rows = np.flatnonzero(train_mask)
        x_tr = X[train_rows]
        gen_pred["mean template"][test] = x_tr[:, v_idx].mean(0)[None]
        lin = fit_linear_lead_map(x_tr[:, limb_idx], x_tr[:, v_idx])
        gen_pred["linear (limb->V)"][test] = lin.predict(x_ludb[test][:, limb_idx])
        fold_ds = ECGLeadDataset(cache, "12L", indices=train_rows)
        for name in gen_methods:
            arch = method_of[name]["arch"]
            model = pretrain(
                build(arch, CANONICAL_LEADS, W, D, seed + k),
                fold_ds,
                out / "models" / f"gen_{name}_fold{k}",
                epochs,
                seed=seed + k,
                reuse_from=None if args.reuse_models is None else args.reuse_models / "models" / f"gen_{name}_fold{k}",
                objective=MODELS[arch].objective,  # each model's registered objective, as in the pre-training above
                window=window,
            )
            gen_pred[name][test] = generate_leads(model, x_ludb[test][:, limb_idx], LIMB_LEADS, window)[:, v_idx]
    if "lsemvae" in models:  # label-free model that saw every record's V leads: an upper bound, not held out
        gen_pred["lsemvae (pre-trained on all, not held out)"] = generate_leads(
            models["lsemvae"], x_ludb[:, limb_idx], LIMB_LEADS, window
        )[:, v_idx]
    gen_rows = []
    true_v = x_ludb[:, v_idx]
    for name, pred in gen_pred.items():
        table = generation_metrics(pred, true_v).table(V_LEADS)
        table.insert(0, "method", name)
        gen_rows.append(table)
    gen_df = pd.concat(gen_rows, ignore_index=True)
    gen_df.to_csv(out / "generation.csv", index=False)
    timings["generation (per-fold pre-training)"] = time.perf_counter() - t0

    logger.info("stage: attribution (%.0f s so far)", time.perf_counter() - t_start)
    # ---- 5. wave-level attribution ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    ann = read_wave_annotations(ludb / "annotations.csv")
    ann["record_id"] = LUDB_PREFIX + ann["record_id"]
    windows, spans, n_incomplete = [], [], 0
    for rid in ludb_ids:
        ww = wave_windows(ann, rid, LIMB_LEADS, T, ANNOTATION_FS, fs)
        windows.append(ww.masks)
        spans.append(ww.span)
        n_incomplete += ww.n_incomplete
        waves = ww.waves
    windows, spans = np.stack(windows), np.stack(spans)
    wave_rows = []
    attr_models = [m for m in ("lsemvae", "random") if m in models]
    for task in list(oof_store)[:attr_tasks]:
        sel, y, _ = oof_store[task]
        for name in attr_models:
            f6 = feats[f"{name}/concat_means"]["6L>6L"][sel]
            probe = make_probe("logistic", seed=seed, c=probe_c).fit(f6, y)
            clf = FeatureClassifier(
                LatentFeatureExtractor(models[name], LIMB_LEADS, "concat_means", window=window), probe_to_torch(probe)
            )
            x6 = torch.as_tensor(x_ludb[sel][:, limb_idx], dtype=torch.float32)
            att = integrated_gradients(clf, x6, target=1, n_steps=ig_steps, batch_size=16)
            shares = window_shares(att.attributions.numpy(), windows[sel], spans[sel])
            table = wave_share_table(shares, LIMB_LEADS, waves, n_boot=200, seed=seed)
            table.insert(0, "encoder", name)
            table.insert(0, "task", task)
            table["median_abs_delta"] = float(att.delta.abs().median())
            wave_rows.append(table)
    wave_df = pd.concat(wave_rows, ignore_index=True) if wave_rows else pd.DataFrame()
    wave_df.to_csv(out / "wave_share.csv", index=False)
    timings["attribution"] = time.perf_counter() - t0

    logger.info("stage: figures (%.0f s so far)", time.perf_counter() - t_start)
    # ---- 6. figures and results.md ---------------------------------------------------------------------------------
    plt = _plt()
    figures = {}
    if not auroc_df.empty:
        main_df = auroc_df[auroc_df.setting == "12L>12L"]
        reps = list(dict.fromkeys(main_df.representation))
        tasks_run = list(dict.fromkeys(main_df.task))
        fig, ax = plt.subplots(figsize=(1.6 + 1.6 * len(tasks_run), 4))
        width = 0.8 / max(len(reps), 1)
        for i, rep in enumerate(reps):
            d = main_df[main_df.representation == rep].set_index("task").reindex(tasks_run)
            xs = np.arange(len(tasks_run)) + (i - (len(reps) - 1) / 2) * width
            ax.errorbar(xs, d.auroc, yerr=[d.auroc - d.ci_lo, d.ci_hi - d.auroc], fmt="o", capsize=2, label=rep)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xticks(np.arange(len(tasks_run)), tasks_run)
        ax.set_ylabel("AUROC (pooled OOF, 95% bootstrap CI)")
        ax.set_title(f"12-lead probes, {tag}", fontsize=8)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(out / "probe_auroc.png", dpi=120)
        plt.close(fig)
        figures["probe AUROC"] = "probe_auroc.png"
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), sharey=True)
        for ax, (trained, subs) in zip(axes, (("12L", list(SUBSETS)), ("6L", list(SUBSETS_6)))):
            for i, rep in enumerate(reps):
                d = subset_df[subset_df.representation == rep]
                cells = [d[d.setting == f"{trained}>{s}"] for s in subs]
                curve = np.array([c.auroc.mean() for c in cells])
                lo = np.array([c.ci_lo.mean() for c in cells])  # the per-task 95% bootstrap CIs, averaged over tasks
                hi = np.array([c.ci_hi.mean() for c in cells])
                xs = np.arange(len(subs)) + (i - (len(reps) - 1) / 2) * 0.08  # side by side, bars readable
                ax.errorbar(xs, curve, yerr=[curve - lo, hi - curve], marker="o", capsize=2, label=rep)
            ax.axhline(0.5, color="grey", lw=0.8, ls="--", label="chance (0.5)")
            ax.set_xticks(np.arange(len(subs)), subs)
            ax.set_title(f"heads trained on {trained} features (mean over tasks)", fontsize=8)
            ax.set_xlabel("leads present at test")
        axes[0].set_ylabel("AUROC (pooled OOF)")
        axes[1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: covers no bar
        fig.suptitle(f"{tag}\nbars: per-task 95% bootstrap CIs averaged over tasks; dashed: chance", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "subset_robustness.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        figures["subset robustness"] = "subset_robustness.png"
    show = [n for n in ("lsemvae", "linear (limb->V)") if n in gen_pred]
    fig, axes = plt.subplots(3, len(V_LEADS), figsize=(16, 6), sharex=True)
    t_axis = np.arange(T) / fs
    for i, rec in enumerate(np.linspace(0, n_ludb_used - 1, 3).astype(int)):
        for j, lead in enumerate(V_LEADS):
            ax = axes[i, j]
            ax.plot(t_axis, true_v[rec, j], color="k", lw=0.7, label="true")
            for name in show:
                ax.plot(t_axis, gen_pred[name][rec, j], lw=0.7, label=name)
            ax.set_xlim(0, min(4.0, T / fs))
            ax.set_title(f"{ludb_ids[rec]} {lead}", fontsize=7)
            ax.tick_params(labelsize=6)
        axes[i, 0].set_ylabel("amplitude\n(z-score per lead)", fontsize=7)  # the cache z-scores every lead
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(f"V1-V6 generated from the 6 limb leads (held-out folds), first 4 s; {tag}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "generation_examples.png", dpi=120)
    plt.close(fig)
    figures["generated vs true V leads"] = "generation_examples.png"
    if not wave_df.empty:
        allrows = wave_df[wave_df.lead == "all"]
        combos = list(dict.fromkeys(zip(allrows.task, allrows.encoder)))
        fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(combos), 4))
        width = 0.8 / len(waves)
        for i, wave in enumerate(waves):
            d = allrows[allrows.wave == wave].set_index(["task", "encoder"]).reindex(combos)
            xs = np.arange(len(combos)) + (i - (len(waves) - 1) / 2) * width
            ax.bar(xs, d.ratio, width, yerr=[d.ratio - d.ratio_lo, d.ratio_hi - d.ratio], capsize=2, label=wave)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(np.arange(len(combos)), [f"{t}\n{e}" for t, e in combos], fontsize=7)
        ax.set_ylabel("attribution share / time share")
        width = 1.5 + 1.2 * len(combos)
        title = f"IG of the 6-lead probe inside cardiologists' windows; {tag}"
        ax.set_title(textwrap.fill(title, max(30, int(width * 72 / (0.55 * 8)) - 6)), fontsize=8)  # never clipped
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "wave_attribution.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        figures["attribution vs annotation"] = "wave_attribution.png"

    timings["total"] = time.perf_counter() - t_start
    timings["total CPU time of this process"] = time.process_time()  # the wall time a dedicated core would need
    write_results(
        out,
        args,
        tag,
        fs,
        T,
        D,
        epochs,
        repeats,
        sup_repeats,
        sup_epochs,
        gen_folds,
        n_total,
        n_ludb_used,
        n_cinc_used,
        report,
        tasks_df,
        auroc_df,
        subset_df,
        gen_df,
        wave_df,
        n_incomplete,
        figures,
        timings,
    )
    summary = {
        "n_records": n_total,
        "n_ludb": n_ludb_used,
        "n_cinc": n_cinc_used,
        "tasks": task_rows,
        "timings_s": timings,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float), encoding="utf-8")
    print(f"results in {out / 'results.md'} ({timings['total']:.0f} s)")
    return 0


def write_results(
    out,
    args,
    tag,
    fs,
    T,
    D,
    epochs,
    repeats,
    sup_repeats,
    sup_epochs,
    gen_folds,
    n_total,
    n_ludb,
    n_cinc,
    report,
    tasks_df,
    auroc_df,
    subset_df,
    gen_df,
    wave_df,
    n_incomplete,
    figures,
    timings,
):
    """Write ``results.md`` with every table."""
    lines = [f"# Real-ECG benchmark ({tag})", ""]
    lines += [
        f"Preset: {fs:g} Hz x 10 s = {T} samples per lead, latent {D}, {epochs} pre-training epochs, "
        f"probe CV {args.folds}-fold x {repeats} repeats (supervised xResNet1d: {sup_repeats} repeats, "
        f"{sup_epochs} epochs), logistic probe C = {args.probe_c} ('cv': chosen per training part by inner 3-fold "
        f"CV from 1e-4..10), generation {gen_folds}-fold. Records in the cache: {n_total} "
        f"({n_ludb} LUDB + {n_cinc} CinC-2021), {report.n_skipped} skipped by QC. Everything below is measured in "
        "this run on real data; nothing is tuned on the test folds.",
        "",
        "## Tasks (labels parsed from LUDB diagnoses)",
        "",
        md_table(tasks_df),
        "",
        "## Probe AUROC (pooled out-of-fold, 95% bootstrap CI over subjects)",
        "",
        "`12L>12L`: probe fitted and scored on 12-lead features; `6L>6L`: on 6 limb-lead features. "
        "`~best` = the CI overlaps the CI of the task's best representation in that setting (no clear difference).",
        "",
    ]
    if not auroc_df.empty:
        d = auroc_df.copy()
        marks = []
        for _, row in d.iterrows():
            same = d[(d.task == row.task) & (d.setting == row.setting)]
            best = same.loc[same.auroc.idxmax()]
            if best.representation == row.representation:
                marks.append("best")
            else:
                marks.append("~best" if intervals_overlap((row.ci_lo, row.ci_hi), (best.ci_lo, best.ci_hi)) else "")
        d["vs_best"] = marks
        d["auroc [CI]"] = [f"{a:.3f} [{lo:.3f}, {hi:.3f}]" for a, lo, hi in zip(d.auroc, d.ci_lo, d.ci_hi)]
        d["fold mean ± std"] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(d.fold_mean, d.fold_std)]
        for setting in ("12L>12L", "6L>6L"):
            part = d[d.setting == setting]
            lines += [
                f"### {setting}",
                "",
                md_table(
                    part[
                        ["task", "representation", "auroc [CI]", "fold mean ± std", "vs_best", "repeats", "n", "n_pos"]
                    ]
                ),
                "",
            ]
        piv = d[d.setting == "12L>12L"].pivot(index="representation", columns="task", values="auroc")
        rnd = [r for r in piv.index if r.startswith("random/")]
        if rnd:
            floor = piv.loc[rnd].max()
            lines += [
                "Pre-trained vs the random-encoder floor (12L>12L, AUROC minus the better random-encoder mode):",
                "",
                md_table((piv - floor).reset_index()),
                "",
            ]
    lines += ["## Lead-subset robustness (ΔAUROC vs the full-lead setting of the same head)", ""]
    if not subset_df.empty:
        s = subset_df.copy()
        base = {}
        for _, row in s.iterrows():
            trained = row.setting.split(">")[0]
            base_row = s[
                (s.task == row.task) & (s.representation == row.representation) & (s.setting == f"{trained}>{trained}")
            ]
            base[row.name] = row.auroc - float(base_row.auroc.iloc[0]) if len(base_row) else np.nan
        s["delta_auroc"] = pd.Series(base)
        s.to_csv(out / "subset_robustness.csv", index=False)
        piv = s.pivot_table(index="representation", columns="setting", values="delta_auroc", aggfunc="mean")
        piv = piv[[c for c in ["12L>6L", "12L>II", "12L>I", "6L>II", "6L>I"] if c in piv.columns]]
        lines += [
            "Mean ΔAUROC over tasks (absent leads masked; heads not refitted):",
            "",
            md_table(piv.reset_index()),
            "",
            "Per task (AUROC):",
            "",
        ]
        piv2 = s.pivot_table(index=["task", "representation"], columns="setting", values="auroc")
        lines += [md_table(piv2.reset_index()), ""]
    lines += [
        "## 6 -> 12 generation (V1-V6 from the 6 limb leads, held-out folds)",
        "",
        f"Each VAE is pre-trained label-free per fold on the training folds ({gen_folds}-fold by subject over LUDB; "
        "CinC records always in training) and decodes V1-V6 from a latent fused from the limb leads alone (z = fused "
        "mean). Baselines: mean template = training-fold mean of each V lead, time-aligned as-is; linear = least "
        "squares of each V lead on the 6 limb leads shared by all time samples (fitted on the training folds). "
        "The row `not held out` uses the model pre-trained on all records (it saw the test V leads) and is an "
        "optimistic reference only. Signals are per-lead z-scored, so RMSE is in standard deviations.",
        "",
    ]
    piv = gen_df.pivot_table(index="method", columns="lead", values="pearson_r", sort=False)
    lines += ["Pearson r (mean over records):", "", md_table(piv[[*V_LEADS, "all"]].reset_index()), ""]
    piv = gen_df.pivot_table(index="method", columns="lead", values="rmse", sort=False)
    lines += ["RMSE (z units):", "", md_table(piv[[*V_LEADS, "all"]].reset_index()), ""]
    lines += [
        "## Wave-level attribution vs cardiologists' annotations",
        "",
        "Integrated gradients (target: positive-class logit, zero baseline) of a logistic probe on frozen 6-lead "
        "concat_means features, fitted on all labelled records of the task (descriptive, not cross-validated). "
        "Shares are taken within each lead's annotated span; ratio = attribution share / time share "
        f"(> 1: attribution concentrates on that wave). {n_incomplete} marks without onset/offset were left out.",
        "",
    ]
    if not wave_df.empty:
        w = wave_df[wave_df.lead == "all"].copy()
        w["ratio [CI]"] = [f"{r:.2f} [{lo:.2f}, {hi:.2f}]" for r, lo, hi in zip(w.ratio, w.ratio_lo, w.ratio_hi)]
        lines += [
            md_table(
                w[["task", "encoder", "wave", "attribution_share", "time_share", "ratio [CI]", "n", "median_abs_delta"]]
            ),
            "",
        ]
    lines += ["## Figures", ""] + [f"- {k}: ![{k}]({v})" for k, v in figures.items()] + [""]
    lines += [
        "## Timings (s)",
        "",
        md_table(pd.DataFrame({"step": list(timings), "seconds": list(timings.values())}), "{:.1f}"),
        "",
    ]
    (out / "results.md").write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
