"""Read back what a finished run of ``main.py`` wrote in ``OUTPUT.DIR`` (used by interpretation and prediction).

Stable names (the interpretation stage depends on them):

- ``is_synthetic(cfg) -> bool``: whether the run used the embedded synthetic cohort.
- ``finetune_dataset(cfg) -> ECGLeadDataset``: the labelled records of the run, items with ``label``.
- ``load_folds(cfg) -> DataFrame``: ``record_id, subject_id, label, fold, threshold`` (one row per record, in the
  order of ``finetune_dataset(cfg)``).
- ``load_pretrained_model(cfg, device="cpu") -> MultimodalVAE | None``: the frozen pre-trained model (None for
  supervised baselines).
- ``load_fold_classifier(cfg, fold, device="cpu") -> nn.Module``: ``forward(x (B, L, T), mask (B, L) | None) ->
  logits (B, 2)`` for the leads of ``DATASET.LEADS`` in that order; a ``FeatureClassifier`` (frozen encoders +
  head) for VAE methods, the supervised network (wrapped for the mask) for baselines. Returned in eval mode.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from yacs.config import CfgNode


def _main():
    import main as main_module  # the example's main.py, beside this file

    return main_module


def is_synthetic(cfg: CfgNode) -> bool:
    """True when the run uses the embedded synthetic cohort (no data sources configured)."""
    return bool(_main().is_synthetic(cfg))


def finetune_dataset(cfg: CfgNode):
    """The labelled records of the run (``ECGLeadDataset`` over the fine-tuning cache, leads of DATASET.LEADS)."""
    return _main().labelled_dataset(cfg)


def load_folds(cfg: CfgNode) -> pd.DataFrame:
    """Fold assignment and the fold's decision threshold per record (``OUTPUT.DIR/folds.csv``)."""
    path = Path(cfg.OUTPUT.DIR) / "folds.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run main.py --stage finetune with this config first")
    return pd.read_csv(path, dtype={"record_id": str, "subject_id": str})


def load_pretrained_model(cfg: CfgNode, device: str = "cpu") -> nn.Module | None:
    """The pre-trained VAE in eval mode, or None for supervised baselines (which have none)."""
    m = _main()
    if cfg.MODEL.NAME in m.SUPERVISED_MODELS:
        return None
    from kale_ext.pipeline.pretrain import is_pretrained, load_model

    folder = m.pretrain_dir(cfg)
    if not is_pretrained(folder):
        raise FileNotFoundError(f"no finished pre-training in {folder}; run main.py --stage pretrain first")
    return load_model(folder, m.build_from_args, device=device)


def load_fold_classifier(cfg: CfgNode, fold: int, device: str = "cpu") -> nn.Module:
    """The classifier trained on fold ``fold``'s training part: ``forward(x (B,L,T), mask (B,L) | None) -> logits``."""
    from kale_ext.predict.heads import ClassificationHead, FeatureClassifier, LatentFeatureExtractor

    m = _main()
    folder = m.finetune_dir(cfg)
    path = folder / f"fold{int(fold)}" / "model.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run main.py --stage finetune with this config first")
    info = json.loads((folder / "classifier.json").read_text(encoding="utf-8"))
    state = torch.load(path, map_location=device, weights_only=True)
    if info["kind"] == "head":
        vae = load_pretrained_model(cfg, device)
        head = ClassificationHead(info["in_features"], 2, cfg.FINETUNE.HIDDEN_DIM, cfg.FINETUNE.DROPOUT)
        head.load_state_dict(state)
        model = FeatureClassifier(LatentFeatureExtractor(vae, info["leads"], info["features"]), head)
    else:
        model = m.make_classifier_factory(cfg)()
        model.load_state_dict(state)
    return model.to(device).eval()
