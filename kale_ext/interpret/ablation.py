"""Lead ablation at inference: how much AUROC is lost when one lead is masked out, with no retraining.

Each lead in use is switched off in the lead mask (the model's own missing-lead path, so the signal is not replaced
by zeros that the model would read as a flat trace) and the records are scored again. The drop
``AUROC(all leads) - AUROC(without the lead)`` is large for a lead the classifier relies on and near 0 (or
negative) for a lead it can do without. A model that does not honour its mask would show no drop at all: that is a
finding about the model, reported as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from kale_ext.evaluate.metrics import auroc
from kale_ext.interpret.attribution import predict_proba, summarise_over_folds

logger = logging.getLogger(__name__)


def lead_ablation(
    model: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    labels: Sequence[int] | np.ndarray,
    lead_names: Sequence[str],
    mask: Tensor | None = None,
    positive_class: int = 1,
    batch_size: int = 64,
    fold: int | str | None = None,
) -> pd.DataFrame:
    """AUROC with all leads and with each lead in use masked out, on one set of held-out records.

    Args:
        model: classifier ``model(x (B, L, T), mask (B, L)) -> logits (B, C)`` in eval mode.
        x: (N, leads, time) signals.
        labels: (N,) binary labels (1 = ``positive_class`` present).
        lead_names: names of the ``leads`` channels of ``x``.
        mask: (N, leads) bool, True = present; all present when None.
        positive_class: column of the model's probabilities scored for the AUROC.
        batch_size: records per forward pass.
        fold: written to the ``fold`` column (0 when None).

    Returns:
        DataFrame with one row per lead in use: lead, fold, auroc_full, auroc_ablated, drop.
    """
    if x.shape[1] != len(lead_names):
        raise ValueError(f"x has {x.shape[1]} leads but lead_names has {len(lead_names)}; pass one name per channel")
    y = (np.asarray(labels) == positive_class).astype(int)
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool)
    mask = mask.bool()
    full = auroc(y, predict_proba(model, x, mask, batch_size)[:, positive_class].numpy())
    rows = []
    for j, lead in enumerate(lead_names):
        if not mask[:, j].any():
            continue  # not in use: nothing to ablate
        ablated_mask = mask.clone()
        ablated_mask[:, j] = False
        if not ablated_mask.any(dim=1).all():
            logger.warning("masking %s leaves some records with no lead at all; the model must handle that", lead)
        score = predict_proba(model, x, ablated_mask, batch_size)[:, positive_class].numpy()
        ablated = auroc(y, score)
        rows.append(
            {
                "lead": lead,
                "fold": 0 if fold is None else fold,
                "auroc_full": full,
                "auroc_ablated": ablated,
                "drop": full - ablated,
            }
        )
    return pd.DataFrame(rows, columns=["lead", "fold", "auroc_full", "auroc_ablated", "drop"])


def summarise_ablation(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over folds of the per-fold ablation table.

    Args:
        table: concatenation of :func:`lead_ablation` outputs for several folds.

    Returns:
        DataFrame with lead, auroc_full_mean/std, auroc_ablated_mean/std, drop_mean/std, n_folds, sorted by
        drop_mean (largest first).
    """
    out = summarise_over_folds(table, ["lead"], ["auroc_full", "auroc_ablated", "drop"])
    return out.sort_values("drop_mean", ascending=False, kind="stable").reset_index(drop=True)
