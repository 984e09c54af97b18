"""The training-curve figure of a run: pre-training loss terms and gate weights per epoch, fine-tuning loss per fold.

Reads what training already writes (Lightning's CSV logs and the gate diagnostics table) and draws one PNG, so a
reader can see whether pre-training converged, whether the gate moved away from uniform weights and whether the
fold heads kept learning, without opening TensorBoard.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)


def _epoch_table(csv_paths: list[Path]) -> pd.DataFrame | None:
    """Per-epoch means of every logged column of Lightning CSV logs (later versions = resumed runs appended)."""
    frames = [pd.read_csv(p) for p in csv_paths if p.is_file() and p.stat().st_size > 0]
    frames = [f for f in frames if "epoch" in f.columns and len(f)]
    if not frames:
        return None
    table = pd.concat(frames, ignore_index=True)
    columns = [c for c in table.columns if c not in ("epoch", "step") and not c.endswith("_step")]
    numeric = table[["epoch", *columns]].apply(pd.to_numeric, errors="coerce")
    return numeric.groupby("epoch").mean().sort_index()


def _versions(folder: Path) -> list[Path]:
    """``metrics.csv`` of each Lightning CSV-logger version in ``folder``, oldest first."""

    def number(path: Path) -> int:
        digits = "".join(ch for ch in path.parent.name if ch.isdigit())
        return int(digits) if digits else 0

    return sorted(folder.glob("*/metrics.csv"), key=number)


def read_training_logs(pretrain_dir: str | Path | None, finetune_dir: str | Path | None) -> dict:
    """Collect the per-epoch training logs of a run.

    Args:
        pretrain_dir: folder of the pre-training (``logs/csv/version_*/metrics.csv``, ``gate_diagnostics.csv``);
            None or missing = no pre-training curves.
        finetune_dir: folder of the fine-tuning (``logs/csv/fold<k>/metrics.csv``); None or missing = none.

    Returns:
        ``{"pretrain": DataFrame | None (index epoch, one column per logged metric), "gates": DataFrame | None
        (index epoch, one column per expert), "finetune": {fold name: DataFrame (index epoch)}}``.
    """
    out: dict = {"pretrain": None, "gates": None, "finetune": {}}
    if pretrain_dir is not None and Path(pretrain_dir).is_dir():
        pre = Path(pretrain_dir)
        out["pretrain"] = _epoch_table(_versions(pre / "logs" / "csv"))
        gates = pre / "gate_diagnostics.csv"
        if gates.is_file():
            table = pd.read_csv(gates)
            if {"epoch", "expert", "mean_weight"} <= set(table.columns) and len(table):
                wide = table.pivot_table(index="epoch", columns="expert", values="mean_weight", aggfunc="last")
                out["gates"] = wide.reindex(columns=list(dict.fromkeys(table["expert"])))
    if finetune_dir is not None and Path(finetune_dir).is_dir():
        for path in sorted((Path(finetune_dir) / "logs" / "csv").glob("*/metrics.csv")):
            table = _epoch_table([path])
            if table is not None:
                out["finetune"][path.parent.name] = table
    return out


def plot_training_curves(logs: Mapping, path: str | Path, title: str = "Training curves", dpi: int = 110) -> Path:
    """One PNG: each pre-training loss term per epoch (train solid, validation dashed), the gate weight of each
    expert per epoch, and the fine-tuning loss per fold per epoch. Panels without data say so.

    Args:
        logs: from :func:`read_training_logs`.
        path: PNG to write.
        title: figure title (name the endpoint and the method).
        dpi: resolution.

    Returns:
        The path written; the PNG's ``Description`` text chunk lists the panels drawn, one per line.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    pre = logs.get("pretrain")
    terms = []
    if pre is not None:
        names = [c.split("/", 1)[1] for c in pre.columns if c.startswith(("train/", "val/"))]
        terms = list(dict.fromkeys(n for n in names if pre.get(f"train/{n}", pd.Series(dtype=float)).notna().any()))
        terms = sorted(terms, key=lambda n: (n != "loss", n))  # the total first
    n_top = max(len(terms), 2)
    fig = Figure(figsize=(max(10.0, 2.6 * n_top), 7.0), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subfigures(2, 1)
    top_axes = top.subplots(1, max(len(terms), 1), squeeze=False)[0]
    gate_ax, fold_ax = bottom.subplots(1, 2, width_ratios=(1.4, 1.0))
    panels = []
    for ax, term in zip(top_axes, terms):
        for split, style in (("train", "-"), ("val", "--")):
            column = f"{split}/{term}"
            if column in pre and pre[column].notna().any():
                series = pre[column].dropna()
                ax.plot(series.index + 1, series.to_numpy(), style, marker="o", markersize=3, label=split)
        values = pre[[c for c in (f"train/{term}", f"val/{term}") if c in pre]].to_numpy(dtype=float)
        positive = values[np.isfinite(values)]
        if len(positive) and (positive > 0).all() and positive.max() / positive.min() > 50:
            ax.set_yscale("log")
        ax.set_title(f"pre-training: {term}", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, frameon=False)
        panels.append(f"pre-training {term} per epoch")
    if not terms:
        ax = top_axes[0]
        ax.text(0.5, 0.5, "no pre-training logs (a model trained end to end, or none found)", ha="center")
        ax.set_axis_off()
    ax = gate_ax
    gates = logs.get("gates")
    if gates is not None and len(gates):
        import matplotlib

        colours = matplotlib.colormaps["tab20"]
        for k, expert in enumerate(gates.columns):
            shared = "shared" in str(expert).lower()  # the shared (PoE) expert stands out
            ax.plot(gates.index + 1, gates[expert].to_numpy(), marker="o", markersize=3, label=expert,
                    linewidth=2.5 if shared else 1, color="black" if shared else colours(k % 20))  # fmt: skip
        uniform = 1.0 / max(gates.shape[1], 1)
        ax.axhline(uniform, color="grey", linestyle=":", linewidth=1, label=f"uniform (1/{gates.shape[1]})")
        ax.set_title("pre-training: mean gate weight per expert", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("weight", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, ncol=2, frameon=False, bbox_to_anchor=(1.0, 1.0), loc="upper left")
        panels.append("gate weights per epoch")
    else:
        ax.text(0.5, 0.5, "no gate weights (model without a gate)", ha="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax = fold_ax
    finetune = logs.get("finetune") or {}
    drawn = False
    for fold, table in finetune.items():
        column = "train/loss" if "train/loss" in table else next((c for c in table if c.endswith("loss")), None)
        if column is not None and table[column].notna().any():
            series = table[column].dropna()
            ax.plot(series.index + 1, series.to_numpy(), marker="o", markersize=3, linewidth=1, label=fold)
            drawn = True
    if drawn:
        ax.set_title("fine-tuning: training loss per fold", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, frameon=False)
        panels.append("fine-tuning loss per fold")
    else:
        ax.text(0.5, 0.5, "no fine-tuning logs", ha="center", transform=ax.transAxes)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Title": title, "Description": "\n".join(panels)})
    logger.info("wrote %s", path)
    return path
