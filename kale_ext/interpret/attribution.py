"""Integrated gradients of a lead-masked ECG classifier and the per-lead attribution ratio.

The classifier is any ``nn.Module`` (or callable) ``model(x, mask) -> logits`` with ``x: (batch, leads, time)``,
``mask: (batch, leads)`` boolean (True = present) and ``logits: (batch, classes)``; a single-logit binary output
``(batch,)`` or ``(batch, 1)`` is read as the logit of class 1. Attributions come from integrated gradients
(Sundararajan, Taly and Yan, "Axiomatic attribution for deep networks", ICML 2017) as implemented by captum, which is
imported inside the functions that need it.

The per-lead *attribution ratio* follows the quantitative reading of LS-EMVAE's Fig. 3 (Suvon et al., arXiv
2503.13470): the share of a lead's samples whose normalised absolute attribution clears a threshold. Our choices,
documented in ``docs/interpretation.md``:

- normalisation ``"record"`` (default): ``|attr|`` divided by the record's maximum over **all** leads and samples, so
  a lead the model ignores scores near 0. ``"lead"`` divides by each lead's own maximum, which measures how spread
  a lead's attribution is, not how large; it cannot rank leads and is offered for plots only.
- optional moving-average smoothing of ``|attr|`` (``smooth`` samples) before normalising: integrated gradients are
  spiky sample to sample, and a short window (about 40 ms) turns isolated spikes into the contiguous segments that a
  reader sees highlighted.
- threshold 0.5 by default: a sample counts when its attribution is at least half the record's peak.
- the *share* of a lead is its ratio divided by the sum of ratios over the leads in use, so shares sum to 1.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

BASELINES = ("zeros", "mean")
NORMALISATIONS = ("record", "lead")


class Attributions(NamedTuple):
    """Integrated-gradient attributions of a batch of records.

    Attributes:
        attributions: (batch, leads, time) float32 on the CPU; exactly 0 for absent leads.
        target: (batch,) the class each record was attributed to.
        probabilities: (batch, classes) softmax of the model's logits on the inputs.
        delta: (batch,) captum's convergence delta (sum of attributions minus the logit difference between input and
            baseline); large values mean ``n_steps`` is too small.
    """

    attributions: Tensor
    target: Tensor
    probabilities: Tensor
    delta: Tensor


def _as_logits(out: Tensor) -> Tensor:
    """Read a model output as (batch, classes) logits; a single binary logit becomes ``[0, logit]``."""
    if out.dim() == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.dim() == 1:
        out = torch.stack([torch.zeros_like(out), out], dim=1)
    return out


def make_baseline(x: Tensor, baseline: str | float | Tensor = "zeros") -> Tensor:
    """Build the integrated-gradients baseline (the 'absence of signal' reference) for ``x``.

    Args:
        x: (batch, leads, time) input signals.
        baseline: ``"zeros"`` (a flat line at 0, i.e. at the mean of z-scored signals); ``"mean"`` (each record's
            lead held flat at its own temporal mean: the waveform removed, the offset kept); a number (a flat line at
            that value); or a tensor broadcastable to ``x`` (e.g. an average beat).

    Returns:
        (batch, leads, time) baseline on the device and dtype of ``x``.
    """
    if isinstance(baseline, Tensor):
        return baseline.to(device=x.device, dtype=x.dtype).expand_as(x).clone()
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, float(baseline))
    if baseline == "zeros":
        return torch.zeros_like(x)
    if baseline == "mean":
        return x.mean(dim=-1, keepdim=True).expand_as(x).clone()
    raise ValueError(f"unknown baseline {baseline!r}; use one of {BASELINES}, a number or a tensor of x's shape")


def predict_proba(
    model: Callable[[Tensor, Tensor], Tensor], x: Tensor, mask: Tensor | None = None, batch_size: int = 64
) -> Tensor:
    """Class probabilities of ``model`` on ``x`` in batches, without gradients.

    Args:
        model: classifier ``model(x (B, L, T), mask (B, L)) -> logits (B, C)``.
        x: (N, leads, time) signals.
        mask: (N, leads) bool, True = present; all present when None.
        batch_size: records per forward pass.

    Returns:
        (N, classes) float32 probabilities on the CPU.
    """
    device = _device_of(model)
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool)
    out = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size].to(device=device, dtype=torch.float32)
            mb = mask[start : start + batch_size].to(device)
            out.append(torch.softmax(_as_logits(model(xb, mb)).float(), dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 2)


def _device_of(model) -> torch.device:
    """The device of the first parameter of ``model`` (CPU for parameter-free callables)."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def integrated_gradients(
    model: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    mask: Tensor | None = None,
    target: str | int | Tensor = "predicted",
    baseline: str | float | Tensor = "zeros",
    n_steps: int = 32,
    batch_size: int = 8,
    internal_batch_size: int | None = None,
    method: str = "gausslegendre",
) -> Attributions:
    """Integrated gradients of the classifier's target logit with respect to every lead's input signal.

    Records are processed ``batch_size`` at a time and captum evaluates at most ``internal_batch_size`` interpolated
    inputs per forward pass, which bounds memory at ``internal_batch_size`` records' activations. Absent leads are
    held at their input value along the path (baseline = input), so they receive exactly zero attribution.

    Args:
        model: classifier ``model(x (B, L, T), mask (B, L)) -> logits (B, C)``; put in eval mode here.
        x: (N, leads, time) signals.
        mask: (N, leads) bool, True = present; all present when None.
        target: ``"predicted"`` (argmax of the logits), a class index for every record, or a (N,) tensor of classes.
        baseline: see :func:`make_baseline`.
        n_steps: points of the path integral (Gauss-Legendre by default); 32 to 64 keeps the delta small for
            small networks.
        batch_size: records per call to captum.
        internal_batch_size: interpolated inputs per forward pass; default ``batch_size * n_steps`` (no split).
        method: captum's integration rule.

    Returns:
        :class:`Attributions` with (N, leads, time) attributions on the CPU.
    """
    from captum.attr import IntegratedGradients  # optional dependency: imported where used

    if x.dim() != 3:
        raise ValueError(f"x must be (batch, leads, time), got shape {tuple(x.shape)}")
    if n_steps < 2:
        raise ValueError(f"n_steps must be at least 2, got {n_steps}")
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool)
    mask = mask.bool()
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    device = _device_of(model)

    def forward(inputs: Tensor, m: Tensor) -> Tensor:
        return _as_logits(model(inputs, m)).float()

    ig = IntegratedGradients(forward)
    attributions, targets, probs, deltas = [], [], [], []
    try:
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size].to(device=device, dtype=torch.float32)
            mb = mask[start : start + batch_size].to(device)
            with torch.no_grad():
                logits = forward(xb, mb)
            if isinstance(target, str):
                if target != "predicted":
                    raise ValueError(f"unknown target {target!r}; use 'predicted', a class index or a tensor")
                tb = logits.argmax(dim=1)
            elif isinstance(target, Tensor):
                tb = target[start : start + batch_size].to(device=device, dtype=torch.long)
            else:
                tb = torch.full((xb.shape[0],), int(target), dtype=torch.long, device=device)
            base = make_baseline(xb, baseline)
            # Absent leads keep their input value along the path: their attribution is exactly zero.
            base = torch.where(mb[:, :, None], base, xb)
            with torch.enable_grad():
                attr, delta = ig.attribute(
                    xb,
                    baselines=base,
                    target=tb,
                    additional_forward_args=(mb,),
                    n_steps=n_steps,
                    method=method,
                    internal_batch_size=internal_batch_size or xb.shape[0] * n_steps,
                    return_convergence_delta=True,
                )
            attr = attr.detach().float() * mb[:, :, None]
            attributions.append(attr.cpu())
            targets.append(tb.cpu())
            probs.append(torch.softmax(logits, dim=1).cpu())
            deltas.append(delta.detach().float().cpu())
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    result = Attributions(torch.cat(attributions), torch.cat(targets), torch.cat(probs), torch.cat(deltas))
    logger.info(
        "integrated gradients on %d records (%d steps): median |delta| %.3g",
        x.shape[0],
        n_steps,
        float(result.delta.abs().median()) if result.delta.numel() else 0.0,
    )
    return result


def normalised_attribution(
    attributions: Tensor | np.ndarray,
    mask: Tensor | np.ndarray | None = None,
    normalise: str = "record",
    smooth: int = 1,
) -> np.ndarray:
    """Absolute attribution, optionally smoothed, scaled to [0, 1].

    Args:
        attributions: (N, leads, time) or (leads, time) signed attributions.
        mask: (N, leads) or (leads,) bool, True = present; absent leads are set to 0.
        normalise: ``"record"`` divides by the record's maximum over all leads; ``"lead"`` by each lead's maximum.
        smooth: width in samples of a centred moving average applied to ``|attr|`` (1 = none).

    Returns:
        Array of the input's shape with values in [0, 1] (0 where the denominator is 0).
    """
    if normalise not in NORMALISATIONS:
        raise ValueError(f"unknown normalise {normalise!r}; use one of {NORMALISATIONS}")
    a = np.abs(np.asarray(attributions, dtype=np.float64))
    single = a.ndim == 2
    if single:
        a = a[None]
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        a = a * (m[None] if single else m)[:, :, None]
    if smooth > 1:
        from scipy.ndimage import uniform_filter1d

        a = uniform_filter1d(a, size=int(smooth), axis=-1, mode="nearest")
    axes = (1, 2) if normalise == "record" else (2,)
    peak = a.max(axis=axes, keepdims=True)
    out = np.divide(a, peak, out=np.zeros_like(a), where=peak > 0)
    return out[0] if single else out


def attribution_ratio(
    attributions: Tensor | np.ndarray,
    mask: Tensor | np.ndarray | None = None,
    threshold: float = 0.5,
    normalise: str = "record",
    smooth: int = 1,
) -> np.ndarray:
    """Per-lead attribution ratio: the fraction of a lead's samples whose normalised attribution clears ``threshold``.

    Args:
        attributions: (N, leads, time) signed attributions.
        mask: (N, leads) bool, True = present; absent leads get NaN.
        threshold: in (0, 1]; a sample counts when ``normalised |attr| >= threshold``.
        normalise: see :func:`normalised_attribution` (``"record"`` ranks leads; ``"lead"`` does not).
        smooth: moving-average width in samples before normalising.

    Returns:
        (N, leads) ratios in [0, 1], NaN for absent leads.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    a = np.asarray(attributions)
    if mask is None:
        mask = np.ones(a.shape[:2], dtype=bool)
    m = np.asarray(mask, dtype=bool)
    norm = normalised_attribution(a, m, normalise=normalise, smooth=smooth)
    ratio = (norm >= threshold).mean(axis=-1)
    # A record whose attribution is identically zero clears nothing: all its ratios are 0.
    return np.where(m, ratio, np.nan)


def lead_shares(ratio: np.ndarray) -> np.ndarray:
    """Ratios divided by their sum over the leads of each row, so that the present leads' shares sum to 1.

    Args:
        ratio: (N, leads) non-negative, NaN for absent leads.

    Returns:
        (N, leads) shares; NaN for absent leads and for rows whose ratios are all 0.
    """
    ratio = np.asarray(ratio, dtype=np.float64)
    total = np.nansum(ratio, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, ratio / total, np.nan)


def lead_importance_table(
    ratio: np.ndarray,
    lead_names: Sequence[str],
    classes: Sequence | np.ndarray,
    folds: Sequence | np.ndarray | None = None,
    include_all: bool = True,
) -> pd.DataFrame:
    """Tidy per-lead importance, per class and per fold.

    The ``ratio`` of a (lead, class, fold) cell is the mean over that cell's records (present leads only); its
    ``share`` is that ratio divided by the sum of the cell's ratios over leads, so shares sum to 1 within each
    (class, fold). Leads absent from every record are left out.

    Args:
        ratio: (N, leads) from :func:`attribution_ratio`.
        lead_names: the ``leads`` names, in column order.
        classes: (N,) class of each record (label or predicted class: the caller decides and says so).
        folds: (N,) fold of each record; one fold ``0`` when None.
        include_all: add rows with class ``"all"`` pooling every record of the fold.

    Returns:
        DataFrame with columns lead, class, fold, ratio, share, n_records.
    """
    ratio = np.asarray(ratio, dtype=np.float64)
    if ratio.ndim != 2 or ratio.shape[1] != len(lead_names):
        raise ValueError(f"ratio has shape {ratio.shape}; expected (records, {len(lead_names)}) to match lead_names")
    classes = np.asarray(classes)
    folds = np.zeros(len(ratio), dtype=int) if folds is None else np.asarray(folds)
    in_use = ~np.all(np.isnan(ratio), axis=0)
    groups = [(c, classes == c) for c in _sorted_unique(classes)]
    if include_all:
        groups.append(("all", np.ones(len(ratio), dtype=bool)))
    rows = []
    for fold in _sorted_unique(folds):
        in_fold = folds == fold
        for cls, in_class in groups:
            sel = in_fold & in_class
            if not sel.any():
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a lead absent from every record of the cell
                cell = np.nanmean(ratio[sel], axis=0)
            total = np.nansum(cell[in_use])
            for j in np.flatnonzero(in_use):
                share = cell[j] / total if total > 0 else np.nan
                n = int(np.sum(~np.isnan(ratio[sel, j])))
                rows.append(
                    {
                        "lead": lead_names[j],
                        "class": cls,
                        "fold": fold,
                        "ratio": cell[j],
                        "share": share,
                        "n_records": n,
                    }
                )
    return pd.DataFrame(rows, columns=["lead", "class", "fold", "ratio", "share", "n_records"])


def summarise_over_folds(table: pd.DataFrame, keys: Sequence[str], values: Sequence[str]) -> pd.DataFrame:
    """Mean and standard deviation over folds of tidy per-fold values, keeping the first-seen order of ``keys``.

    Args:
        table: tidy frame with a ``fold`` column, the ``keys`` columns and the ``values`` columns.
        keys: columns that identify a row apart from the fold (e.g. ``["lead", "class"]``).
        values: numeric columns to summarise.

    Returns:
        DataFrame with ``keys``, ``<value>_mean`` and ``<value>_std`` (sample std, 0 for one fold) and ``n_folds``.
    """
    grouped = table.groupby(list(keys), sort=False)
    out = grouped[list(values)].agg(["mean", "std"])
    out.columns = [f"{v}_{stat}" for v, stat in out.columns]
    out = out.fillna({f"{v}_std": 0.0 for v in values})
    out["n_folds"] = grouped["fold"].nunique()
    return out.reset_index()


def _sorted_unique(values: np.ndarray) -> list:
    """Unique values in sorted order (strings and numbers kept as they are)."""
    return sorted(pd.unique(np.asarray(values)).tolist(), key=lambda v: (str(type(v)), v))
