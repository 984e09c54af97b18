"""One log line per training epoch: what a redirected log shows instead of progress bars.

A progress bar redrawn into a file becomes thousands of ``\\r`` fragments; :class:`EpochLogLine` writes one line per
epoch with the epoch's logged metrics instead (``epoch 3/20: train/loss 1.2e+03, val/loss 1.1e+03``).
"""

from __future__ import annotations

import logging
import math
import time

import pytorch_lightning as pl

logger = logging.getLogger(__name__)


def _format(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.3e}"


class EpochLogLine(pl.Callback):
    """Log ``<name> epoch k/N: metric value, ...`` at the end of every training epoch (rank zero only).

    Args:
        name: what is trained, at the start of the line (e.g. ``"pre-training"``).
        prefixes: only metrics whose names start with one of these are shown (default: every epoch metric).
        skip: metrics whose names end with one of these are left out (those another line of the run log already
            shows, e.g. pre-training's reconstruction r).
    """

    def __init__(
        self, name: str = "training", prefixes: tuple[str, ...] = ("train/", "val/"), skip: tuple[str, ...] = ()
    ) -> None:
        super().__init__()
        self.name = name
        self.prefixes = prefixes
        self.skip = tuple(skip)
        self._start = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the epoch's clock."""
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the line of the epoch that ended (validation metrics of this epoch are already in)."""
        if not trainer.is_global_zero:
            return
        parts = []
        for key, value in sorted(trainer.callback_metrics.items()):
            name = key.removesuffix("_epoch")
            if key.endswith("_step") or not key.startswith(self.prefixes) or (self.skip and name.endswith(self.skip)):
                continue
            try:
                parts.append(f"{name} {_format(float(value))}")
            except (TypeError, ValueError):
                continue
        elapsed = time.perf_counter() - self._start
        logger.info(
            "%s epoch %d/%d (%d steps, %.1f s): %s", self.name, trainer.current_epoch + 1, trainer.max_epochs,
            trainer.num_training_batches, elapsed, ", ".join(parts) or "no metrics logged",
        )  # fmt: skip
