"""Writers of the evaluation outputs: ``metrics.json``, ``predictions.csv``, result tables and the ROC figure.

Every writer that can hold synthetic-data results takes an explicit ``synthetic`` flag and says so in
its output, so that a pipeline check on generated data can never be mistaken for a clinical result.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kale_ext.evaluate.metrics import METRIC_NAMES, auroc, binary_metrics, bootstrap_cis, summarise_folds
from kale_ext.utils.files import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

#: Columns every ``predictions.csv`` holds (one row per subject); a record id column is added when known.
PREDICTION_COLUMNS: tuple[str, ...] = ("subject_id", "label", "probability", "fold", "threshold", "prediction")
#: Metrics shown in the Table-2-style results, with their column titles.
TABLE_METRICS: dict[str, str] = {"accuracy": "Accuracy", "auroc": "AUROC", "mcc": "MCC"}
SYNTHETIC_WARNING = "> **Synthetic data: these numbers are pipeline checks on generated ECGs, not clinical results.**"
#: The one AUROC a run reports as its result (console, results.md, metrics.json ``headline``, roc.png legend): the
#: AUROC of all out-of-fold predictions pooled, one row per subject, with a percentile bootstrap 95% CI over subjects.
#: The mean +- std of the per-fold AUROCs is reported beside it under its own name (:data:`FOLD_AUROC_NAME`).
HEADLINE_AUROC_NAME = "pooled out-of-fold AUROC, subject level"
#: Name of the spread figure reported beside the headline.
FOLD_AUROC_NAME = "fold AUROC mean +- std"


def _jsonable(value: Any) -> Any:
    """Plain-Python copy of ``value`` for JSON: numpy scalars/arrays unwrapped, nan/inf written as null."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def summary_with_ci(
    fold_metrics: Sequence[Mapping[str, float]],
    y_true,
    prob,
    threshold: float | Sequence[float] | np.ndarray = 0.5,
    metrics: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: Sequence | np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """Fold mean and std of each metric plus a bootstrap CI on the pooled out-of-fold predictions.

    Args:
        fold_metrics: one ``{metric: value}`` dict per fold (from ``binary_metrics`` on each test fold).
        y_true: pooled out-of-fold labels, shape (N,), one row per subject.
        prob: pooled out-of-fold positive-class probabilities, shape (N,).
        threshold: one number or per-sample thresholds, shape (N,) (each fold's own threshold).
        metrics: metrics to summarise; defaults to those of ``METRIC_NAMES`` present in the folds.
        n_boot: bootstrap resamples.
        seed: bootstrap seed.
        alpha: 1 - confidence level; the key stays ``"ci95"`` as in the output schema, so change it knowingly.
        groups: optional subject id per row when subjects have several rows.

    Returns:
        ``{metric: {"mean": float, "std": float, "ci95": [lo, hi], "pooled": float}}``: ``mean``/``std`` over the
        folds (population std, ddof=0), ``pooled`` the metric of all out-of-fold predictions together (each row at
        its fold's threshold) and ``ci95`` the bootstrap interval around ``pooled``.
    """
    fold_summary = summarise_folds(list(fold_metrics))
    if metrics is None:
        metrics = [m for m in METRIC_NAMES if m in fold_summary]
    missing = [m for m in metrics if m not in fold_summary]
    if missing:
        raise ValueError(f"metrics {missing} are not in the fold metrics; present are {list(fold_summary)}")
    cis = bootstrap_cis(y_true, prob, threshold, list(metrics), n_boot=n_boot, seed=seed, alpha=alpha, groups=groups)
    pooled = binary_metrics(y_true, prob, threshold)
    return {m: {**fold_summary[m], "ci95": [cis[m][0], cis[m][1]], "pooled": pooled.get(m)} for m in metrics}


def headline_auroc(summary: Mapping[str, Mapping[str, Any]], y_true) -> dict[str, Any]:
    """The run's headline AUROC (:data:`HEADLINE_AUROC_NAME`) with its interval, the fold spread and the cohort.

    Args:
        summary: from :func:`summary_with_ci` (its ``auroc`` entry needs ``pooled``, ``ci95``, ``mean``, ``std``).
        y_true: pooled out-of-fold labels, shape (N,), one row per subject.

    Returns:
        ``{"name", "value", "ci95", "fold_mean", "fold_std", "n", "n_positive", "n_negative"}``.
    """
    entry = summary.get("auroc")
    if entry is None or entry.get("pooled") is None:
        raise ValueError("the summary has no pooled AUROC; build it with summary_with_ci on the out-of-fold rows")
    y = np.asarray(y_true).astype(np.int64).ravel()
    return {
        "name": HEADLINE_AUROC_NAME,
        "value": entry["pooled"],
        "ci95": list(entry["ci95"]),
        "fold_mean": entry["mean"],
        "fold_std": entry["std"],
        "n": int(len(y)),
        "n_positive": int(y.sum()),
        "n_negative": int(len(y) - y.sum()),
    }


def format_headline(headline: Mapping[str, Any], digits: int = 3) -> str:
    """One line of the headline AUROC, the same words wherever it is shown (console, results.md, README).

    Example: ``pooled out-of-fold AUROC, subject level 0.726 (95% CI 0.668-0.781; fold AUROC mean +- std
    0.729 +- 0.059; n = 300 subjects, 180 positive / 120 negative)``.
    """
    lo, hi = headline["ci95"]
    ci = "n/a" if lo is None or hi is None else f"{lo:.{digits}f}-{hi:.{digits}f}"
    value = "n/a" if headline["value"] is None else f"{headline['value']:.{digits}f}"
    spread = format_mean_std(headline["fold_mean"], headline["fold_std"], digits)
    return (
        f"{headline['name']} {value} (95% CI {ci}; {FOLD_AUROC_NAME} {spread}; n = {headline['n']} subjects, "
        f"{headline['n_positive']} positive / {headline['n_negative']} negative)"
    )


def write_metrics_json(
    path: str | Path,
    *,
    synthetic: bool,
    task: str,
    method: str,
    leads: Sequence[str],
    folds: Sequence[Mapping[str, float]],
    summary: Mapping[str, Mapping[str, Any]],
    **extra: Any,
) -> Path:
    """Write ``metrics.json`` with the schema the project documents.

    Schema: ``{"synthetic": bool, "task": str, "method": str, "leads": [str, ...], "folds": [{metric: x}, ...],
    "summary": {metric: {"mean": x, "std": x, "ci95": [lo, hi], "pooled": x}}}`` plus any ``extra`` keys (e.g.
    ``note``, ``headline`` from :func:`headline_auroc`). ``mean``/``std`` are over folds; ``pooled`` and ``ci95`` are
    of all out-of-fold predictions together.
    Non-finite numbers are written as ``null`` so the file is strict JSON.

    Args:
        path: output file.
        synthetic: True when the data were generated (the flag travels with every result).
        task: task name, e.g. ``"ph_detection"``.
        method: method name, e.g. ``"lsemvae"``.
        leads: names of the leads used.
        folds: per-fold metrics.
        summary: from :func:`summary_with_ci`.
        **extra: additional top-level keys after the schema keys.

    Returns:
        The path written.
    """
    for name, entry in summary.items():
        absent = {"mean", "std", "ci95"} - set(entry)
        if absent:
            raise ValueError(f"summary[{name!r}] lacks {sorted(absent)}; build the summary with summary_with_ci")
        if len(entry["ci95"]) != 2:
            raise ValueError(f"summary[{name!r}]['ci95'] must be [lo, hi], got {entry['ci95']!r}")
    payload: dict[str, Any] = {
        "synthetic": bool(synthetic),
        "task": str(task),
        "method": str(method),
        "leads": [str(lead) for lead in leads],
        "folds": [dict(f) for f in folds],
        "summary": {
            name: {
                "mean": e["mean"],
                "std": e["std"],
                "ci95": list(e["ci95"]),
                **({"pooled": e["pooled"]} if "pooled" in e else {}),
            }
            for name, e in summary.items()
        },
    }
    payload.update(extra)  # keyword-only schema arguments cannot be repeated in extra
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(_jsonable(payload), indent=2, allow_nan=False) + "\n")
    logger.info("wrote %s", path)
    return path


def predictions_frame(
    subject_ids: Sequence,
    labels,
    probabilities,
    folds,
    thresholds,
    record_ids: Sequence | None = None,
) -> pd.DataFrame:
    """Assemble the out-of-fold predictions table, one row per subject.

    Args:
        subject_ids: subject id per row, shape (N,).
        labels: binary labels, shape (N,).
        probabilities: out-of-fold positive-class probabilities, shape (N,).
        folds: the test fold of each row, shape (N,).
        thresholds: threshold applied to each row (its fold's), one number or shape (N,).
        record_ids: optional record id(s) per row; several records of one subject may be joined with ``;``.

    Returns:
        DataFrame with the columns of :data:`PREDICTION_COLUMNS` (``record_id`` after ``subject_id`` when
        given); ``prediction = int(probability >= threshold)``.
    """
    prob = np.asarray(probabilities, dtype=np.float64)
    thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), prob.shape)
    data = {"subject_id": list(subject_ids)}
    if record_ids is not None:
        data["record_id"] = list(record_ids)
    data.update(
        {
            "label": np.asarray(labels).astype(np.int64),
            "probability": prob,
            "fold": np.asarray(folds).astype(np.int64),
            "threshold": thr,
            "prediction": (prob >= thr).astype(np.int64),
        }
    )
    return pd.DataFrame(data)


def write_predictions_csv(path: str | Path, df: pd.DataFrame) -> Path:
    """Write ``predictions.csv`` after checking it holds one row per subject and the required columns.

    Args:
        path: output file.
        df: table with the columns of :data:`PREDICTION_COLUMNS` and optionally ``record_id``/``record_ids``
            (see :func:`predictions_frame`); other columns are kept after them.

    Returns:
        The path written.
    """
    missing = [c for c in PREDICTION_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"predictions table lacks columns {missing}; build it with predictions_frame")
    duplicated = df["subject_id"][df["subject_id"].duplicated()].unique().tolist()
    if duplicated:
        raise ValueError(
            f"subjects {duplicated[:5]} appear in several rows; aggregate record-level probabilities per subject "
            "(e.g. their mean) before writing"
        )
    record_cols = [c for c in ("record_id", "record_ids") if c in df.columns]
    first = ["subject_id", *record_cols, *PREDICTION_COLUMNS[1:]]
    ordered = df[first + [c for c in df.columns if c not in first]]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: ordered.to_csv(tmp, index=False))
    logger.info("wrote %s (%d subjects)", path, len(ordered))
    return path


def _lead_setting(leads: str | Sequence[str]) -> str:
    if isinstance(leads, str):
        return leads
    return f"{len(leads)}L"


def results_row(method: str, leads: str | Sequence[str], summary: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One row of the comparison table from a metrics summary.

    Args:
        method: method name shown in the table.
        leads: lead setting label (``"6L"``) or the lead names (labelled by their count, e.g. ``"12L"``).
        summary: ``{metric: {"mean", "std", "ci95"?}}`` from :func:`summary_with_ci` or a metrics.json.

    Returns:
        ``{"method", "leads", "<metric>_mean", "<metric>_std", "<metric>_ci95_lo", "<metric>_ci95_hi", ...}``
        for every metric in the summary (CI entries only when present).
    """
    row: dict[str, Any] = {"method": str(method), "leads": _lead_setting(leads)}
    for name, entry in summary.items():
        row[f"{name}_mean"] = entry.get("mean")
        row[f"{name}_std"] = entry.get("std")
        if entry.get("pooled") is not None:
            row[f"{name}_pooled"] = entry["pooled"]
        if entry.get("ci95") is not None:
            row[f"{name}_ci95_lo"], row[f"{name}_ci95_hi"] = entry["ci95"]
    return row


def format_mean_std(mean: Any, std: Any, digits: int = 3, sep: str = "+-") -> str:
    """``"mean <sep> std"`` with ``digits`` decimals; ``"n/a"`` for a missing mean, the mean alone without a std."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    text = f"{float(mean):.{digits}f}"
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += f" {sep} {float(std):.{digits}f}"
    return text


def write_results_table(
    rows: Sequence[Mapping[str, Any]],
    md_path: str | Path,
    csv_path: str | Path,
    title: str,
    synthetic: bool,
    digits: int = 3,
    extra_lines: Sequence[str] = (),
) -> tuple[Path, Path]:
    """Write a Table-2-style Markdown comparison and its CSV.

    Markdown: one row per method (order of first appearance), and for each lead setting (order of first
    appearance) the columns Accuracy, AUROC and MCC as ``"mean +- std"``; ``n/a`` where a method was not
    run in a setting. When ``synthetic`` the file starts with a line saying these are synthetic pipeline
    checks, not clinical results. The CSV holds every row of ``rows`` as given, plus a ``synthetic`` column.

    Args:
        rows: dicts from :func:`results_row`.
        md_path: Markdown output.
        csv_path: CSV output.
        title: table title (a Markdown heading).
        synthetic: whether the results come from generated data.
        digits: decimals shown in the Markdown.
        extra_lines: Markdown lines written between the title and the table (e.g. the headline AUROC, n and
            class balance of a single run).

    Returns:
        ``(md_path, csv_path)``.
    """
    if not rows:
        raise ValueError("no result rows to write; run at least one configuration first")
    methods: list[str] = []
    settings: list[str] = []
    cells: dict[tuple[str, str], Mapping[str, Any]] = {}
    for row in rows:
        method, setting = str(row["method"]), str(row["leads"])
        if method not in methods:
            methods.append(method)
        if setting not in settings:
            settings.append(setting)
        if (method, setting) in cells:
            logger.warning("results for %s %s given twice; the last one is shown", method, setting)
        cells[(method, setting)] = row

    lines = []
    if synthetic:
        lines += [SYNTHETIC_WARNING, ""]
    lines += [f"## {title}", ""]
    if extra_lines:
        lines += [*extra_lines, ""]
    header = ["Method"] + [f"{s} {label}" for s in settings for label in TABLE_METRICS.values()]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |")
    for method in methods:
        values = [method]
        for setting in settings:
            row = cells.get((method, setting), {})
            for metric in TABLE_METRICS:
                values.append(format_mean_std(row.get(f"{metric}_mean"), row.get(f"{metric}_std"), digits))
        lines.append("| " + " | ".join(values) + " |")
    lines += ["", "Table values are mean +- std (population, ddof=0) over cross-validation folds."]

    md_path, csv_path = Path(md_path), Path(csv_path)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(md_path, "\n".join(lines) + "\n")
    table = pd.DataFrame([dict(r) for r in rows])
    table.insert(0, "synthetic", bool(synthetic))
    atomic_write(csv_path, lambda tmp: table.to_csv(tmp, index=False))
    logger.info("wrote %s and %s (%d rows)", md_path, csv_path, len(rows))
    return md_path, csv_path


def plot_roc(
    y_true, prob, folds, path: str | Path, title: str = "ROC curve", ci95: Sequence[float] | None = None
) -> Path:
    """Save a PNG of the per-fold ROC curves and the pooled out-of-fold curve, AUROC in the legend.

    Matplotlib is imported here and drawn through its Agg canvas, so no display and no global backend
    switch is needed.

    Args:
        y_true: binary labels, shape (N,).
        prob: out-of-fold positive-class probabilities, shape (N,).
        folds: test fold per sample, shape (N,); folds holding one class are drawn without a curve.
        path: output PNG.
        title: figure title.
        ci95: bootstrap interval of the pooled AUROC, shown in its legend entry (the run's headline,
            :data:`HEADLINE_AUROC_NAME`).

    Returns:
        The path written. The PNG's ``Title`` and ``Description`` text chunks hold the title and the legend entries
        (one per line), so a check can compare them with the other outputs without reading pixels.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(prob, dtype=np.float64).ravel()
    f = np.asarray(folds).ravel()
    if not (len(y) == len(p) == len(f)):
        raise ValueError(f"y_true, prob and folds must have equal lengths, got {len(y)}, {len(p)}, {len(f)}")

    fig = Figure(figsize=(5.0, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    for k in np.unique(f):
        sel = f == k
        if 0 < y[sel].sum() < sel.sum():
            fpr, tpr, _ = roc_curve(y[sel], p[sel])
            ax.plot(fpr, tpr, linewidth=1, alpha=0.6, label=f"fold {k} (AUROC {auroc(y[sel], p[sel]):.3f})")
        else:
            logger.warning("fold %s holds one class; its ROC curve is not drawn", k)
    if 0 < y.sum() < len(y):
        fpr, tpr, _ = roc_curve(y, p)
        ci = f", 95% CI {ci95[0]:.3f}-{ci95[1]:.3f}" if ci95 is not None and None not in ci95 else ""
        label = f"{HEADLINE_AUROC_NAME}: {auroc(y, p):.3f}{ci}"
        ax.plot(fpr, tpr, color="black", linewidth=2.5, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title(title)
    ax.set_aspect("equal")
    legend = ax.legend(loc="lower right", fontsize="x-small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = "\n".join(text.get_text() for text in legend.get_texts())
    fig.savefig(path, format="png", metadata={"Title": title, "Description": entries})
    logger.info("wrote %s", path)
    return path
