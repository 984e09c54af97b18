"""Compare methods on the same folds: one Table-2-style ``results.md`` and ``results.csv``.

Usage::

    python examples/lsemvae_ph/compare.py --out outputs/compare [--cfg quick.yaml] \
        [--methods lsemvae ablation_no_align mvae resnet1d xresnet1d] [--leads 6L 12L] [KEY VALUE ...]

Each method is a config name from ``configs/`` (``lsemvae`` = the defaults). Every run shares one synthetic cohort
(or the configured data), one cache and therefore the same folds (same labels, subjects and EVAL.SEED). A VAE method
is pre-trained once (on DATASET.PRETRAIN_LEADS) and fine-tuned for every lead setting; supervised baselines train per
setting. Runs are in-process and reuse finished outputs, so an interrupted comparison continues where it stopped.
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

from kale_ext.evaluate.reports import results_row, write_results_table  # noqa: E402

DEFAULT_METHODS = ("lsemvae", "ablation_no_align", "mvae", "resnet1d", "xresnet1d")


def method_cfg_files(method: str) -> list[str]:
    """Config files of a method name (``lsemvae`` is the default configuration)."""
    return [] if method == "lsemvae" else [method]


def run_comparison(
    out_dir: str | Path,
    methods: list[str] | tuple[str, ...] = DEFAULT_METHODS,
    lead_settings: list[str] | tuple[str, ...] = ("6L", "12L"),
    base_cfgs: list[str] | None = None,
    opts: list[str] | None = None,
) -> list[dict]:
    """Run every method in every lead setting on shared data and folds; write results.md and results.csv.

    Returns:
        The result rows (one per method and lead setting).
    """
    out_dir = Path(out_dir)
    shared = [
        "DATASET.CACHE_DIR",
        str(out_dir / "cache"),
        "DATASET.SYNTHETIC.DIR",
        str(out_dir / "data"),
    ]
    rows, synthetic, task, timings = [], True, "", {}
    for method in methods:
        for leads in lead_settings:
            start = time.time()
            run_dir = out_dir / method / leads
            cfg = pipeline.load_cfg(
                [*(base_cfgs or []), *method_cfg_files(method)],
                [
                    *shared,
                    "DATASET.LEADS",
                    leads,
                    "OUTPUT.DIR",
                    str(run_dir),
                    "PRETRAIN.DIR",
                    str(out_dir / method / "pretrain"),
                    *(opts or []),
                ],
            )
            summary = pipeline.run(cfg, "all")
            if summary is None:  # a non-zero DDP rank
                return rows
            layout = RunLayout.from_cfg(cfg)
            rows.append(results_row(layout.method_label, leads, summary))
            synthetic, task = layout.synthetic, layout.task
            timings[f"{method}/{leads}"] = round(time.time() - start, 1)
            print(f"{method} {leads}: AUROC {summary['auroc']['mean']:.3f} ({timings[f'{method}/{leads}']} s)")
    write_results_table(
        rows,
        out_dir / "results.md",
        out_dir / "results.csv",
        title=f"{task}: comparison on shared folds",
        synthetic=synthetic,
    )
    (out_dir / "timings.json").write_text(json.dumps(timings, indent=2), encoding="utf-8")
    return rows


def _is_key(word: str) -> bool:
    """True for a config key such as ``TRAINER.PROGRESS_BAR`` (where the KEY VALUE overrides start)."""
    return bool(re.fullmatch(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+", word))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options in any order; the first config key (``SECTION.KEY``) starts the KEY VALUE overrides."""
    parser = argparse.ArgumentParser(description="Compare methods on shared folds (Table-2-style results).")
    parser.add_argument("--out", default="outputs/compare", help="output folder")
    parser.add_argument("--cfg", action="append", default=[], help="base config(s) applied to every run")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="config names (lsemvae = default)")
    parser.add_argument("--leads", nargs="+", default=["6L", "12L"], help="lead settings")
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
    return args


def main(argv: list[str] | None = None) -> int:
    """Command line of the comparison."""
    args = parse_args(argv)
    start = time.time()
    rows = run_comparison(args.out, args.methods, args.leads, args.cfg, args.opts)
    print(f"{len(rows)} runs in {time.time() - start:.0f} s; wrote {Path(args.out) / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
