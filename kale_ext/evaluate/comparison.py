"""A method comparison in the layout of the paper's Table 2, its ablation findings and the Fig.-2 ablation figure.

Rows are plain dicts, one per (task, method, lead setting) cell:
``{"task", "block", "method", "pretrained", "leads", "accuracy_mean", "accuracy_std", "auroc_mean", ...}``, or with
``"note"`` instead of metrics for a cell that does not apply (shown as "–" with the reason as a footnote).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from kale_ext.evaluate.reports import format_mean_std

METRICS = {"accuracy": "Acc", "auroc": "AUROC", "mcc": "MCC"}
SYNTHETIC_BANNER = (
    "> **SYNTHETIC DATA**: every number below comes from the embedded synthetic cohort. It checks that the pipeline "
    "runs and compares methods on generated signals; it is not a clinical result."
)


def _cell(row: Mapping[str, Any] | None, metric: str, digits: int) -> str:
    if row is None:
        return ""
    if row.get("note"):
        return "–"
    return format_mean_std(row.get(f"{metric}_mean"), row.get(f"{metric}_std"), digits, sep="±")


def _pooled_cell(row: Mapping[str, Any] | None, digits: int) -> str:
    """``"0.726 [0.668, 0.781]"`` from a cell's pooled AUROC and CI; ``–`` where the method did not run."""
    if row is None or row.get("auroc_pooled") is None:
        return "–"
    text = f"{row['auroc_pooled']:.{digits}f}"
    lo, hi = row.get("auroc_ci95_lo"), row.get("auroc_ci95_hi")
    return text + (f" [{lo:.{digits}f}, {hi:.{digits}f}]" if lo is not None and hi is not None else "")


def table2_markdown(
    rows: Sequence[Mapping[str, Any]],
    task: str,
    settings: Sequence[str] = ("12L", "6L"),
    blocks: Sequence[str] = ("Unimodal", "Multimodal"),
    digits: int = 3,
) -> list[str]:
    """Markdown lines of one task's table: blocks of methods, pre-training ✓/×, then Acc/AUROC/MCC per setting.

    Args:
        rows: cells of every task (those of ``task`` are used), in the order methods should appear.
        task: the task shown.
        settings: lead settings, left to right.
        blocks: row blocks, top to bottom (a row's ``block``).
        digits: decimals.

    Returns:
        list of lines (heading, table, footnotes for cells that do not apply).
    """
    rows = [r for r in rows if r["task"] == task]
    cells = {(r["method"], r["leads"]): r for r in rows}
    pooled = any(r.get("auroc_pooled") is not None for r in rows)  # the runs' headline AUROC, when the cells carry it
    extra = ["pooled AUROC [95% CI]"] if pooled else []
    header = ["Method", "Pre-training"] + [f"{s} {m}" for s in settings for m in [*METRICS.values(), *extra]]
    lines = [f"### {task}", "", "| " + " | ".join(header) + " |", "| --- | :---: |" + " ---: |" * (len(header) - 2)]
    notes = []
    for block in blocks:
        methods = list(dict.fromkeys(r["method"] for r in rows if r["block"] == block))
        if not methods:
            continue
        lines.append(f"| *{block}* |" + " |" * (len(header) - 1))
        for method in methods:
            first = next(r for r in rows if r["method"] == method)
            values = [method, "✓" if first["pretrained"] else "×"]
            for setting in settings:
                row = cells.get((method, setting))
                values += [_cell(row, metric, digits) for metric in METRICS]
                if pooled:
                    values.append(_pooled_cell(row, digits))
                if row is not None and row.get("note"):
                    notes.append(f"- {method}, {setting}: – = {row['note']}")
            lines.append("| " + " | ".join(values) + " |")
    lines += ["", "Acc, AUROC, MCC: mean ± std (population) over the cross-validation folds, on shared folds."]
    if pooled:
        lines.append(
            "pooled AUROC: the runs' headline, the pooled out-of-fold AUROC at subject level with its bootstrap 95% CI."
        )
    return lines + ([""] + notes if notes else [])


def ablation_findings(
    rows: Sequence[Mapping[str, Any]], full: str, ablations: Sequence[str], metric: str = "auroc"
) -> list[str]:
    """One line per (task, setting, ablation): the difference to the full method and whether it exceeds the std.

    A difference counts as exceeding the fold spread when ``|Δmean|`` is larger than the larger of the two methods'
    fold standard deviations; this is a descriptive yardstick, not a significance test.

    Args:
        rows: comparison cells.
        full: the full method's name.
        ablations: the ablated methods' names.
        metric: compared metric.

    Returns:
        list of Markdown bullet lines.
    """
    cells = {(r["task"], r["method"], r["leads"]): r for r in rows if not r.get("note")}
    out = []
    for task, method, leads in sorted(k for k in cells if k[1] == full):
        base = cells[(task, method, leads)]
        for ablation in ablations:
            other = cells.get((task, ablation, leads))
            if other is None:
                continue
            delta = other[f"{metric}_mean"] - base[f"{metric}_mean"]
            spread = max(base[f"{metric}_std"], other[f"{metric}_std"])
            verdict = "exceeds" if abs(delta) > spread else "does not exceed"
            out.append(
                f"- {task}, {leads}: {ablation} {metric.upper()} {other[f'{metric}_mean']:.3f} vs {full} "
                f"{base[f'{metric}_mean']:.3f} (Δ {delta:+.3f}); the difference {verdict} the fold std ({spread:.3f})"
            )
    return out


def write_table2(
    rows: Sequence[Mapping[str, Any]],
    md_path: str | Path,
    csv_path: str | Path,
    title: str,
    synthetic: bool,
    settings: Sequence[str] = ("12L", "6L"),
    extra_lines: Sequence[str] = (),
) -> tuple[Path, Path]:
    """Write every task's table (Markdown) and all cells (CSV, with a ``synthetic`` column).

    Args:
        rows: comparison cells.
        md_path: Markdown output.
        csv_path: CSV output.
        title: document title.
        synthetic: whether the data are generated (a banner says so).
        settings: lead settings, left to right.
        extra_lines: Markdown appended at the end (e.g. ablation findings, timings).

    Returns:
        ``(md_path, csv_path)``.
    """
    if not rows:
        raise ValueError("no comparison cells to write; run at least one method first")
    lines = [f"# {title}", ""] + ([SYNTHETIC_BANNER, ""] if synthetic else [])
    for task in dict.fromkeys(r["task"] for r in rows):
        lines += table2_markdown(rows, task, settings) + [""]
    lines += list(extra_lines)
    md_path, csv_path = Path(md_path), Path(csv_path)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    frame = pd.DataFrame(list(rows))
    frame["synthetic"] = synthetic
    frame.to_csv(csv_path, index=False)
    return md_path, csv_path


def plot_ablation(
    rows: Sequence[Mapping[str, Any]],
    methods: Sequence[str],
    path: str | Path,
    title: str,
    metric: str = "auroc",
    settings: Sequence[str] = ("12L", "6L"),
) -> Path:
    """Fig.-2-style grouped bars: ``metric`` (mean ± fold std) of ``methods`` per task and lead setting.

    Args:
        rows: comparison cells.
        methods: the full method and its ablations, in bar order.
        path: PNG output.
        title: figure title (say "synthetic" in it when the data are).
        metric: plotted metric.
        settings: lead settings.

    Returns:
        The PNG path.
    """
    import matplotlib  # optional dependency, imported where used

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = {(r["task"], r["method"], r["leads"]): r for r in rows if not r.get("note")}
    groups = [(t, s) for t in dict.fromkeys(r["task"] for r in rows) for s in settings]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups)), 4.0))
    width = 0.8 / max(len(methods), 1)
    for k, method in enumerate(methods):
        xs, ys, es = [], [], []
        for g, (task, setting) in enumerate(groups):
            row = cells.get((task, method, setting))
            if row is not None:
                xs.append(g + (k - (len(methods) - 1) / 2) * width)
                ys.append(row[f"{metric}_mean"])
                es.append(row[f"{metric}_std"])
        ax.bar(xs, ys, width, yerr=es, capsize=3, label=method)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{t}\n{s}" for t, s in groups])
    ax.set_ylabel(f"{metric.upper()} (mean ± fold std)")
    ax.set_ylim(0.0, 1.05)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
