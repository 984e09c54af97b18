"""Training for the deployed setting, measured on real records: lead dropout, subset terms, a gate that weighs lead
quality, and the gate's balance weights chosen on a held-out criterion.

Data: PTB-XL in its own layout under ``../shared/data/ecg/ptbxl`` (or the full release, ``--ptbxl``), with LUDB and
CinC-2021 added, label-free, to pre-training (as ``benchmarks/label_efficiency.py``, whose readers this script uses).

Protocol (every number is measured in the run):

1. Split by PTB-XL's ``strat_fold``: folds 1-8 are the development part, 9-10 the test part. Label-free pre-training
   uses every record except the test part (so the gate and the 6-lead posterior are read on subjects no model saw).
2. One LS-EMVAE per arm (``ARMS``), windowed like the real-data preset (``configs/real_cpu.yaml``: 100 Hz, 2.5-s
   windows, latent 32), differing only in the switch the arm names: lead dropout, sub-ELBO terms, the corruption
   augmentation (``PRETRAIN.CORRUPT_PROB``), the gate's input (``MODEL.GATE_CONTEXT``), the balance weights
   (``PRETRAIN.GATE_IMPORTANCE`` / ``GATE_BALANCE_KL`` scaled together), and the ablations PoE-only / uniform weights.
3. Gate: on the test part's first 2.5-s window, one lead per record corrupted (each kind in turn; the lead drawn with
   a fixed seed), with 12 leads present and with the 6 limb leads present: the share of records whose corrupted
   lead's weight falls below a third of its clean weight, and the median ratio.
4. The 6-lead posterior: how far the fused mean from the 6 limb leads is from the 12-lead one (share of the
   between-record variance; centred cosine), on the test part.
5. Downstream, 6 limb leads (the served setting), every PTB-XL superclass: a logistic probe on frozen features of
   clean records. Development criterion: 8-fold cross-validated AUROC over ``strat_fold`` 1-8, on clean records and
   with one limb lead corrupted (the same probes score both). Test: the probe fitted on folds 1-8 scores folds 9-10,
   clean and with one limb lead corrupted (each kind), AUROC with a subject-level bootstrap interval.
   The arms' choices (``choices`` in results.json) are made on the development criterion only.

Outputs in ``--out``: ``arms/<arm>_seed<k>.json`` (one per arm and seed; a rerun skips those already measured, so
the job resumes and can be split: ``--arms a,b`` in two processes; ``--seeds 2`` adds a seed), ``results.json``,
``results.md``, ``gate_weights.png`` (mean weight per expert, clean vs lead II corrupted, per arm). ``--small`` runs
a few records and one epoch (a test of the script, not a result).

Run: ``python benchmarks/lead_quality.py [--out outputs/lead_quality] [--arms plain,corruption] [--seeds 2] [--small]``.
Exit code 2 when the data are absent.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kale_ext.embed.zoo import build_model
from kale_ext.evaluate.metrics import auroc
from kale_ext.evaluate.probe import cross_validated_probe, frozen_features, make_probe, present_mask
from kale_ext.loaddata.leads import CANONICAL_LEADS, LIMB_LEADS
from kale_ext.pipeline.pretrain import PretrainSettings, run_pretraining
from kale_ext.predict.objectives import ELBOObjective, build_objective
from kale_ext.prepdata.corruption import CORRUPTION_KINDS, LeadCorruption, corrupt_leads
from kale_ext.utils.console import script_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from label_efficiency import TASKS, find_ptbxl, load_records, score  # noqa: E402

logger = logging.getLogger("lead_quality")

PRESET = {"fs": 100.0, "window": 250, "latent": 32, "epochs": 60, "batch": 32, "lr": 1e-3}
_BASE = {"dropout": 0.0, "subset": "none", "corrupt": 0.0, "context": "expert", "fusion": "gate", "balance": 1.0}
# arm -> the switches that differ from the real-data preset (``_BASE``: today's configs/real_cpu.yaml).
ARMS = {
    "plain": {},
    "lead dropout 0.5": {"dropout": 0.5},
    "subset terms": {"subset": "subset"},
    "corruption": {"corrupt": 0.5},
    "corruption + consensus gate": {"corrupt": 0.5, "context": "consensus"},
    "corruption + consensus gate / balance 0": {"corrupt": 0.5, "context": "consensus", "balance": 0.0},
    "corruption + consensus gate / balance x3": {"corrupt": 0.5, "context": "consensus", "balance": 3.0},
    "corruption / balance 0": {"corrupt": 0.5, "balance": 0.0},
    "corruption / balance x3": {"corrupt": 0.5, "balance": 3.0},
    "lead dropout 0.5 + corruption": {"dropout": 0.5, "corrupt": 0.5},
    "corruption / PoE only": {"corrupt": 0.5, "fusion": "poe"},
    "corruption / uniform weights": {"corrupt": 0.5, "fusion": "uniform"},
}
# The figure's panels (when measured; else every gated arm): without corruption, with it, with the consensus gate.
FIGURE_ARMS = ("plain", "corruption", "corruption + consensus gate")
SMALL_ARMS = ("plain", "corruption + consensus gate", "corruption / PoE only")
# The objective's default balance coefficients (PRETRAIN.GATE_IMPORTANCE, PRETRAIN.GATE_BALANCE_KL), scaled by an arm.
BALANCE = {k: inspect.signature(ELBOObjective).parameters[k].default for k in ("gate_importance", "gate_balance_kl")}


def arm_slug(arm: str) -> str:
    """A file name for an arm."""
    return "".join(c if c.isalnum() else "_" for c in arm).strip("_")


# ---------------------------------------------------------------------------------------------------------------------
# Pre-training one arm
# ---------------------------------------------------------------------------------------------------------------------
def pretrain_arm(arm: str, dataset, out: Path, preset: dict, seed: int) -> torch.nn.Module:
    """LS-EMVAE pre-trained with the arm's switches (the library's ELBO objective and defaults otherwise)."""
    a = {**_BASE, **ARMS[arm]}
    torch.manual_seed(seed)
    options = {"lead_dropout": a["dropout"], "gate_context": a["context"]}
    if a["fusion"] == "poe":
        options["no_moe"] = True
    elif a["fusion"] == "uniform":
        options["no_gate"] = True
    model = build_model("lsemvae", CANONICAL_LEADS, preset["window"], preset["latent"], **options)
    settings = PretrainSettings(
        epochs=preset["epochs"], batch_size=preset["batch"], lr=preset["lr"], val_fraction=0.1, seed=seed,
        accelerator="cpu", progress_bar=False, resume=False, log_every_n_steps=10, window=preset["window"],
    )  # fmt: skip
    objective = build_objective(
        "elbo", beta_warmup_epochs=max(preset["epochs"] / 3, 0.5), subset_terms=a["subset"],
        **{k: v * a["balance"] for k, v in BALANCE.items()},
    )  # fmt: skip
    augment = LeadCorruption(a["corrupt"]) if a["corrupt"] > 0 else None
    run_pretraining(model, objective, dataset, out, settings, build_args={}, leads=dataset.leads, augment=augment)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return model.eval()


def _mask(names, n: int) -> torch.Tensor:
    return present_mask(CANONICAL_LEADS, names, n)


# ---------------------------------------------------------------------------------------------------------------------
# Gate and posterior measurements (on the model's input unit, one window per record)
# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def gate_response(model, x: torch.Tensor, present, seed: int) -> dict:
    """Per corruption kind: share of records whose corrupted lead's weight < 1/3 of its clean weight, median ratio."""
    mask = _mask(present, len(x))
    clean = model(x, mask=mask, sample=False).fusion.weights  # (13, B): 12 leads + the PoE expert
    result = {}
    for k, kind in enumerate(CORRUPTION_KINDS):
        bad = corrupt_leads(x, mask, prob=1.0, kinds=[kind], generator=torch.Generator().manual_seed(seed + k))
        weights = model(bad.signals, mask=mask, sample=False).fusion.weights
        lead = bad.corrupted.float().argmax(1)
        rows = torch.arange(len(lead))
        w_clean, w_bad = clean[lead, rows], weights[lead, rows]
        ratio = w_bad / w_clean.clamp_min(1e-12)
        result[kind] = {
            "share_below_third": float((ratio < 1 / 3).float().mean()),
            "median_ratio": float(ratio.median()),
            "weight_clean": float(w_clean.mean()),
            "weight_corrupted": float(w_bad.mean()),
            "poe_clean": float(clean[-1].mean()),
            "poe_corrupted": float(weights[-1].mean()),
        }
    return result


@torch.no_grad()
def figure_weights(model, x: torch.Tensor, seed: int) -> dict:
    """Mean weight per expert (12 leads + PoE), clean and with lead II corrupted (each kind) in every record."""
    mask = _mask(CANONICAL_LEADS, len(x))
    only_ii = torch.zeros_like(mask)
    only_ii[:, CANONICAL_LEADS.index("II")] = True
    out = {"clean": model(x, mask=mask, sample=False).fusion.weights.mean(1).tolist()}
    for k, kind in enumerate(CORRUPTION_KINDS):
        bad = corrupt_leads(x, only_ii, prob=1.0, kinds=[kind], generator=torch.Generator().manual_seed(seed + k))
        out[f"II {kind}"] = model(bad.signals, mask=mask, sample=False).fusion.weights.mean(1).tolist()
    return out


@torch.no_grad()
def six_lead_shift(model, x: torch.Tensor) -> dict:
    """Distance of the 6-limb-lead fused mean from the 12-lead one: share of between-record variance, centred cosine."""
    mu12 = model(x, mask=_mask(CANONICAL_LEADS, len(x)), sample=False).fusion.mean
    mu6 = model(x, mask=_mask(LIMB_LEADS, len(x)), sample=False).fusion.mean
    variance = (mu12 - mu12.mean(0)).square().sum(1).mean().clamp_min(1e-12)
    a, b = mu12 - mu12.mean(0), mu6 - mu6.mean(0)
    return {
        "shift": float((mu6 - mu12).square().sum(1).mean() / variance),
        "centred_cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean()),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Downstream: 6 limb leads, clean and with one limb lead corrupted
# ---------------------------------------------------------------------------------------------------------------------
def corrupted_records(x: np.ndarray, kind: str, seed: int) -> np.ndarray:
    """Whole records with one limb lead per record corrupted by ``kind`` (the lead drawn with ``seed``)."""
    xt = torch.as_tensor(x)
    limb = _mask(LIMB_LEADS, len(xt))
    return corrupt_leads(
        xt, limb, prob=1.0, kinds=[kind], generator=torch.Generator().manual_seed(seed)
    ).signals.numpy()


def downstream(model, x: np.ndarray, table, dev: np.ndarray, test: np.ndarray, window: int, seed: int, n_boot: int):
    """Development (8-fold CV over strat_fold 1-8) and test AUROC per task, clean and per corruption kind, 6 leads."""
    sets = {"clean": x}
    for k, kind in enumerate(CORRUPTION_KINDS):
        sets[kind] = corrupted_records(x, kind, seed + 10 * k)
    feats = {
        name: frozen_features(model, v, CANONICAL_LEADS, LIMB_LEADS, "fused_mean", window) for name, v in sets.items()
    }
    rows = []
    for task in TASKS:
        y_all = table[task].to_numpy()
        known = ~np.isnan(y_all)
        d, t = dev & known, test & known
        y_dev, y_test = y_all[d].astype(int), y_all[t].astype(int)
        folds = table["strat_fold"].to_numpy()[d]
        cv = cross_validated_probe(feats["clean"][d], y_dev, folds, {n: f[d] for n, f in feats.items() if n != "clean"},
                                   name="clean", seed=seed)  # fmt: skip
        probe = make_probe(seed=seed).fit(feats["clean"][d], y_dev)
        groups = table["subject_id"].to_numpy()[t]
        for name, f in feats.items():
            p = probe.predict_proba(f[t])[:, 1]
            value, lo, hi = score(y_test, p, groups, n_boot, seed)
            rows.append({"task": task, "input": name, "dev_auroc": auroc(y_dev, cv.prob[name][0]),
                         "test_auroc": value, "test_lo": lo, "test_hi": hi})  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# One arm, measured
# ---------------------------------------------------------------------------------------------------------------------
def arm_path(out: Path, arm: str, seed: int) -> Path:
    """Where one arm's measurement at one seed is kept."""
    return out / "arms" / f"{arm_slug(arm)}_seed{seed}.json"


def measure_arm(arm, pre_ds, X, table, dev, test, out: Path, preset: dict, seed: int, n_boot: int) -> dict:
    """Pre-train one arm at one seed and measure it; the result is also written to :func:`arm_path`."""
    t0 = time.perf_counter()
    model = pretrain_arm(arm, pre_ds, out / "models" / f"{arm_slug(arm)}_seed{seed}", preset, seed)
    t_pre = time.perf_counter() - t0
    W = preset["window"]
    xw = torch.as_tensor(X[test][:, :, :W]).float()  # the test part's first window
    gated = ARMS[arm].get("fusion", _BASE["fusion"]) == "gate"  # PoE-only and uniform weights have no gate to read
    result = {
        "arm": arm,
        "seed": seed,
        "switches": {**_BASE, **ARMS[arm]},
        "pretrain_s": t_pre,
        "gate_12L": gate_response(model, xw, CANONICAL_LEADS, seed + 100) if gated else None,
        "gate_6L": gate_response(model, xw, LIMB_LEADS, seed + 200) if gated else None,
        "figure": figure_weights(model, xw, seed + 300) if gated else None,
        "six_lead": six_lead_shift(model, xw),
        "downstream": downstream(model, X, table, dev, test, W, seed + 400, n_boot),
    }
    result["total_s"] = time.perf_counter() - t0
    path = arm_path(out, arm, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------
def _task_mean(rows, column: str, inputs) -> float:
    values = [r[column] for r in rows if r["input"] in inputs]
    return float(np.mean(values)) if values else float("nan")


def _gate_share(gate: dict | None) -> float:
    """Mean over corruption kinds of the share of records below a third of the clean weight (NaN without a gate)."""
    if not gate:
        return float("nan")
    return float(np.mean([gate[k]["share_below_third"] for k in CORRUPTION_KINDS]))


def _one_run(r: dict) -> dict:
    """The summary figures of one arm at one seed."""
    rows = r["downstream"]
    gated = r["switches"]["fusion"] == "gate"  # PoE-only and uniform weights: no gate to read
    s = {
        "dev_clean": _task_mean(rows, "dev_auroc", ["clean"]),
        "dev_corrupted": _task_mean(rows, "dev_auroc", CORRUPTION_KINDS),
        "test_clean": _task_mean(rows, "test_auroc", ["clean"]),
        "test_corrupted": _task_mean(rows, "test_auroc", CORRUPTION_KINDS),
        **{f"share_below_third_{k}": _gate_share(r[f"gate_{k}"] if gated else None) for k in ("12L", "6L")},
        "six_lead_shift": r["six_lead"]["shift"],
        "six_lead_cosine": r["six_lead"]["centred_cosine"],
    }
    s["dev_drop"] = s["dev_clean"] - s["dev_corrupted"]
    s["test_drop"] = s["test_clean"] - s["test_corrupted"]
    return s


def beats_everywhere(summary: dict, arm: str, base: str, key) -> bool:
    """Whether ``arm`` scores above ``base`` (``key(per-seed summary)``) at every seed both were measured at."""
    a, b = summary[arm]["by_seed"], summary[base]["by_seed"]
    common = sorted(set(a) & set(b))
    return bool(common) and all(key(a[s]) > key(b[s]) for s in common)


def summarise(results: dict) -> dict:
    """Per arm: the mean over seeds of dev/test AUROC (clean, one lead corrupted), gate shares and the 6-lead shift,
    with the per-seed figures; and the choices, made on the development criterion only.

    A departure replaces the preset's setting only when it beats it at every seed measured (a margin smaller than
    the spread between seeds is not a measurement): item 1 (lead dropout, subset terms against ``plain``) on the clean
    6-lead dev AUROC; item 3 (balance weights against the default ``x1`` of the same arm) on the dev AUROC averaged
    over clean and corrupted inputs."""
    summary = {}
    for arm, runs in results.items():
        by_seed = {str(r["seed"]): _one_run(r) for r in runs}
        keys = next(iter(by_seed.values())).keys()
        mean = {k: float(np.nanmean([v[k] for v in by_seed.values()])) if _any_number(by_seed, k) else float("nan")
                for k in keys}  # fmt: skip
        summary[arm] = {**mean, "seeds": len(by_seed), "by_seed": by_seed}
    choices = {}

    def clean(v):
        return v["dev_clean"]

    def both(v):
        return v["dev_clean"] + v["dev_corrupted"]

    if "plain" in summary:
        better = [
            a
            for a in ("lead dropout 0.5", "subset terms")
            if a in summary and beats_everywhere(summary, a, "plain", clean)
        ]
        choices["6-lead pre-training"] = max(better, key=lambda a: summary[a]["dev_clean"]) if better else "plain"
    for arm in summary:  # balance: every arm whose x1 twin was measured too
        switches = {**_BASE, **ARMS[arm]}
        if switches["fusion"] != "gate" or switches["balance"] != 1.0:
            continue
        twins = [a for a in summary if a != arm and {**_BASE, **ARMS[a], "balance": 1.0} == switches]
        if twins:
            better = [a for a in twins if beats_everywhere(summary, a, arm, both)]
            choices[f"balance for '{arm}'"] = max(better, key=lambda a: both(summary[a])) if better else arm
    return {"arms": summary, "choices": choices}


def _any_number(by_seed: dict, key: str) -> bool:
    return any(np.isfinite(v[key]) for v in by_seed.values())


def plot(results: dict, path: Path) -> bool:
    """Mean gate weight per expert, clean vs lead II corrupted, one panel per arm of ``FIGURE_ARMS`` (first seed);
    False without matplotlib."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return False
    gated = {a: runs[0] for a, runs in results.items() if runs[0]["switches"]["fusion"] == "gate"}
    shown = [a for a in FIGURE_ARMS if a in gated]
    gated = {a: gated[a] for a in shown} if shown else gated
    if not gated:
        return False
    names = [*CANONICAL_LEADS, "PoE"]
    fig, axes = plt.subplots(len(gated), 1, figsize=(10, 2.6 * len(gated)), sharex=True, squeeze=False)
    for ax, (arm, r) in zip(axes[:, 0], gated.items()):
        series = r["figure"]
        width = 0.8 / len(series)
        pos = np.arange(len(names))
        for i, (label, values) in enumerate(series.items()):
            ax.bar(pos + (i - (len(series) - 1) / 2) * width, values, width=width, label=label)
        ax.set_title(f"pre-trained: {arm} (seed {r['seed']})", fontsize=9)
        ax.set_ylabel("mean weight")
    axes[-1, 0].set_xticks(np.arange(len(names)), names)
    axes[0, 0].legend(fontsize=7, ncol=5)
    fig.suptitle("Gate weight per expert on held-out PTB-XL windows: clean vs lead II corrupted", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(out: Path, results: dict, info: dict, small: bool) -> dict:
    """results.json, results.md and the figure from every measured arm."""
    summary = summarise(results)
    drew = plot(results, out / "gate_weights.png")
    payload = {**info, "summary": summary, "figure": "gate_weights.png" if drew else None, "results": results}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    lines = ["# Training for the deployed setting (benchmarks/lead_quality.py)", ""]
    if small:
        lines += ["**--small run: a few records, one epoch. A test of the script, not a result.**", ""]
    lines += [f"Data: {info['source']}. Pre-training: {info['epochs']} epochs, {info['pretrain_records']} records; "
              f"gate and posterior on {info['test_records']} held-out PTB-XL records (strat_fold 9-10). Real "
              "records, open data: a measurement of the method, not a clinical result.", ""]  # fmt: skip
    lines += ["## Summary (6 limb leads; AUROC = mean over the PTB-XL superclasses)", "",
              "| arm | dev AUROC clean | dev AUROC 1 lead corrupted | test AUROC clean | test AUROC 1 lead corrupted "
              "| test drop | gate: share < 1/3 (12 leads) | (6 leads) | 6L vs 12L shift | centred cosine | seeds |",
              "|" + " --- |" * 11]  # fmt: skip
    for arm, s in summary["arms"].items():
        cells = [arm] + [f"{s[k]:.3f}" for k in ("dev_clean", "dev_corrupted", "test_clean", "test_corrupted",
                                                 "test_drop", "share_below_third_12L", "share_below_third_6L",
                                                 "six_lead_shift", "six_lead_cosine")] + [str(s["seeds"])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Dev AUROC (clean, 6 leads) per seed: " + "; ".join(
        f"{arm}: " + ", ".join(f"{v['dev_clean']:.3f}" for v in s["by_seed"].values())
        for arm, s in summary["arms"].items())]  # fmt: skip
    lines += ["", "Choices (development criterion only; a departure must win at every seed): "
              + (", ".join(f"{k}: **{v}**" for k, v in summary["choices"].items()) or "none"), ""]  # fmt: skip
    lines += ["## Gate response per corruption kind (share of held-out records with the corrupted lead's weight < 1/3 "
              "of its clean weight; median ratio), first seed", "",
              "| arm | leads | " + " | ".join(CORRUPTION_KINDS) + " |",
              "|" + " --- |" * (2 + len(CORRUPTION_KINDS))]  # fmt: skip
    for arm, runs in results.items():
        r = runs[0]
        if r["switches"]["fusion"] != "gate":
            continue
        for leads in ("12L", "6L"):
            g = r[f"gate_{leads}"]
            cells = [f"{g[k]['share_below_third']:.2f} ({g[k]['median_ratio']:.2f})" for k in CORRUPTION_KINDS]
            lines.append(f"| {arm} | {leads} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Test AUROC per task, 6 limb leads [95% subject-bootstrap interval], first seed",
        "",
        "| arm | task | clean | " + " | ".join(CORRUPTION_KINDS) + " |",
        "|" + " --- |" * (3 + len(CORRUPTION_KINDS)),
    ]
    for arm, runs in results.items():
        r = runs[0]
        for task in TASKS:
            cells = []
            for name in ("clean", *CORRUPTION_KINDS):
                row = next((x for x in r["downstream"] if x["task"] == task and x["input"] == name), None)
                cells.append(
                    "-" if row is None else f"{row['test_auroc']:.3f} [{row['test_lo']:.3f}, {row['test_hi']:.3f}]"
                )
            lines.append(f"| {arm} | {task} | " + " | ".join(cells) + " |")
    if drew:
        lines += ["", "![gate weights](gate_weights.png)"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return summary


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
    p.add_argument("--ptbxl", type=Path, default=None, help="PTB-XL root (default <root>/ptbxl)")
    p.add_argument("--out", type=Path, default=Path("outputs/lead_quality"), help="output folder")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of the arms")
    p.add_argument("--epochs", type=int, default=PRESET["epochs"], help="pre-training epochs per arm")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of each interval")
    p.add_argument("--seed", type=int, default=0, help="base seed")
    p.add_argument("--seeds", type=int, default=1, help="seeds per arm (seed, seed + 1, ...)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--small", action="store_true", help="a few records, three arms, one epoch (a test run)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run the measurement; returns the exit code."""
    args = parse_args(argv)
    script_logging()
    torch.set_num_threads(args.threads)
    found = find_ptbxl(args.root, args.ptbxl)
    if found is None:
        return 2
    root, ptbxl = found
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        print(f"unknown arms {unknown}; choose from {list(ARMS)}", file=sys.stderr)
        return 2
    preset = {**PRESET, "epochs": args.epochs}
    n_ptbxl = n_extra = None
    if args.small:
        n_ptbxl, n_extra = 120, 10
        preset["epochs"] = 1
        arms = [a for a in arms if a in SMALL_ARMS]
    fs = preset["fs"]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    records = load_records(root, ptbxl, fs, out, n_ptbxl, n_extra)
    lab_idx = np.flatnonzero(records.labelled)  # the labelled PTB-XL records; the rest are label-free
    lab_table = records.table.reindex(records.ids[lab_idx]).reset_index()
    test = records.test[lab_idx]
    dev = ~test
    X, pre_idx, pre_ds = records.X[lab_idx], records.pre_idx, records.pre_ds
    logger.info(
        "%d pre-training records; %d PTB-XL development, %d test", len(pre_idx), int(dev.sum()), int(test.sum())
    )
    results: dict[str, list] = {}
    seeds = [args.seed + k for k in range(args.seeds)]
    for arm in ARMS:  # every arm measured so far (any seed), in the table's order; the requested ones run if missing
        for seed in seeds:
            if arm in arms and not arm_path(out, arm, seed).is_file():
                logger.info("arm %r, seed %d: pre-training %d epochs", arm, seed, preset["epochs"])
                r = measure_arm(arm, pre_ds, X, lab_table, dev, test, out, preset, seed, args.n_boot)
                logger.info("arm %r, seed %d done in %.0f s", arm, seed, r["total_s"])
        runs = [json.loads(p.read_text()) for p in sorted((out / "arms").glob(f"{arm_slug(arm)}_seed*.json"))]
        if runs:
            results[arm] = sorted(runs, key=lambda r: r["seed"])
    info = {"source": f"PTB-XL ({len(lab_idx)} records) + LUDB/CinC-2021 label-free, {fs:g} Hz x 10 s, "
            f"{preset['window']}-sample windows, latent {preset['latent']}", "epochs": preset["epochs"],
            "pretrain_records": int(len(pre_idx)), "test_records": int(test.sum()), "dev_records": int(dev.sum()),
            "torch": torch.__version__, "small": bool(args.small)}  # fmt: skip
    summary = write_report(out, results, info, args.small)
    print((out / "results.md").read_text())
    if summary["choices"]:
        print(json.dumps(summary["choices"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
