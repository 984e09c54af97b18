"""The paper's Table 2 in one command: every method, 12- and 6-lead settings, up to three tasks, and Fig. 2.

Usage::

    python examples/lsemvae_ph/compare.py --cfg quick.yaml [--tasks ph,phenotype,pawp] [--leads 12L 6L] \
        [--methods resnet1d lsemvae ...] [--out outputs/compare] [KEY VALUE ...]

Writes ``table2.md`` / ``table2.csv`` (accuracy, AUROC, MCC as mean ± std over folds; unimodal and multimodal
blocks; pre-training ✓/×; "–" with the reason where a method does not apply) and ``fig2_ablation.png`` (AUROC of
LS-EMVAE, without alignment and without PoE per task and lead setting). Every run of a task shares one cohort, one
cache and one fold assignment. A model is pre-trained once and reused by every task and lead setting. Each cell
(task, method, leads) stores a fingerprint of its configuration and inputs: a rerun skips finished cells whose
fingerprint matches and recomputes the others.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import main as pipeline  # noqa: E402
from layout import RunLayout  # noqa: E402

from kale_ext.evaluate.comparison import ablation_findings, plot_ablation, write_table2  # noqa: E402
from kale_ext.utils.files import file_digest, short_hash  # noqa: E402

# Table-2 methods: name -> (config files, overrides, block). Names double as the table's row labels via the run.
METHODS: dict[str, tuple[list[str], list[str], str]] = {
    "resnet1d": (["resnet1d"], [], "Unimodal"),
    "xresnet1d": (["xresnet1d"], [], "Unimodal"),
    "betavae": (["betavae"], [], "Unimodal"),
    "stmem": (["stmem"], [], "Unimodal"),
    "multimodal_cnn": (["multimodal_cnn"], [], "Multimodal"),
    "mvae": (["mvae"], [], "Multimodal"),
    "mopoe": (["mopoe"], [], "Multimodal"),
    "random_encoder": (["random_encoder"], [], "Multimodal"),
    "lsemvae_concat": (
        [],
        ["FINETUNE.FEATURES", "concat_means", "OUTPUT.METHOD_LABEL", "LS-EMVAE (lead means)"],
        "Multimodal",
    ),  # fmt: skip
    "ablation_no_align": (["ablation_no_align"], [], "Multimodal"),
    "ablation_no_poe": (["ablation_no_poe"], [], "Multimodal"),
    "lsemvae": ([], [], "Multimodal"),
}
# Methods that share another method's pre-training (only the fine-tuning features differ).
SHARED_PRETRAINING = {"lsemvae_concat": "lsemvae"}
ABLATION = ("lsemvae", "ablation_no_align", "ablation_no_poe")
# Compared with the full method in the findings (not drawn): the authors' feature choice on the same model.
FEATURE_VARIANT = "lsemvae_concat"
DEFAULT_TASKS = ("ph",)
# Why a method has no cell in a lead setting (shown as "–" with this note).
NOT_APPLICABLE = {
    ("betavae", "6L"): "one joint 12-channel encoder, no lead-wise experts: not run on lead subsets (as in the paper)",
}


def method_cfg_files(method: str) -> list[str]:
    """Config files of a method name (``lsemvae`` is the default configuration)."""
    return list(METHODS[method][0]) if method in METHODS else ([] if method == "lsemvae" else [method])


def _cell_fingerprint(cfg, run: RunLayout) -> str:
    """Hash of the cell's whole configuration (output paths aside) and its inputs (labels, records)."""
    text = "\n".join(line for line in cfg.dump().splitlines() if "DIR:" not in line)
    return short_hash([text, file_digest(run.labels, run.finetune_cache / "index.csv")])


def run_cell(out_dir: Path, task: str, method: str, leads: str, base_cfgs, opts) -> dict:
    """One (task, method, leads) cell: run the pipeline unless a finished cell has the same fingerprint."""
    files, extra, block = METHODS.get(method, (method_cfg_files(method), [], "Multimodal"))
    run_dir = out_dir / task / method / leads
    shared = ["DATASET.CACHE_DIR", str(out_dir / "cache"), "DATASET.SYNTHETIC.DIR", str(out_dir / "data")]
    pre = out_dir / "pretrain" / SHARED_PRETRAINING.get(method, method)
    overrides = [*shared, "TASK.NAME", task, "DATASET.LEADS", leads, "OUTPUT.DIR", str(run_dir),
                 "PRETRAIN.DIR", str(pre), *extra, *(opts or [])]  # fmt: skip
    cfg = pipeline.load_cfg([*(base_cfgs or []), *files], overrides)
    layout = RunLayout.from_cfg(cfg)
    base = {"task": task, "block": block, "method": layout.method_label, "pretrained": layout.spec.pretrained,
            "leads": leads, "key": method, "synthetic": layout.synthetic}  # fmt: skip
    if (method, leads) in NOT_APPLICABLE:
        return {**base, "note": NOT_APPLICABLE[(method, leads)]}
    cell_file = run_dir / "cell.json"
    if cell_file.exists():
        done = json.loads(cell_file.read_text(encoding="utf-8"))
        if done.get("fingerprint") == _cell_fingerprint(cfg, layout):
            print(f"{task} {method} {leads}: finished, same inputs (reused)")
            return done["row"]
    start = time.time()
    summary = pipeline.run(cfg, "all")
    if summary is None:  # a non-zero DDP rank
        return {}
    row = {**base, "seconds": round(time.time() - start, 1)}
    for metric in ("accuracy", "auroc", "mcc"):
        row[f"{metric}_mean"], row[f"{metric}_std"] = summary[metric]["mean"], summary[metric]["std"]
    headline = summary["headline"]  # the run's headline: pooled out-of-fold AUROC, subject level, with its CI
    row["auroc_pooled"], (row["auroc_ci95_lo"], row["auroc_ci95_hi"]) = headline["value"], headline["ci95"]
    cell_file.write_text(json.dumps({"fingerprint": _cell_fingerprint(cfg, layout), "row": row}, indent=2))
    print(f"{task} {method} {leads}: AUROC {row['auroc_mean']:.3f} +- {row['auroc_std']:.3f} ({row['seconds']} s)")
    return row


def run_comparison(
    out_dir: str | Path,
    methods: list[str] | tuple[str, ...] = tuple(METHODS),
    lead_settings: list[str] | tuple[str, ...] = ("12L", "6L"),
    base_cfgs: list[str] | None = None,
    opts: list[str] | None = None,
    tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS,
) -> list[dict]:
    """Run every method in every lead setting and task on shared data and folds; write table2 and fig2.

    Returns:
        The table's cells (one per task, method and lead setting).
    """
    out_dir = Path(out_dir)
    start = time.time()
    rows = []
    for task in tasks:
        for method in methods:
            for leads in lead_settings:
                row = run_cell(out_dir, task, method, leads, base_cfgs, opts)
                if not row:
                    return rows
                rows.append(row)
    synthetic = any(r["synthetic"] for r in rows)
    labels = {r["key"]: r["method"] for r in rows}
    ablations = [labels[m] for m in ABLATION if m in labels]
    compared = ablations[1:] + ([labels[FEATURE_VARIANT]] if FEATURE_VARIANT in labels else [])
    findings = ablation_findings(rows, ablations[0], compared) if ablations and compared else []
    timing = f"Wall time of this invocation: {time.time() - start:.0f} s (cells reused from an earlier run cost ~0 s)."
    note = (
        "Each line compares a variant with the full LS-EMVAE (fused features) on the same folds; a difference "
        "within the fold std is not evidence either way."
    )
    head = ["## Ablations (Fig. 2) and feature modes", "", note, ""]
    extra = [*head, *findings, "", timing] if findings else [timing]
    write_table2(rows, out_dir / "table2.md", out_dir / "table2.csv",
                 "Table 2: methods on shared folds" + (" (synthetic data)" if synthetic else ""), synthetic,
                 settings=lead_settings, extra_lines=extra)  # fmt: skip
    if len(ablations) > 1:
        title = "Fig. 2: LS-EMVAE ablations" + (" [SYNTHETIC DATA, not clinical]" if synthetic else "")
        plot_ablation(rows, ablations, out_dir / "fig2_ablation.png", title, settings=lead_settings)
    return rows


COMPARE_EPILOG = """\
data:
  Without data keys every cell runs on the generated synthetic cohort (a pipeline check, not a clinical
  result). Point it at data with KEY VALUE overrides applied to every cell, e.g.
    %(prog)s --cfg quick.yaml DATASET.FINETUNE_SOURCE /data/cohort/manifest.csv \\
        DATASET.LABELS_CSV /data/cohort/haemodynamics.csv DATASET.PRETRAIN_SOURCE /data/archive
  Keys and defaults: examples/lsemvae_ph/config.py; record layouts: examples/lsemvae_ph/README.md.

outputs:
  <out>/table2.md, table2.csv (accuracy, AUROC, MCC as fold mean +- std, and each cell's headline: the pooled
  out-of-fold AUROC with its bootstrap 95%% CI), fig2_ablation.png, and one run folder per cell.
"""


def _is_key(word: str) -> bool:
    """True for a config key such as ``TRAINER.PROGRESS_BAR`` (where the KEY VALUE overrides start)."""
    return bool(re.fullmatch(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+", word))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options in any order; the first config key (``SECTION.KEY``) starts the KEY VALUE overrides."""
    parser = argparse.ArgumentParser(
        description="The paper's Table 2 and Fig. 2 on shared folds.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=COMPARE_EPILOG,
    )
    parser.add_argument("--out", default="outputs/compare", help="output folder (default: outputs/compare)")
    parser.add_argument(
        "--cfg",
        action="append",
        default=[],
        help="base config(s) applied to every run, e.g. quick.yaml (default: none)",
    )
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), help=f"methods (default: all of {', '.join(METHODS)})"
    )
    parser.add_argument("--leads", nargs="+", default=["12L", "6L"], help="lead settings (default: 12L 6L)")
    parser.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        help=f"comma list of ph, phenotype, pawp (default: {','.join(DEFAULT_TASKS)})",
    )
    args, rest = parser.parse_known_args(argv)
    opts = []
    for name in ("methods", "leads"):
        words = getattr(args, name)
        cut = next((i for i, w in enumerate(words) if _is_key(w)), len(words))
        setattr(args, name, words[:cut])
        opts += words[cut:]
    unknown = [w for w in rest if w.startswith("--")]
    if unknown:
        parser.error(f"unknown options {unknown}")
    args.opts = opts + rest
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in args.tasks if t not in ("ph", "phenotype", "pawp")]
    if bad:
        parser.error(f"unknown tasks {bad}; use ph, phenotype, pawp")
    return args


def main(argv: list[str] | None = None) -> int:
    """Command line of the comparison."""
    args = parse_args(argv)
    start = time.time()
    rows = run_comparison(args.out, args.methods, args.leads, args.cfg, args.opts, args.tasks)
    print(f"{len(rows)} cells in {time.time() - start:.0f} s; wrote {Path(args.out) / 'table2.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
