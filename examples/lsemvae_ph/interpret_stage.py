"""The ``interpret`` stage of the LS-EMVAE example: which lead and which wave carried the prediction.

Reads the finished run in ``OUTPUT.DIR`` through ``artifacts.py`` (the labelled records, their folds, the fold
classifiers and the pre-trained model) and, for each fold's held-out records, computes:

- integrated gradients of the fold classifier with respect to every lead's input signal, the per-lead attribution
  ratio and its share across leads (``lead_importance.csv``, per class and fold in ``lead_importance_by_fold.csv``);
- the fusion weights of the pre-trained model per lead and for the shared PoE expert (``gate_weights.csv``);
- the AUROC drop when each lead is masked out at inference (``lead_ablation.csv``);
- the share of attribution in P, QRS and T template windows (``wave_attribution.csv``);

and draws a Fig.-3-style plot per chosen subject plus bar charts, all in ``OUTPUT.DIR/interpret/``. The ``class``
of a record is its true label. Settings come from ``INTERPRET.*`` (defaults below when a key is missing).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import artifacts
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from yacs.config import CfgNode

from kale_ext.interpret.ablation import lead_ablation, summarise_ablation
from kale_ext.interpret.attribution import (
    attribution_ratio,
    integrated_gradients,
    lead_importance_table,
    summarise_over_folds,
)
from kale_ext.interpret.figures import (
    plot_attribution_ecg,
    plot_gate_weights,
    plot_lead_ablation,
    plot_lead_importance,
    plot_wave_attribution,
)
from kale_ext.interpret.gates import compute_gate_weights, gate_weight_table
from kale_ext.interpret.waves import detect_r_peaks, time_fraction, wave_attribution_table, wave_labels, wave_shares
from kale_ext.utils.console import interactive

logger = logging.getLogger("lsemvae_ph.interpret")

# Used when the config has no such INTERPRET key (the lead adds them to config.py).
DEFAULTS = {
    "N_STEPS": 32,  # integration steps of integrated gradients
    "THRESHOLD": 0.5,  # normalised |attribution| at which a sample counts (attribution ratio, red highlight)
    "BASELINE": "zeros",  # "zeros" or "mean" (each lead held flat at its own mean)
    "SUBJECTS": 2,  # subjects per class drawn as per-record figures
    "SMOOTH_S": 0.04,  # moving-average width (seconds) of |attribution| before thresholding
    "TARGET": "predicted",  # class attributed: "predicted" or a class index
    "MAX_RECORDS": 200,  # held-out records per fold interpreted (a seeded stratified draw); 0 = all
    "BATCH_SIZE": 8,  # records per integrated-gradients call (memory: BATCH_SIZE x N_STEPS forward passes)
    "SEED": 0,  # seed of the record draw
}


def _opt(cfg: CfgNode, key: str):
    """``cfg.INTERPRET.<key>``, or its default when the config does not define it."""
    section = cfg.get("INTERPRET") or {}
    return section.get(key, DEFAULTS[key])


def _device(cfg: CfgNode) -> str:
    """GPU when present unless the trainer is pinned to the CPU."""
    if str(cfg.TRAINER.get("ACCELERATOR", "auto")).lower() == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _draw(indices: np.ndarray, labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """At most ``limit`` of ``indices``, keeping the class proportions (all of them when limit is 0)."""
    if limit <= 0 or len(indices) <= limit:
        return indices
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels[indices]):
        members = indices[labels[indices] == cls]
        take = max(1, int(round(limit * len(members) / len(indices))))
        chosen.append(rng.choice(members, size=min(take, len(members)), replace=False))
    return np.sort(np.concatenate(chosen))


def _stack(dataset, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(signals (N, L, T), mask (N, L)) of the given records."""
    items = [dataset[int(i)] for i in indices]
    return torch.stack([it["signals"] for it in items]), torch.stack([it["mask"] for it in items]).bool()


def _wide_summary(table: pd.DataFrame, key: str, value: str) -> pd.DataFrame:
    """One row per ``key``: mean/std over folds of ``value`` for all records, then per class."""
    summary = summarise_over_folds(table, [key, "class"], [value])
    pooled = summary[summary["class"] == "all"].drop(columns="class").reset_index(drop=True)
    for cls in [c for c in dict.fromkeys(summary["class"]) if c != "all"]:
        part = summary[summary["class"] == cls].set_index(key)
        pooled[f"{value}_mean_class_{cls}"] = pooled[key].map(part[f"{value}_mean"])
        pooled[f"{value}_std_class_{cls}"] = pooled[key].map(part[f"{value}_std"])
    return pooled


def run_interpret(cfg: CfgNode) -> Path:
    """Interpret the run in ``cfg.OUTPUT.DIR``; returns the folder written (``OUTPUT.DIR/interpret``)."""
    out = Path(cfg.OUTPUT.DIR) / "interpret"
    out.mkdir(parents=True, exist_ok=True)
    device = _device(cfg)
    fs = float(cfg.DATASET.FS)
    n_steps, threshold = int(_opt(cfg, "N_STEPS")), float(_opt(cfg, "THRESHOLD"))
    baseline, target = _opt(cfg, "BASELINE"), _opt(cfg, "TARGET")
    target = target if target == "predicted" else int(target)
    smooth = max(1, int(round(float(_opt(cfg, "SMOOTH_S")) * fs)))
    subjects = int(_opt(cfg, "SUBJECTS"))

    dataset = artifacts.finetune_dataset(cfg)
    folds = artifacts.load_folds(cfg)
    if len(folds) != len(dataset) or list(folds["record_id"]) != [str(r) for r in dataset.record_ids]:
        raise RuntimeError(
            "folds.csv does not match the labelled records of this config; re-run main.py --stage finetune"
        )
    leads = tuple(dataset.leads)
    labels = folds["label"].to_numpy().astype(int)
    vae = artifacts.load_pretrained_model(cfg, device)
    synthetic = artifacts.is_synthetic(cfg)
    logger.info(
        "interpreting %s on %d records, leads %s (%s data)",
        cfg.MODEL.NAME,
        len(dataset),
        ",".join(leads),
        "synthetic" if synthetic else "real",
    )

    importance, ablation, gate_tables, wave_rows, fractions = [], [], [], [], []
    candidates, deltas, n_interpreted = [], [], 0
    fold_ids = sorted(folds["fold"].unique())
    bars = bool(cfg.TRAINER.get("PROGRESS_BAR", True)) and interactive()  # no bar redraws in a redirected log
    for fold in tqdm(fold_ids, desc="interpret folds", disable=not bars):
        held_out = np.flatnonzero(folds["fold"].to_numpy() == fold)
        idx = _draw(held_out, labels, int(_opt(cfg, "MAX_RECORDS")), int(_opt(cfg, "SEED")) + int(fold))
        x, mask = _stack(dataset, idx)
        y = labels[idx]
        model = artifacts.load_fold_classifier(cfg, int(fold), device)
        attr = integrated_gradients(
            model,
            x,
            mask,
            target=target,
            baseline=baseline,
            n_steps=n_steps,
            batch_size=int(_opt(cfg, "BATCH_SIZE")),
        )
        deltas.append(attr.delta.abs().numpy())
        ratio = attribution_ratio(attr.attributions, mask, threshold=threshold, smooth=smooth)
        importance.append(lead_importance_table(ratio, leads, y, np.full(len(idx), fold)))
        ablation.append(lead_ablation(model, x, y, leads, mask, fold=int(fold)))
        if vae is not None:
            # A model pre-trained on windows sees every window of a record, as its fold classifier's extractor does.
            model_window = getattr(getattr(model, "extractor", None), "window", 0)
            gates = compute_gate_weights(vae, x, leads, mask, window=model_window)
            gate_tables.append(gate_weight_table(gates, y, np.full(len(idx), fold)))
        a = attr.attributions.numpy()
        for i in range(len(idx)):
            peaks = detect_r_peaks(x[i].numpy(), fs, leads, mask[i].numpy())
            window = wave_labels(peaks, x.shape[-1], fs)
            wave_rows.append(wave_shares(a[i], window, mask[i].numpy()))
            fractions.append(time_fraction(window))
        # Keep only this fold's best candidates for the per-subject figures (memory stays small on real data).
        prob_true = attr.probabilities[torch.arange(len(idx)), torch.as_tensor(y)].numpy()
        for cls in np.unique(y):
            for i in [i for i in np.argsort(-prob_true) if y[i] == cls][:subjects]:
                candidates.append(
                    (
                        int(y[i]),
                        float(prob_true[i]),
                        int(fold),
                        x[i].numpy(),
                        a[i],
                        mask[i].numpy(),
                        ratio[i],
                        idx[i],
                        float(attr.probabilities[i, 1]),
                    )
                )
        n_interpreted += len(idx)

    from layout import RunLayout  # the run's names (endpoint, classes) and its headline AUROC
    from stages import chance_caveat, class_names

    run = RunLayout.from_cfg(cfg)
    names, caveat = class_names(run), chance_caveat(run.out)
    if caveat:
        logger.warning("%s", caveat)

    importance_by_fold = pd.concat(importance, ignore_index=True)
    importance_by_fold.to_csv(out / "lead_importance_by_fold.csv", index=False)
    lead_summary = _wide_summary(importance_by_fold, "lead", "share")
    ratio_summary = summarise_over_folds(importance_by_fold[importance_by_fold["class"] == "all"], ["lead"], ["ratio"])
    lead_summary = ratio_summary.drop(columns="n_folds").merge(lead_summary, on="lead")
    lead_summary.to_csv(out / "lead_importance.csv", index=False)

    ablation_by_fold = pd.concat(ablation, ignore_index=True)
    ablation_by_fold.to_csv(out / "lead_ablation_by_fold.csv", index=False)
    ablation_summary = summarise_ablation(ablation_by_fold)
    ablation_summary.to_csv(out / "lead_ablation.csv", index=False)

    if gate_tables:
        gates_by_fold = pd.concat(gate_tables, ignore_index=True)
        gates_by_fold.to_csv(out / "gate_weights_by_fold.csv", index=False)
        gate_summary = _wide_summary(gates_by_fold.drop(columns="gate"), "expert", "weight")
        gate_summary.insert(1, "gate", gates_by_fold["gate"].iloc[0])
        gate_summary.to_csv(out / "gate_weights.csv", index=False)
    else:
        gate_summary = None
        note = "supervised model: no multimodal fusion, hence no gate weights"
        pd.DataFrame({"expert": [], "gate": [], "weight_mean": [], "note": []}).to_csv(
            out / "gate_weights.csv", index=False
        )
        logger.info(note)

    waves = wave_attribution_table(np.stack(wave_rows), leads, np.stack(fractions))
    waves.to_csv(out / "wave_attribution.csv", index=False)

    tag = " [synthetic data]" if synthetic else ""
    task = f"{run.task}: "
    full_auroc = float(ablation_summary["auroc_full_mean"].iloc[0]) if len(ablation_summary) else float("nan")
    per_class = summarise_over_folds(importance_by_fold, ["lead", "class"], ["ratio", "share"])
    figures = [
        plot_lead_importance(
            per_class,
            out / "lead_importance.png",
            title=f"{task}lead importance by class (IG share; mean \u00b1 std over folds){tag}",
            class_names=names,
            caveat=caveat,
        ),
        plot_lead_ablation(
            ablation_summary,
            out / "lead_ablation.png",
            title=f"{task}AUROC drop with the lead masked out (fold AUROC mean with all leads {full_auroc:.3f}; "
            f"drops mean \u00b1 std over folds){tag}",
            caveat=caveat,
        ),
        plot_wave_attribution(
            waves,
            out / "wave_attribution.png",
            title=f"{task}attribution by wave window (template windows around R peaks){tag}",
            caveat=caveat,
        ),
    ]
    if gate_summary is not None:
        gate_plot = summarise_over_folds(gates_by_fold, ["expert", "class", "gate"], ["weight"])
        kind = gates_by_fold["gate"].iloc[0]
        figures.append(
            plot_gate_weights(
                gate_plot,
                out / "gate_weights.png",
                title=f"{task}fusion weights of the pre-trained model ({kind}; mean \u00b1 std over folds){tag}",
                class_names=names,
                caveat=caveat,
            )
        )

    # Per-subject figures: for each class, the correctly classified records the model was most confident about.
    record_ids = np.asarray(dataset.record_ids)
    subject_ids = np.asarray(dataset.subject_ids)
    for cls in sorted({c[0] for c in candidates}):
        ranked = sorted((c for c in candidates if c[0] == cls), key=lambda c: -c[1])[:subjects]
        for cand in ranked:
            label, _, fold, signals, attributions, present, ratios, row, prob1 = cand
            subject = subject_ids[row]
            title = (
                f"{task}subject {subject} (record {record_ids[row]}, fold {fold}) | label: {names[int(label)]} | "
                f"predicted P({names[1]}) = {prob1:.2f}{tag}"
            )
            figures.append(
                plot_attribution_ecg(
                    signals,
                    attributions,
                    leads,
                    fs,
                    out / f"subject_{subject}_record_{record_ids[row]}.png",
                    title=title,
                    mask=present,
                    threshold=threshold,
                    smooth=smooth,
                    ratios=ratios,
                    amplitude_unit="z-score (per lead, as the model sees it)",
                    caveat=caveat,
                )
            )

    summary = {
        "synthetic": synthetic,
        "method": cfg.MODEL.NAME,
        "leads": list(leads),
        "folds": [int(f) for f in fold_ids],
        "records_interpreted": n_interpreted,
        "target": str(target),
        "baseline": str(baseline),
        "n_steps": n_steps,
        "threshold": threshold,
        "smooth_samples": smooth,
        "class": "true label",
        "task": run.task,
        "class_names": {str(k): v for k, v in names.items()},
        "caveat": caveat,
        "median_abs_convergence_delta": float(np.median(np.concatenate(deltas))) if deltas else None,
        "top_lead_by_share": lead_summary.sort_values("share_mean", ascending=False)["lead"].iloc[0],
        "top_lead_by_ablation": ablation_summary["lead"].iloc[0] if len(ablation_summary) else None,
        "figures": [p.name for p in figures],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    logger.info(
        "interpretation written to %s (top lead by share %s, by ablation %s)",
        out,
        summary["top_lead_by_share"],
        summary["top_lead_by_ablation"],
    )
    return out
