"""Probing frozen representations: repeated subject-level cross-validation of a linear or small MLP probe.

The protocol (one function each, so that a benchmark composes them):

1. :func:`repeated_folds`: R repeats of stratified K-fold, grouped by subject (``make_folds`` with seeds
   ``seed, seed + 1, ...``), so no subject is in a training and a test part of the same repeat.
2. :func:`cross_validated_probe`: for every repeat and fold, fit a probe (standardised features, then
   scikit-learn's logistic regression or a one-hidden-layer MLP) on the training part and predict the held-out part;
   the same fitted probe can also score other feature sets of the same records (e.g. features of a lead subset, with
   the other leads masked), which is how robustness to missing leads is measured without refitting.
3. :func:`summarise_probe`: AUROC of every fold, the pooled AUROC of the out-of-fold probabilities averaged over
   repeats, and a percentile bootstrap 95% interval of that pooled AUROC over subjects
   (:func:`kale_ext.evaluate.metrics.bootstrap_ci`).

It also holds what a lead-generation benchmark needs: :func:`generation_metrics` (per-record, per-lead Pearson r
and RMSE) and :func:`fit_linear_lead_map` (least squares of target leads on input leads, one linear map shared by
every time sample), and :func:`probe_to_torch`, which turns a fitted probe into a differentiable module for
attribution.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from kale_ext.evaluate.cross_validation import fold_split, make_folds
from kale_ext.evaluate.metrics import auroc, bootstrap_ci
from kale_ext.loaddata.windows import check_window, window_starts
from kale_ext.predict.heads import LatentFeatureExtractor

logger = logging.getLogger(__name__)

PROBE_KINDS = ("logistic", "mlp")


def repeated_folds(
    labels: Sequence | np.ndarray,
    groups: Sequence | np.ndarray | None = None,
    n_splits: int = 5,
    repeats: int = 3,
    seed: int = 0,
) -> np.ndarray:
    """Fold ids of ``repeats`` independent stratified, subject-grouped K-fold partitions.

    Args:
        labels: (N,) class labels.
        groups: (N,) subject ids (None: every sample is its own subject).
        n_splits: K.
        repeats: R.
        seed: repeat r uses seed ``seed + r``.

    Returns:
        (R, N) int array; row r assigns every sample to a test fold in ``[0, K)``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    return np.stack([make_folds(labels, groups, n_splits=n_splits, seed=seed + r) for r in range(repeats)])


def make_probe(
    kind: str = "logistic",
    seed: int = 0,
    c: float | str = 1.0,
    hidden_dim: int = 64,
    max_iter: int = 2000,
    c_grid: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0),
    inner_folds: int = 3,
):
    """A scikit-learn probe: ``StandardScaler`` then logistic regression or a one-hidden-layer MLP.

    Args:
        kind: ``"logistic"`` (L2-regularised, inverse strength ``c``) or ``"mlp"`` (ReLU, ``hidden_dim`` units,
            L2 ``1 / c``, early stopping off).
        seed: random state of the estimator.
        c: inverse regularisation strength, or ``"cv"`` (logistic only): chosen from ``c_grid`` by an inner
            stratified ``inner_folds``-fold CV on the data the probe is fitted on (AUROC), i.e. inside each outer
            training part. The inner folds are not grouped by subject: use it with one sample per subject.
        hidden_dim: hidden units of the MLP.
        max_iter: iteration limit of the solver.
        c_grid: candidate values of ``c`` for ``c="cv"``.
        inner_folds: inner folds for ``c="cv"``.

    Returns:
        An unfitted ``sklearn.pipeline.Pipeline``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "logistic" and c == "cv":
        from sklearn.linear_model import LogisticRegressionCV
        from sklearn.model_selection import StratifiedKFold

        inner = StratifiedKFold(inner_folds, shuffle=True, random_state=seed)
        estimator = LogisticRegressionCV(Cs=list(c_grid), cv=inner, scoring="roc_auc", max_iter=max_iter)
    elif isinstance(c, str):
        raise ValueError(f"c must be a number, or 'cv' for the logistic probe; got {c!r}")
    elif kind == "logistic":
        estimator = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    elif kind == "mlp":
        estimator = MLPClassifier((hidden_dim,), alpha=1.0 / c, max_iter=max_iter, random_state=seed)
    else:
        raise ValueError(f"unknown probe kind {kind!r}; use one of {PROBE_KINDS}")
    return make_pipeline(StandardScaler(), estimator)


@dataclass
class ProbeOutcome:
    """Out-of-fold probabilities of a cross-validated probe.

    Attributes:
        prob: ``{feature set name: (R, N) positive-class probability}``; every sample is scored by the probe of the
            fold that held it out, in every repeat.
        folds: (R, N) fold ids.
        labels: (N,) binary labels.
    """

    prob: dict[str, np.ndarray]
    folds: np.ndarray
    labels: np.ndarray


def cross_validated_probe(
    features: np.ndarray,
    labels: Sequence | np.ndarray,
    folds: np.ndarray,
    eval_features: Mapping[str, np.ndarray] | None = None,
    name: str = "train",
    kind: str = "logistic",
    seed: int = 0,
    **probe_options,
) -> ProbeOutcome:
    """Fit a probe per repeat and fold on ``features`` and score the held-out samples.

    Args:
        features: (N, F) training features.
        labels: (N,) binary labels.
        folds: (R, N) or (N,) fold ids (from :func:`repeated_folds` or ``make_folds``).
        eval_features: optional ``{name: (N, F)}`` other feature sets of the same samples, scored by the same
            fitted probes (e.g. features with leads masked).
        name: key of ``features`` itself in the result.
        kind: probe kind (see :func:`make_probe`).
        seed: base seed of the probes (fold k of repeat r uses ``seed + 100 * r + k``).
        **probe_options: passed to :func:`make_probe`.

    Returns:
        :class:`ProbeOutcome`.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    folds = np.atleast_2d(np.asarray(folds))
    if x.ndim != 2 or len(x) != len(y) or folds.shape[1] != len(y):
        raise ValueError(
            f"features (N, F), labels (N,) and folds (R, N) must agree; got {x.shape}, {y.shape}, {folds.shape}"
        )
    sets = {name: x}
    for key, value in (eval_features or {}).items():
        value = np.asarray(value, dtype=np.float64)
        if value.shape != x.shape:
            raise ValueError(
                f"eval features {key!r} are {value.shape}; they must match the training features {x.shape}"
            )
        sets[key] = value
    prob = {key: np.full(folds.shape, np.nan) for key in sets}
    for r, row in enumerate(folds):
        for k in sorted(np.unique(row).tolist()):
            train, test = fold_split(row, k)
            probe = make_probe(kind, seed=seed + 100 * r + k, **probe_options).fit(x[train], y[train])
            for key, value in sets.items():
                prob[key][r, test] = probe.predict_proba(value[test])[:, 1]
    return ProbeOutcome(prob, folds, y)


@dataclass
class ProbeSummary:
    """AUROC of a probe's out-of-fold predictions.

    Attributes:
        auroc: pooled AUROC of the out-of-fold probabilities averaged over repeats.
        ci: (lo, hi) percentile bootstrap interval of ``auroc`` over subjects.
        fold_auroc: (R, K) AUROC of each held-out fold.
        fold_mean: mean of ``fold_auroc`` (NaN folds left out).
        fold_std: population standard deviation of ``fold_auroc``.
        n: samples; n_pos: positives.
    """

    auroc: float
    ci: tuple[float, float]
    fold_auroc: np.ndarray
    fold_mean: float
    fold_std: float
    n: int
    n_pos: int


def summarise_probe(
    labels: Sequence | np.ndarray,
    prob: np.ndarray,
    folds: np.ndarray,
    groups: Sequence | np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> ProbeSummary:
    """Per-fold and pooled AUROC with a bootstrap interval.

    Args:
        labels: (N,) binary labels.
        prob: (R, N) or (N,) out-of-fold probabilities.
        folds: (R, N) or (N,) fold ids matching ``prob``.
        groups: (N,) subject ids for a subject-level bootstrap (None: one subject per sample).
        n_boot: bootstrap resamples.
        seed: bootstrap seed.
        alpha: 1 - confidence level.

    Returns:
        :class:`ProbeSummary`.
    """
    y = np.asarray(labels).astype(np.int64)
    prob = np.atleast_2d(np.asarray(prob, dtype=np.float64))
    folds = np.atleast_2d(np.asarray(folds))
    if prob.shape != folds.shape or prob.shape[1] != len(y):
        raise ValueError(f"prob {prob.shape} and folds {folds.shape} must both be (R, N) with N = {len(y)}")
    if np.isnan(prob).any():
        raise ValueError("prob holds NaN: some sample was never held out; check the folds")
    ks = sorted(np.unique(folds).tolist())
    per_fold = np.full((len(folds), len(ks)), np.nan)
    for r in range(len(folds)):
        for i, k in enumerate(ks):
            sel = folds[r] == k
            if sel.any() and 0 < y[sel].sum() < sel.sum():
                per_fold[r, i] = auroc(y[sel], prob[r, sel])
    pooled = prob.mean(axis=0)
    ci = bootstrap_ci(y, pooled, "auroc", n_boot=n_boot, seed=seed, alpha=alpha, groups=groups)
    finite = per_fold[~np.isnan(per_fold)]
    return ProbeSummary(
        auroc=auroc(y, pooled),
        ci=(float(ci[0]), float(ci[1])),
        fold_auroc=per_fold,
        fold_mean=float(finite.mean()) if len(finite) else float("nan"),
        fold_std=float(finite.std()) if len(finite) else float("nan"),
        n=len(y),
        n_pos=int(y.sum()),
    )


def intervals_overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """True when the closed intervals ``a`` and ``b`` share a point (False when either is NaN)."""
    if any(np.isnan(v) for v in (*a, *b)):
        return False
    return bool(a[0] <= b[1] and b[0] <= a[1])


def probe_to_torch(probe) -> nn.Module:
    """A differentiable copy of a fitted :func:`make_probe` pipeline: features (B, F) -> logit (B, 1).

    The scaler is folded into the first linear layer, so ``sigmoid(module(f))`` equals
    ``probe.predict_proba(f)[:, 1]`` up to float32 rounding.

    Args:
        probe: a fitted pipeline from :func:`make_probe`.

    Returns:
        ``nn.Sequential`` in float32, in eval mode, with ``requires_grad`` False on its parameters.
    """
    scaler, estimator = probe[0], probe[-1]
    mean = np.asarray(scaler.mean_, dtype=np.float64)
    scale = np.asarray(scaler.scale_, dtype=np.float64)
    if hasattr(estimator, "coef_"):
        weights, biases = [estimator.coef_.T], [estimator.intercept_]
    elif hasattr(estimator, "coefs_"):
        weights, biases = list(estimator.coefs_), list(estimator.intercepts_)
        if getattr(estimator, "activation", "relu") != "relu":
            raise ValueError("only ReLU MLP probes can be converted; build the probe with make_probe('mlp')")
    else:
        raise ValueError("probe_to_torch expects a fitted pipeline from make_probe")
    layers: list[nn.Module] = []
    for i, (w, b) in enumerate(zip(weights, biases)):
        w, b = np.asarray(w, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if i == 0:  # (f - mean) / scale @ w + b  ==  f @ (w / scale) + (b - (mean / scale) @ w)
            b = b - (mean / scale) @ w
            w = w / scale[:, None]
        linear = nn.Linear(w.shape[0], w.shape[1])
        with torch.no_grad():
            linear.weight.copy_(torch.as_tensor(w.T, dtype=torch.float32))
            linear.bias.copy_(torch.as_tensor(b, dtype=torch.float32))
        layers.append(linear)
        if i < len(weights) - 1:
            layers.append(nn.ReLU())
    module = nn.Sequential(*layers).eval()
    module.requires_grad_(False)
    return module


@dataclass
class GenerationMetrics:
    """Agreement of generated with true signals, per record and lead.

    Attributes:
        pearson: (N, L) Pearson correlation over time (NaN where either signal is constant).
        rmse: (N, L) root mean squared error over time.
    """

    pearson: np.ndarray
    rmse: np.ndarray

    def table(self, lead_names: Sequence[str]) -> pd.DataFrame:
        """Per-lead means (and an ``"all"`` row): columns lead, pearson_r, pearson_r_std, rmse, rmse_std, n."""
        rows = []
        for j, lead in [*enumerate(lead_names), (None, "all")]:
            r = self.pearson[:, j] if j is not None else self.pearson.ravel()
            e = self.rmse[:, j] if j is not None else self.rmse.ravel()
            ok = ~np.isnan(r)
            rows.append(
                {
                    "lead": lead,
                    "pearson_r": float(np.mean(r[ok])) if ok.any() else float("nan"),
                    "pearson_r_std": float(np.std(r[ok])) if ok.any() else float("nan"),
                    "rmse": float(np.mean(e)),
                    "rmse_std": float(np.std(e)),
                    "n": int(ok.sum()),
                }
            )
        return pd.DataFrame(rows)


def generation_metrics(pred: np.ndarray, true: np.ndarray) -> GenerationMetrics:
    """Per-record, per-lead Pearson r and RMSE of generated signals.

    Args:
        pred: (N, L, T) generated signals.
        true: (N, L, T) true signals.

    Returns:
        :class:`GenerationMetrics` with (N, L) arrays.
    """
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(true, dtype=np.float64)
    if p.shape != t.shape or p.ndim != 3:
        raise ValueError(f"pred and true must both be (N, L, T); got {p.shape} and {t.shape}")
    rmse = np.sqrt(((p - t) ** 2).mean(-1))
    pc = p - p.mean(-1, keepdims=True)
    tc = t - t.mean(-1, keepdims=True)
    den = np.sqrt((pc**2).sum(-1) * (tc**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 1e-12, (pc * tc).sum(-1) / den, np.nan)
    return GenerationMetrics(r, rmse)


@dataclass
class LinearLeadMap:
    """Least-squares map from input leads to target leads, shared by every time sample.

    Attributes:
        weight: (L_out, L_in) coefficients.
        bias: (L_out,) intercepts.
    """

    weight: np.ndarray
    bias: np.ndarray

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """Apply the map: inputs (N, L_in, T) -> (N, L_out, T)."""
        x = np.asarray(inputs, dtype=np.float64)
        return np.einsum("oi,nit->not", self.weight, x) + self.bias[None, :, None]


def fit_linear_lead_map(inputs: np.ndarray, targets: np.ndarray, ridge: float = 0.0) -> LinearLeadMap:
    """Fit ``target_o(t) = sum_i w_oi * input_i(t) + b_o`` by (ridge) least squares over all records and samples.

    Limb leads are linear combinations of two of them (Einthoven, Goldberger), so the input matrix is rank-deficient;
    the minimum-norm solution (``numpy.linalg.lstsq``) or a small ``ridge`` handles that.

    Args:
        inputs: (N, L_in, T) input leads of the training records.
        targets: (N, L_out, T) target leads of the same records.
        ridge: L2 penalty on the weights (0 = ordinary least squares).

    Returns:
        :class:`LinearLeadMap`.
    """
    x = np.asarray(inputs, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    if x.ndim != 3 or y.ndim != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"inputs (N, L_in, T) and targets (N, L_out, T) must agree; got {x.shape} and {y.shape}")
    design = x.transpose(0, 2, 1).reshape(-1, x.shape[1])  # (N*T, L_in)
    target = y.transpose(0, 2, 1).reshape(-1, y.shape[1])  # (N*T, L_out)
    mean_x, mean_y = design.mean(0), target.mean(0)
    xc, yc = design - mean_x, target - mean_y
    if ridge > 0:
        gram = xc.T @ xc + ridge * np.eye(xc.shape[1])
        w = np.linalg.solve(gram, xc.T @ yc)
    else:
        w = np.linalg.lstsq(xc, yc, rcond=None)[0]
    return LinearLeadMap(weight=w.T, bias=mean_y - mean_x @ w)


@torch.no_grad()
def generate_leads(
    model: nn.Module, x: np.ndarray, input_leads: Sequence[str], window: int = 0, batch_size: int = 64
) -> np.ndarray:
    """Every lead of the model generated from ``input_leads`` alone, window by window for a windowed model.

    The model encodes only the given leads (e.g. the six limb leads) and decodes all of its leads at the posterior
    mean. A model pre-trained on windows (``input_dim`` = ``window``) generates each window of the record (the
    covering windows of :func:`kale_ext.loaddata.windows.window_starts`); overlapping samples are averaged.

    Args:
        model: a multimodal VAE (``model(x, leads=..., sample=False).recon`` of shape (B, len(model.lead_names), W)).
        x: (N, len(input_leads), T) input signals.
        input_leads: names of the channels of ``x``.
        window: the model's window (0 = whole records).
        batch_size: records per forward pass.

    Returns:
        (N, len(model.lead_names), T) generated signals.
    """
    x = np.asarray(x, dtype=np.float32)
    length = x.shape[-1]
    width = check_window(window, length)
    out = np.zeros((x.shape[0], len(model.lead_names), length), dtype=np.float64)
    count = np.zeros(length)
    was_training = model.training
    model.eval()
    for start in window_starts(length, width):
        count[start : start + width] += 1
        for b in range(0, len(x), batch_size):
            xb = torch.as_tensor(x[b : b + batch_size, :, start : start + width])
            recon = model(xb, leads=tuple(input_leads), sample=False).recon
            out[b : b + batch_size, :, start : start + width] += recon.float().cpu().numpy()
    model.train(was_training)
    return out / count


class ArraySignals(Dataset):
    """In-memory signals with every lead present and a label per record (items for ``fit_classifier``).

    Args:
        x: (N, L, T) signals.
        y: (N,) integer labels.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
        self.y = torch.as_tensor(np.asarray(y), dtype=torch.long)

    def __len__(self) -> int:
        """Number of records."""
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        """``signals`` (L, T), ``mask`` (L,) all True, ``label``."""
        return {"signals": self.x[i], "mask": torch.ones(self.x.shape[1], dtype=torch.bool), "label": self.y[i]}


def present_mask(input_leads: Sequence[str], present: Sequence[str], n: int) -> torch.Tensor:
    """(n, len(input_leads)) bool, True for the channels named in ``present`` (the same for every record)."""
    keep = torch.tensor([lead in present for lead in input_leads], dtype=torch.bool)
    return keep.expand(n, -1).clone()


@torch.no_grad()
def frozen_features(
    model: nn.Module,
    x: np.ndarray,
    input_leads: Sequence[str],
    present: Sequence[str],
    mode: str,
    window: int = 0,
    batch_size: int = 64,
) -> np.ndarray:
    """Features (N, F) of a frozen model with only the ``present`` leads unmasked.

    Args:
        model: a pre-trained model (see :class:`kale_ext.predict.heads.LatentFeatureExtractor`).
        x: (N, len(input_leads), T) whole records.
        input_leads: names of the channels of ``x``.
        present: the leads left unmasked (others are absent, never zero-filled evidence).
        mode: feature mode of the extractor (``fused_mean``, ``concat_means`` or ``pooled``).
        window: the model's pre-training window (every window of a record is pooled); 0 = whole records.
        batch_size: records per forward pass.

    Returns:
        float64 array (N, F).
    """
    ext = LatentFeatureExtractor(model, tuple(input_leads), mode, window=window).eval()
    out = []
    for s in range(0, len(x), batch_size):
        xb = torch.as_tensor(np.asarray(x[s : s + batch_size]), dtype=torch.float32)
        out.append(ext(xb, present_mask(input_leads, present, len(xb))).numpy())
    return np.concatenate(out).astype(np.float64)


@torch.no_grad()
def classifier_probability(
    net: nn.Module, x: np.ndarray, input_leads: Sequence[str], present: Sequence[str] | None = None
) -> np.ndarray:
    """Positive-class probability (N,) of a classifier ``net(x, mask) -> logits (N, 2)`` with ``present`` leads.

    Args:
        net: e.g. :class:`kale_ext.pipeline.finetune.MaskedInputClassifier` (put in eval mode here).
        x: (N, len(input_leads), T) signals.
        input_leads: names of the channels of ``x``.
        present: leads left unmasked (default: all of ``input_leads``).

    Returns:
        float array (N,).
    """
    xb = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    mask = present_mask(input_leads, input_leads if present is None else present, len(xb))
    return torch.softmax(net.eval()(xb, mask).float(), dim=1)[:, 1].numpy()
