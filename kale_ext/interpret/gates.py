"""HiME gate weights per lead: the adaptive weights that control each lead's contribution to the fused posterior.

LS-EMVAE (Suvon et al., arXiv 2503.13470) mixes the lead experts and the shared Product-of-Experts expert with
per-sample weights from a gate. Here the weights are read from the pre-trained multimodal VAE's ``fuse`` output
(``FusionOutput.weights``, (experts, batch)) on the records being interpreted, named by lead, with the shared expert
reported as its own row ``"shared (PoE)"``, and averaged per class and per fold.

Not every fusion has a gate. The table states what the weights are in its ``gate`` column:

- ``"learned"``: the fusion holds a gating network: a submodule that declares ``is_gate = True`` (as
  :class:`kale_ext.embed.fusion.ExpertGate` does), or a module held as a fusion's ``gate`` attribute (any gate
  module passed to HiME); class names play no part;
- ``"uniform"``: no gating network and every present expert gets the same weight (e.g. the reference code's plain
  average, the mean fusion), so the weights say nothing about lead importance;
- ``"fixed"``: no gating network but unequal weights (a fusion-specific rule, reported as it is).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from kale_ext.embed.fusion import is_gate
from kale_ext.interpret.attribution import _sorted_unique
from kale_ext.loaddata.windows import all_windows, check_window

logger = logging.getLogger(__name__)

SHARED_EXPERT = "shared (PoE)"


class GateWeights(NamedTuple):
    """Fusion weights of a batch of records.

    Attributes:
        weights: (experts, N) float32; each column sums to 1 over the present experts, 0 for absent ones.
        expert_mask: (experts, N) bool, True = the expert was present.
        expert_names: one name per expert row (lead names, then ``"shared (PoE)"`` for HiME).
        kind: ``"learned"``, ``"uniform"`` or ``"fixed"`` (see the module docstring).
    """

    weights: np.ndarray
    expert_mask: np.ndarray
    expert_names: tuple[str, ...]
    kind: str


def expert_names_for(lead_names: Sequence[str], num_experts: int, group_size: int | None = None) -> tuple[str, ...]:
    """Name the fusion's expert rows.

    Args:
        lead_names: the model's lead names (M).
        num_experts: K, the number of rows of ``FusionOutput.weights``.
        group_size: experts per positional group when the fusion groups leads (the reference mode), else None.

    Returns:
        K names: ``lead_names`` (K = M); ``lead_names + ("shared (PoE)",)`` (K = M + 1); ``"joint"`` for a single
        expert (a joint encoder); ``"group g (I+II+III)"`` for positional groups; ``"expert k"`` otherwise.
    """
    lead_names = tuple(lead_names)
    if group_size:
        return tuple(
            f"group {g + 1} (" + "+".join(lead_names[g * group_size : (g + 1) * group_size]) + ")"
            for g in range(num_experts)
        )
    if num_experts == len(lead_names):
        return lead_names
    if num_experts == len(lead_names) + 1:
        return lead_names + (SHARED_EXPERT,)
    if num_experts == 1:
        return ("joint",)
    return tuple(f"expert {k}" for k in range(num_experts))


def _has_gate(model: nn.Module) -> bool:
    """Whether the model holds a gating network: a submodule with ``is_gate = True`` or held as a ``gate`` attribute."""
    return any(is_gate(m) or isinstance(getattr(m, "gate", None), nn.Module) for m in model.modules())


def _weights_kind(model: nn.Module, weights: np.ndarray, expert_mask: np.ndarray) -> str:
    """Classify the weights as learned, uniform over the present experts, or fixed."""
    if _has_gate(getattr(model, "fusion", model)):
        return "learned"
    present = expert_mask.sum(axis=0, keepdims=True)
    uniform = np.where(expert_mask, 1.0 / np.maximum(present, 1), 0.0)
    return "uniform" if np.allclose(weights, uniform, atol=1e-5) else "fixed"


def compute_gate_weights(
    model: nn.Module,
    x: Tensor,
    leads: Sequence[str],
    mask: Tensor | None = None,
    batch_size: int = 64,
    window: int = 0,
) -> GateWeights:
    """Run the multimodal VAE's encoders and fusion on ``x`` and collect the fusion weights.

    Args:
        model: a multimodal VAE with ``encode(x, leads) -> (mean (M, B, D), log_var, mask (M, B))``,
            ``fuse(mean, log_var, mask) -> FusionOutput`` and ``lead_names`` (M names).
        x: (N, L', time) signals whose channels are named by ``leads`` (a subset of ``model.lead_names``).
        leads: names of the channels of ``x``.
        mask: (N, L') bool, True = present; a lead given but absent in a record is masked out of the fusion too.
        batch_size: records per forward pass.
        window: samples per window of a model pre-trained on windows (0 = whole records): the weights of a record
            are the mean of the weights of its windows (every window, as the features use them).

    Returns:
        :class:`GateWeights` over all N records.
    """
    if not hasattr(model, "encode") or not hasattr(model, "fuse"):
        raise TypeError(
            f"{type(model).__name__} has no encode/fuse: gate weights need the pre-trained multimodal VAE, "
            "not a supervised classifier"
        )
    leads = list(leads)
    model_leads = list(model.lead_names)
    unknown = [lead for lead in leads if lead not in model_leads]
    if unknown:
        raise ValueError(f"leads {unknown} are not leads of the model {model_leads}; pass the model's lead names")
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool)
    position = torch.tensor([model_leads.index(lead) for lead in leads])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    weights, masks = [], []
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                xb = x[start : start + batch_size].to(device=device, dtype=torch.float32)
                mb = mask[start : start + batch_size].bool()
                n_win = 1
                if window and check_window(window, xb.shape[-1]) < xb.shape[-1]:
                    wins = all_windows(xb, window)  # (n_windows, b, L', window)
                    n_win = wins.shape[0]
                    xb, mb = wins.reshape(-1, *wins.shape[2:]), mb.repeat(n_win, 1)
                mean, log_var, enc_mask = model.encode(xb, leads=leads)
                # The encoder knows which leads were given; the data mask knows which were recorded.
                data_mask = torch.zeros(len(model_leads), xb.shape[0], dtype=torch.bool)
                data_mask[position] = mb.T
                fused = model.fuse(mean, log_var, enc_mask.bool() & data_mask.to(enc_mask.device))
                w, m = fused.weights.float().cpu(), fused.expert_mask.bool().cpu()
                # A record's weights: the mean over its windows (window-major rows; one window = as before).
                weights.append(w.reshape(w.shape[0], n_win, -1).mean(1))
                masks.append(m.reshape(m.shape[0], n_win, -1).any(1))
    finally:
        model.train(was_training)
    w = torch.cat(weights, dim=1).numpy()
    m = torch.cat(masks, dim=1).numpy()
    kind = _weights_kind(model, w, m)
    fusion = getattr(model, "fusion", None)
    group_size = getattr(fusion, "group_size", None) if getattr(fusion, "mode", None) == "reference" else None
    names = expert_names_for(model_leads, w.shape[0], group_size)
    logger.info("fusion weights of %d experts on %d records (%s)", w.shape[0], w.shape[1], kind)
    return GateWeights(w, m, names, kind)


def gate_weight_table(
    gates: GateWeights,
    classes: Sequence | np.ndarray,
    folds: Sequence | np.ndarray | None = None,
    include_all: bool = True,
) -> pd.DataFrame:
    """Mean fusion weight per expert, per class and per fold.

    The mean runs over all the cell's records with absent experts counted as 0, so within a (class, fold) the
    weights of the experts sum to 1. Experts absent from every record (leads not in use) are left out.

    Args:
        gates: from :func:`compute_gate_weights`.
        classes: (N,) class of each record.
        folds: (N,) fold of each record; one fold ``0`` when None.
        include_all: add rows with class ``"all"``.

    Returns:
        DataFrame with columns expert, class, fold, weight, n_records, gate.
    """
    w, present = gates.weights, gates.expert_mask
    classes = np.asarray(classes)
    folds = np.zeros(w.shape[1], dtype=int) if folds is None else np.asarray(folds)
    in_use = present.any(axis=1)
    groups = [(c, classes == c) for c in _sorted_unique(classes)]
    if include_all:
        groups.append(("all", np.ones(w.shape[1], dtype=bool)))
    rows = []
    for fold in _sorted_unique(folds):
        for cls, in_class in groups:
            sel = (folds == fold) & in_class
            if not sel.any():
                continue
            cell = w[:, sel].mean(axis=1)
            for k in np.flatnonzero(in_use):
                rows.append(
                    {
                        "expert": gates.expert_names[k],
                        "class": cls,
                        "fold": fold,
                        "weight": float(cell[k]),
                        "n_records": int(present[k, sel].sum()),
                        "gate": gates.kind,
                    }
                )
    return pd.DataFrame(rows, columns=["expert", "class", "fold", "weight", "n_records", "gate"])
