"""LS-EMVAE for pulmonary hypertension: prepare, pre-train, fine-tune, evaluate, predict, interpret.

Usage::

    python examples/lsemvae_ph/main.py --cfg 6L.yaml [--cfg quick.yaml] [--stage all] [KEY VALUE ...]

``--cfg`` takes a YAML path or a bare name looked up in ``configs/``; it may be repeated (later files override
earlier ones); trailing ``KEY VALUE`` pairs override both. Stages: ``prepare`` (synthetic cohort when no data are
configured, caches, labels), ``pretrain`` (self-supervised, Lightning), ``finetune`` (head on frozen encoders or
end-to-end baselines, K-fold), ``evaluate`` (metrics.json, predictions.csv, results.md, roc.png), ``predict`` (score
new WFDB records), ``interpret`` (attribution, gates, lead ablation) and ``all`` (prepare, pretrain, finetune,
evaluate, plus interpret when INTERPRET.ENABLED). Each stage reuses the finished outputs of earlier ones.
The stages are in ``stages.py``, the paths of a run in ``layout.py``, the configuration in ``config.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parents[1]):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import stages  # noqa: E402
from config import STAGES, get_cfg_defaults, load_cfg  # noqa: E402, F401 - get_cfg_defaults re-exported for callers
from layout import SYNTHETIC_NOTE, RunLayout  # noqa: E402
from yacs.config import CfgNode  # noqa: E402

from kale_ext.evaluate.reports import format_headline  # noqa: E402
from kale_ext.utils.console import TqdmLoggingHandler, quiet_lightning  # noqa: E402
from kale_ext.utils.distributed import global_rank  # noqa: E402
from kale_ext.utils.files import file_lock  # noqa: E402

logger = logging.getLogger("lsemvae_ph")
PIPELINE_STAGES = ("prepare", "pretrain", "finetune", "evaluate")
LOCK_FILE = ".run.lock"


class Interrupted(BaseException):
    """A termination signal (SIGTERM from a scheduler, SIGHUP) arrived: the run stops and exits 128 + signal.

    A ``BaseException`` so that no ``except Exception`` on the way (Lightning's included) mistakes it for an error
    to recover from; unlike Lightning's own ``SIGTERMException`` (a ``SystemExit``) it never ends with status 0.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def _raise_interrupted(signum, _frame) -> None:
    raise Interrupted(signum)


def check_ready(layout: RunLayout, stage: str) -> None:
    """Refuse a single stage whose inputs from earlier stages are missing, naming the stage to run first."""
    from kale_ext.pipeline import artifacts

    def need(missing: list[Path], earlier: str) -> None:
        if missing:
            raise FileNotFoundError(
                f"--stage {stage} needs the outputs of --stage {earlier} ({', '.join(map(str, missing))} missing); "
                f"run --stage {earlier} first with this config (or --stage all)"
            )

    if stage in ("pretrain", "finetune"):
        caches = [layout.finetune_cache]
        if stage == "pretrain" and layout.spec.pretrained and not artifacts.is_pretrained(layout.pretrain_dir):
            caches = [layout.pretrain_cache]
        need([c / "spec.json" for c in caches if not (c / "spec.json").is_file()], "prepare")
        if stage == "finetune":
            need([] if layout.labels.is_file() else [layout.labels], "prepare")
            if not layout.spec.end_to_end:
                need([] if artifacts.is_pretrained(layout.pretrain_dir) else [layout.pretrain_dir / "DONE"], "pretrain")
    elif stage in ("evaluate", "predict"):
        done = layout.finetune_dir / "DONE"
        need([p for p in (done, layout.folds) if not p.is_file()], "finetune")


HELP_EPILOG = """\
configuration overrides:
  Words after the options are KEY VALUE pairs that override the config files, e.g.
    %(prog)s --cfg 6L.yaml --cfg quick.yaml PRETRAIN.EPOCHS 5 OUTPUT.DIR outputs/try TASK.LABEL LVH
  Every key, its default and a comment saying what it does are in examples/lsemvae_ph/config.py; the
  config files (6L.yaml, 12L.yaml, quick.yaml, tasks, ablations, baselines) are in configs/.

data:
  With DATASET.FINETUNE_SOURCE empty the run uses a generated synthetic cohort (a pipeline check, not a
  clinical result). Real data: DATASET.FINETUNE_SOURCE <records>, DATASET.LABELS_CSV <labels.csv>,
  optionally DATASET.PRETRAIN_SOURCE <archive>; layouts in examples/lsemvae_ph/README.md.
"""


def setup_logging(run: RunLayout) -> None:
    """Log to the console and to <OUTPUT.DIR>/run.log; the first line says whether the data are synthetic."""
    run.out.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_lsemvae", False)]:
        root.removeHandler(handler)  # a new run (e.g. in a comparison) logs to its own run.log
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    for handler in (TqdmLoggingHandler(), logging.FileHandler(run.out / "run.log")):
        handler.setFormatter(fmt)
        handler._lsemvae = True
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    quiet_lightning()  # Lightning's hardware note once per process, no tips
    # Lightning's advice for tiny epochs; the few-steps warning of the stages says what matters in the run's numbers
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    d = run.cfg.DATASET
    src = f"data: fine-tuning {d.FINETUNE_SOURCE}, labels {d.LABELS_CSV}, pre-training {d.PRETRAIN_SOURCE or '='}"
    logger.info(SYNTHETIC_NOTE if run.synthetic else src)
    env = stages.environment()
    logger.info("kale_ext %s, torch %s, %d CPU threads, device %s (CPU results repeat bit for bit at the same "
                "thread count; set OMP_NUM_THREADS to fix it)", env["code"], env["torch"], env["cpu_threads"],
                env["device"])  # fmt: skip


def run(cfg: CfgNode, stage: str = "all") -> dict | None:
    """Run one stage, or all of them, for a validated config. Returns the metrics summary after evaluation."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not accepted; use one of: {', '.join(STAGES)}")
    layout = RunLayout.from_cfg(cfg)
    for folder in (layout.out, *layout.out.parents):
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"OUTPUT.DIR {layout.out}: {folder} is a file, not a folder; give OUTPUT.DIR a "
                                     "folder path (it is created when missing)")  # fmt: skip
    if global_rank() != 0:  # DDP ranks > 0 run inside the job that rank 0 holds the lock for
        return _run_stages(layout, stage)
    layout.out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        try:  # one run per output folder: a second one would overwrite the first's outputs
            stack.enter_context(file_lock(layout.out / LOCK_FILE, timeout_s=0))
        except TimeoutError:
            holder = (layout.out / LOCK_FILE).read_text(encoding="utf-8").strip() or "unknown"
            raise RuntimeError(f"OUTPUT.DIR {layout.out} is in use by another run (pid {holder}); wait for it to "
                               "finish or give this run another OUTPUT.DIR") from None  # fmt: skip
        return _run_stages(layout, stage)


def _run_stages(layout: RunLayout, stage: str) -> dict | None:
    cfg = layout.cfg
    if stage not in ("all", "prepare", "interpret"):
        check_ready(layout, stage)
    setup_logging(layout)
    if global_rank() == 0:
        if stage in ("all", "finetune", "evaluate"):  # the stages that rewrite the root outputs
            stages.retire_stale_outputs(layout)
        (layout.out / "config.yaml").write_text(cfg.dump(), encoding="utf-8")
    names = list(PIPELINE_STAGES) if stage == "all" else [stage]
    if stage == "all" and cfg.INTERPRET.ENABLED:
        names.append("interpret")
    summary = None
    for name in names:
        start = time.time()
        logger.info("stage %s", name)
        if name == "pretrain":
            if not stages.stage_pretrain(layout):
                return None  # a non-zero DDP rank: its work ends with pre-training
        elif name == "evaluate":
            summary = stages.stage_evaluate(layout)
        elif name == "interpret":
            from interpret_stage import run_interpret  # optional packages (captum, matplotlib)

            run_interpret(cfg)
        else:
            getattr(stages, f"stage_{name}")(layout)
        logger.info("stage %s done in %.1f s", name, time.time() - start)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line: --cfg (repeatable) and --stage anywhere, the other words are KEY VALUE overrides."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s [--cfg CFG ...] [--stage STAGE] [KEY VALUE ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=HELP_EPILOG,
    )
    parser.add_argument(
        "--cfg", action="append", default=[], help="config path or name in configs/ (repeatable; later files win)"
    )
    parser.add_argument("--stage", default="all", help=f"one of: {', '.join(STAGES)} (default: all)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args, rest = parser.parse_known_args(argv)
    unknown = [word for word in rest if word.startswith("--")]
    if unknown:
        parser.error(f"unknown options {unknown}; overrides are KEY VALUE pairs such as OUTPUT.DIR outputs/x")
    args.opts = rest
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    if args.stage not in STAGES:
        print(f"error: --stage {args.stage!r} is not accepted; use one of: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    try:
        cfg = load_cfg(args.cfg, args.opts)
    except (ValueError, FileNotFoundError, KeyError, AssertionError) as err:
        print(f"error: invalid configuration: {err}", file=sys.stderr)
        return 2
    start = time.time()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        for sig in previous:
            with contextlib.suppress(ValueError):  # main() called outside the main thread: no handler
                signal.signal(sig, _raise_interrupted)
        summary = run(cfg, args.stage)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Interrupted as err:
        print(f"interrupted by {err}; rerun the same command to resume", file=sys.stderr)
        return 128 + err.signum
    except SystemExit as err:  # Lightning ends a run it saw interrupted with SystemExit (status 0 or 1)
        if type(err).__name__ == "SIGTERMException" or not err.code:
            print("interrupted by SIGTERM; rerun the same command to resume", file=sys.stderr)
            return 128 + signal.SIGTERM
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return err.code if isinstance(err.code, int) else 1
    except Exception as err:  # noqa: BLE001 - one line for the user, the traceback with --debug
        if args.debug:
            traceback.print_exc()
        message = str(err).strip() or type(err).__name__
        print(f"error: {message}" + ("" if args.debug else " (rerun with --debug for the traceback)"), file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError, TypeError):  # not the main thread, or a handler set from C
                signal.signal(sig, handler)
    if summary is not None:
        layout = RunLayout.from_cfg(cfg)
        tag = " [SYNTHETIC DATA]" if layout.synthetic else ""
        print(
            f"{layout.task}, {layout.method_label} {cfg.DATASET.LEADS}{tag}: {format_headline(summary['headline'])}; "
            f"accuracy {summary['accuracy']['mean']:.3f}, MCC {summary['mcc']['mean']:.3f} (fold means); "
            f"{time.time() - start:.0f} s; outputs in {layout.out}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
