"""Read back what a finished run of ``main.py`` wrote in ``OUTPUT.DIR`` (used by interpretation).

Stable names (the interpretation stage depends on them):

- ``is_synthetic(cfg) -> bool``: whether the run used the embedded synthetic cohort.
- ``finetune_dataset(cfg) -> ECGLeadDataset``: the labelled records of the run, items with ``label``.
- ``load_folds(cfg) -> DataFrame``: ``record_id, subject_id, label, fold, threshold`` (one row per record, in the
  order of ``finetune_dataset(cfg)``).
- ``load_pretrained_model(cfg, device="cpu") -> MultimodalVAE | None``: the frozen pre-trained model (None for
  models without pre-training).
- ``load_fold_classifier(cfg, fold, device="cpu") -> nn.Module``: ``forward(x (B, L, T), mask (B, L) | None) ->
  logits (B, 2)`` for the leads of ``DATASET.LEADS`` in that order, in eval mode
  (``kale_ext.pipeline.artifacts.load_fold_classifier``).
"""

from __future__ import annotations

import pandas as pd
from layout import RunLayout
from stages import labelled_dataset
from torch import nn
from yacs.config import CfgNode

from kale_ext.pipeline import artifacts as library


def is_synthetic(cfg: CfgNode) -> bool:
    """True when the run uses the embedded synthetic cohort (no data sources configured)."""
    return RunLayout.from_cfg(cfg).synthetic


def finetune_dataset(cfg: CfgNode):
    """The labelled records of the run (``ECGLeadDataset`` over the fine-tuning cache, leads of DATASET.LEADS)."""
    return labelled_dataset(RunLayout.from_cfg(cfg))


def load_folds(cfg: CfgNode) -> pd.DataFrame:
    """Fold assignment and the fold's decision threshold per record (``OUTPUT.DIR/folds.csv``)."""
    path = RunLayout.from_cfg(cfg).folds
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run main.py --stage finetune with this config first")
    return pd.read_csv(path, dtype={"record_id": str, "subject_id": str})


def load_pretrained_model(cfg: CfgNode, device: str = "cpu") -> nn.Module | None:
    """The pre-trained model in eval mode, or None for models without pre-training."""
    run = RunLayout.from_cfg(cfg)
    return library.load_model(run.pretrain_dir, device=device) if run.spec.pretrained else None


def load_fold_classifier(cfg: CfgNode, fold: int, device: str = "cpu") -> nn.Module:
    """The classifier trained on fold ``fold``'s training part: ``forward(x (B,L,T), mask (B,L) | None) -> logits``."""
    return library.load_fold_classifier(RunLayout.from_cfg(cfg).finetune_dir, fold, device)
