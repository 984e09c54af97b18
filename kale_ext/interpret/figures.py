"""Figures for people: a Fig.-3-style attribution plot per subject and bar charts of lead importance.

matplotlib is imported inside each function with the non-interactive Agg backend, so the figures render on a
machine without a display and importing this module costs nothing. Every function writes one PNG and returns its
path.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from kale_ext.interpret.attribution import normalised_attribution
from kale_ext.interpret.waves import WAVES

_CLASS_COLOURS = ("#4c72b0", "#c44e52", "#55a868", "#8172b2", "#ccb974", "#64b5cd")
_WAVE_COLOURS = {"P": "#55a868", "QRS": "#c44e52", "T": "#4c72b0", "other": "#bbbbbb"}


def _pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def wrap_title(text: str, width_inches: float, fontsize: float = 11) -> str:
    """``text`` broken into lines that fit a figure ``width_inches`` wide at ``fontsize`` points (never clipped).

    Args:
        text: the title.
        width_inches: figure width.
        fontsize: title font size in points (a character is about 0.55 of it wide).

    Returns:
        The title with newlines.
    """
    chars = max(20, int(width_inches * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.wrap(text, chars)) if text else text


def _caveat(fig, caveat: str | None) -> None:
    """A warning line under the axes (e.g. the model is no better than chance), in red so it is not missed."""
    if caveat:
        width = fig.get_size_inches()[0]
        fig.text(0.5, -0.02, wrap_title(caveat, width, 9), ha="center", va="top", fontsize=9, color="#b00000")


def _class_label(value, class_names: Mapping | None) -> str:
    """The name of a class value (``class_names`` keyed by the value or its string), the value itself otherwise."""
    if class_names:
        for key in (value, str(value)):
            if key in class_names:
                return str(class_names[key])
        try:
            return str(class_names.get(int(value), value))
        except (TypeError, ValueError):
            pass
    return str(value)


def _save(fig, path: str | Path, dpi: int) -> Path:
    """Write ``fig`` to ``path`` (creating its folder) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_attribution_ecg(
    signals: np.ndarray,
    attributions: np.ndarray,
    lead_names: Sequence[str],
    fs: float,
    path: str | Path,
    title: str = "",
    mask: np.ndarray | None = None,
    threshold: float = 0.5,
    smooth: int = 1,
    ratios: np.ndarray | None = None,
    max_seconds: float | None = None,
    dpi: int = 110,
    amplitude_unit: str = "z-score (per lead)",
    caveat: str | None = None,
) -> Path:
    """Each lead's trace on its own row with its high-attribution segments in red (the paper's Fig. 3 layout).

    A sample is highlighted when its normalised absolute attribution (record-wise, after ``smooth``; the same rule
    as :func:`~kale_ext.interpret.attribution.attribution_ratio`) is at least ``threshold``; behind each trace a
    white-to-red strip shades the whole normalised attribution, so that structure below the threshold stays visible.

    Args:
        signals: (leads, time) the record as the model saw it.
        attributions: (leads, time) signed attributions.
        lead_names: one name per row.
        fs: sampling frequency in Hz (the time axis is in seconds).
        path: PNG to write.
        title: figure title (e.g. subject id, label, predicted probability).
        mask: (leads,) bool, True = present; absent leads are drawn as an empty row marked "absent".
        threshold: highlight threshold on the normalised attribution.
        smooth: moving-average width in samples applied to ``|attr|`` before normalising.
        ratios: (leads,) attribution ratios shown at the right of each row; the largest gets a star. The ratio of
            a lead is the fraction of its samples highlighted in red (normalised attribution >= ``threshold``).
        max_seconds: show only the first ``max_seconds`` of the record.
        dpi: resolution.
        amplitude_unit: unit of the traces, shown on an amplitude scale bar and in the legend line (the pipeline
            z-scores each lead; give ``"mV"`` for raw signals).
        caveat: a warning printed in red under the figure (e.g. the model's AUROC interval includes 0.5).

    Returns:
        The written path.
    """
    plt = _pyplot()
    signals = np.asarray(signals, dtype=np.float64)
    n_leads, n_samples = signals.shape
    mask = np.ones(n_leads, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    norm = normalised_attribution(attributions, mask, normalise="record", smooth=smooth)
    stop = n_samples if max_seconds is None else min(n_samples, int(round(max_seconds * fs)))
    t = np.arange(stop) / fs
    best = int(np.nanargmax(np.where(mask, ratios, np.nan))) if ratios is not None and mask.any() else None
    fig, axes = plt.subplots(n_leads, 1, figsize=(12, 1.15 * n_leads + 1.0), sharex=True, squeeze=False)
    for j, ax in enumerate(axes[:, 0]):
        name = lead_names[j] + (" \u2605" if j == best else "")
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=11, fontweight="bold" if j == best else None)
        ax.set_yticks([])
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
        if not mask[j]:
            ax.text(0.5, 0.5, "absent", transform=ax.transAxes, ha="center", va="center", color="grey")
            continue
        y = signals[j, :stop]
        hot = norm[j, :stop] >= threshold
        ax.plot(t, y, color="black", linewidth=0.7, zorder=2)
        ax.plot(t, np.where(hot, y, np.nan), color="red", linewidth=1.8, zorder=3)
        ymin, ymax = float(np.nanmin(y)), float(np.nanmax(y))
        pad = 0.05 * (ymax - ymin or 1.0)
        # Background heat strip: the whole normalised attribution, so that sub-threshold structure stays visible.
        ax.imshow(
            norm[j : j + 1, :stop],
            aspect="auto",
            cmap="Reds",
            vmin=0.0,
            vmax=1.0,
            alpha=0.45,
            interpolation="nearest",
            extent=(0.0, stop / fs, ymin - pad, ymax + pad),
            zorder=0,
        )
        ax.set_ylim(ymin - pad, ymax + pad)
        if ratios is not None:
            ax.text(1.005, 0.5, f"ratio {ratios[j]:.3f}", transform=ax.transAxes, va="center", fontsize=9)
        ax.set_yticks([round(ymin, 1), round(ymax, 1)])  # amplitude range of the row, in amplitude_unit
        ax.tick_params(axis="y", labelsize=7, length=2)
    axes[-1, 0].set_xlabel("time (s)", fontsize=11)
    axes[-1, 0].set_xlim(0, t[-1] if len(t) else 1)
    fig.suptitle(wrap_title(title or "Integrated-gradient attribution", 12, 12), fontsize=12)
    ratio_note = (
        "; ratio (right): share of the lead's samples in red, the lead's attribution ratio (\u2605 = largest)"
        if ratios is not None
        else ""
    )
    fig.text(
        0.01,
        0.005,
        f"amplitude: {amplitude_unit} (tick labels: each row's range); red trace: normalised |attribution| >= "
        f"{threshold:g}{ratio_note}; background shade: normalised |attribution| from 0 (white) to 1 (red), the "
        "record's maximum over all leads",
        fontsize=7.5,
        color="dimgrey",
        wrap=True,
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _caveat(fig, caveat)
    return _save(fig, path, dpi)


def _bar_groups(
    ax,
    table: pd.DataFrame,
    category: str,
    group: str,
    mean: str,
    std: str | None,
    order: Sequence | None = None,
    names: Mapping | None = None,
    legend_title: str | None = None,
):
    """Grouped bars: one group per ``category`` value, one bar per ``group`` value (named by ``names``), error bars
    from ``std``; the legend sits outside the axes, right of them, so it never covers a bar."""
    categories = (
        list(dict.fromkeys(table[category])) if order is None else [c for c in order if c in set(table[category])]
    )
    groups = list(dict.fromkeys(table[group]))
    width = 0.8 / max(1, len(groups))
    x = np.arange(len(categories))
    for g, name in enumerate(groups):
        sub = table[table[group] == name].set_index(category).reindex(categories)
        err = sub[std].to_numpy() if std is not None else None
        ax.bar(
            x + (g - (len(groups) - 1) / 2) * width,
            sub[mean].to_numpy(),
            width,
            yerr=err,
            capsize=3,
            label=_class_label(name, names),
            color=_CLASS_COLOURS[g % len(_CLASS_COLOURS)],
            edgecolor="black",
            linewidth=0.4,
        )
    ax.set_xticks(x)
    ax.set_xticklabels([str(c) for c in categories], fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    if len(groups) > 1:
        ax.legend(title=legend_title or group, fontsize=9, frameon=False, bbox_to_anchor=(1.01, 1), loc="upper left")


def plot_lead_importance(
    summary: pd.DataFrame,
    path: str | Path,
    value: str = "share",
    title: str = "",
    dpi: int = 110,
    class_names: Mapping | None = None,
    caveat: str | None = None,
) -> Path:
    """Bar chart of each lead's attribution share per class, with error bars across folds.

    Args:
        summary: output of ``summarise_over_folds(table, ["lead", "class"], ["ratio", "share"])``: columns lead,
            class, ``<value>_mean``, ``<value>_std``.
        path: PNG to write.
        value: ``"share"`` (sums to 1 over leads) or ``"ratio"``.
        title: figure title.
        dpi: resolution.
        class_names: legend name of each class value (e.g. ``{0: "no LVH", 1: "LVH"}``); ``all`` stays ``all``.
        caveat: a warning printed in red under the figure.

    Returns:
        The written path.
    """
    plt = _pyplot()
    table = summary.copy()
    table["class"] = table["class"].astype(str)
    width = max(5.0, 0.9 * table["lead"].nunique() + 2)
    fig, ax = plt.subplots(figsize=(width, 3.8))
    _bar_groups(ax, table, "lead", "class", f"{value}_mean", f"{value}_std", names=class_names, legend_title="class")
    ax.set_xlabel("lead", fontsize=11)
    ax.set_ylabel("attribution share" if value == "share" else "attribution ratio", fontsize=11)
    text = title or "Lead importance (integrated gradients; mean \u00b1 std over folds)"
    ax.set_title(wrap_title(text, width), fontsize=11)
    _caveat(fig, caveat)
    return _save(fig, path, dpi)


def plot_lead_ablation(
    summary: pd.DataFrame, path: str | Path, title: str = "", dpi: int = 110, caveat: str | None = None
) -> Path:
    """Bar chart of the AUROC drop when each lead is masked out, with error bars across folds.

    Args:
        summary: output of :func:`~kale_ext.interpret.ablation.summarise_ablation` (lead, drop_mean, drop_std,
            auroc_full_mean).
        path: PNG to write.
        title: figure title.
        dpi: resolution.
        caveat: a warning printed in red under the figure.

    Returns:
        The written path.
    """
    plt = _pyplot()
    table = summary.copy()
    table["run"] = "drop"
    width = max(5.0, 0.9 * len(table) + 2)
    fig, ax = plt.subplots(figsize=(width, 3.8))
    _bar_groups(ax, table, "lead", "run", "drop_mean", "drop_std")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("lead masked out", fontsize=11)
    ax.set_ylabel("AUROC drop", fontsize=11)
    full = table["auroc_full_mean"].iloc[0] if "auroc_full_mean" in table and len(table) else float("nan")
    text = title or f"Lead ablation at inference (AUROC with all leads {full:.3f}; mean \u00b1 std over folds)"
    ax.set_title(wrap_title(text, width), fontsize=11)
    _caveat(fig, caveat)
    return _save(fig, path, dpi)


def plot_gate_weights(
    summary: pd.DataFrame,
    path: str | Path,
    title: str = "",
    dpi: int = 110,
    class_names: Mapping | None = None,
    caveat: str | None = None,
) -> Path:
    """Bar chart of the mean fusion weight per expert (leads and the shared expert) per class.

    Args:
        summary: output of ``summarise_over_folds(table, ["expert", "class", "gate"], ["weight"])``.
        path: PNG to write.
        title: figure title.
        dpi: resolution.
        class_names: legend name of each class value; ``all`` stays ``all``.
        caveat: a warning printed in red under the figure.

    Returns:
        The written path.
    """
    plt = _pyplot()
    table = summary.copy()
    table["class"] = table["class"].astype(str)
    kind = str(table["gate"].iloc[0]) if "gate" in table and len(table) else "unknown"
    width = max(5.0, 0.9 * table["expert"].nunique() + 2)
    fig, ax = plt.subplots(figsize=(width, 3.8))
    _bar_groups(ax, table, "expert", "class", "weight_mean", "weight_std", names=class_names, legend_title="class")
    ax.set_xlabel("expert", fontsize=11)
    ax.set_ylabel("mean fusion weight", fontsize=11)
    text = title or f"Fusion weights per expert ({kind} weights; mean \u00b1 std over folds)"
    ax.set_title(wrap_title(text, width), fontsize=11)
    _caveat(fig, caveat)
    return _save(fig, path, dpi)


def plot_wave_attribution(
    table: pd.DataFrame, path: str | Path, title: str = "", dpi: int = 110, caveat: str | None = None
) -> Path:
    """Stacked bars of each lead's attribution share in the P, QRS, T and other windows.

    Args:
        table: output of :func:`~kale_ext.interpret.waves.wave_attribution_table`.
        path: PNG to write.
        title: figure title.
        dpi: resolution.
        caveat: a warning printed in red under the figure.

    Returns:
        The written path.
    """
    plt = _pyplot()
    width = max(5.0, 0.9 * len(table) + 2.5)
    fig, ax = plt.subplots(figsize=(width, 3.8))
    x = np.arange(len(table))
    bottom = np.zeros(len(table))
    for wave in WAVES:
        values = table[f"share_{wave}"].to_numpy()
        ax.bar(x, values, 0.6, bottom=bottom, label=wave, color=_WAVE_COLOURS[wave], edgecolor="black", linewidth=0.4)
        bottom += values
    ax.set_xticks(x)
    ax.set_xticklabels(table["lead"].tolist(), fontsize=10)
    ax.set_ylim(0, 1)
    ax.set_xlabel("lead", fontsize=11)
    ax.set_ylabel("share of |attribution|", fontsize=11)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(title="window", fontsize=9, frameon=False, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.set_title(
        wrap_title(title or "Attribution by wave window (template windows around R peaks)", width), fontsize=11
    )
    _caveat(fig, caveat)
    return _save(fig, path, dpi)
