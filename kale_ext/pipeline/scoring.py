"""Scoring new records with trained fold classifiers: lead checks, refusals with reasons, fold averaging.

A record is scored only when every lead the classifiers take is present; otherwise it is refused and its row says
why (the quality-control reason of the cache builder, or the missing leads). Nothing is dropped silently: every
input record gets one row.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from kale_ext.pipeline.finetune import predict_proba

logger = logging.getLogger(__name__)

SCORE_COLUMNS = ("record_id", "subject_id", "probability", "prediction", "status")


def refusals_from_qc(qc: pd.DataFrame) -> pd.DataFrame:
    """Rows of records the cache builder refused: ``record_id`` and ``status = "refused: <reason>"``."""
    if "status" not in qc.columns or qc.empty:
        return pd.DataFrame(columns=["record_id", "status"])
    refused = qc[qc["status"] != "ok"]
    reasons = refused["reason"] if "reason" in refused.columns else pd.Series("", index=refused.index)
    return pd.DataFrame({"record_id": refused["record_id"].astype(str), "status": "refused: " + reasons.astype(str)})


def score_records(
    classifiers: Sequence[nn.Module],
    dataset,
    leads: Sequence[str],
    threshold: float,
    qc: pd.DataFrame | None = None,
    provenance: Mapping[str, object] | None = None,
    device: str = "cpu",
) -> pd.DataFrame:
    """Mean positive-class probability over the fold classifiers, the decision, and a status per record.

    Args:
        classifiers: fold classifiers ``forward(x (B, L, T), mask (B, L)) -> logits`` over ``leads``.
        dataset: ``ECGLeadDataset`` of the records to score (channels ``leads``), or None when none passed QC.
        leads: the leads the classifiers need.
        threshold: decision threshold on the mean probability.
        qc: the cache builder's ``qc.csv`` table; its refused records get a row each.
        provenance: constant columns added to every row (model, data kind, class meaning, ...).
        device: torch device.

    Returns:
        DataFrame with the columns ``SCORE_COLUMNS``, ``threshold`` and the provenance keys, in this order for every
        mix of scored and refused records; ``prediction`` is an integer
        column (nullable: empty for refused records), ``status`` is ``ok`` or ``refused: <reason>``.
    """
    parts = []
    if qc is not None:
        parts.append(refusals_from_qc(qc))
    if dataset is not None and len(dataset):
        present = np.asarray(dataset.masks, dtype=bool)
        ok = present.all(axis=1)
        for i in np.flatnonzero(~ok):
            absent = [lead for lead, p in zip(leads, present[i]) if not p]
            parts.append(
                pd.DataFrame(
                    {"record_id": [str(dataset.record_ids[i])], "status": [f"refused: lacks lead {', '.join(absent)}"]}
                )
            )
        keep = np.flatnonzero(ok)
        if len(keep):
            subset = torch.utils.data.Subset(dataset, keep.tolist())
            prob = np.mean([predict_proba(clf, subset, device=device) for clf in classifiers], axis=0)
            parts.append(
                pd.DataFrame(
                    {
                        "record_id": np.asarray(dataset.record_ids)[keep].astype(str),
                        "subject_id": np.asarray(dataset.subject_ids)[keep].astype(str),
                        "probability": prob,
                        "prediction": (prob >= threshold).astype(int),
                        "status": "ok",
                    }
                )
            )
    parts = [p for p in parts if len(p)]
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(SCORE_COLUMNS))
    for column in SCORE_COLUMNS:
        if column not in table.columns:
            table[column] = np.nan
    table["prediction"] = table["prediction"].astype("Int64")
    table["threshold"] = float(threshold)
    for key, value in (provenance or {}).items():
        table[key] = value
    # One column order whatever the mix of scored and refused records (the first part of the concat set it before).
    table = table[[*SCORE_COLUMNS, "threshold", *(provenance or {})]]
    for _, row in table[table["status"] != "ok"].iterrows():
        logger.warning("record %s %s; it needs the leads %s", row["record_id"], row["status"], ", ".join(leads))
    return table
