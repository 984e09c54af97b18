"""Fine-tuning and cross-validation: a head on frozen pre-trained encoders, or supervised networks end to end.

The paper's recipe (Suvon et al., arXiv 2503.13470): the pre-trained VAE is frozen, a two-layer head (128 hidden
units, dropout 0.5) is trained with focal loss, AdamW, learning rate 1e-4, batch 32, 50 epochs, under 5-fold
cross-validation. Because the encoders are frozen and label-free, their features are computed once for all labelled
records (``extract_features``) and sliced per fold: this equals computing them once per fold and costs a fifth.

Supervised baselines (ResNet1d, xResNet1d, Multimodal-CNN) go through the same loop (``fit_classifier``) with the
signals as input. Everything derived from labels (focal alpha, decision threshold) comes from each fold's training
part only. Training is seeded through a forked RNG (``torch.random.fork_rng``), so the caller's global random state
is untouched and the same seed gives the same folds, weights and metrics on CPU.

Focal loss: gamma = 2 (Lin et al. 2017; the paper reports none) and alpha = the negative-class share of the fold's
training part (``kale_ext.evaluate.cross_validation.class_balance_alpha``), i.e. inverse class frequency; a fixed
alpha, or plain cross-entropy (the authors' code), are options.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from kale_ext.evaluate.cross_validation import class_balance_alpha, fold_split
from kale_ext.evaluate.metrics import binary_metrics, choose_threshold
from kale_ext.predict.heads import ClassificationHead
from kale_ext.predict.losses import FocalLoss

logger = logging.getLogger(__name__)


@dataclass
class FinetuneSettings:
    """Settings of classifier training (defaults: the paper's fine-tuning recipe).

    Attributes:
        epochs: passes over the training part.
        batch_size: mini-batch size.
        lr: learning rate.
        weight_decay: weight decay (AdamW) / L2 (Adam).
        optimizer: "adamw" or "adam".
        loss: "focal" or "cross_entropy".
        focal_gamma: focusing parameter of the focal loss.
        focal_alpha: positive-class weight; None = class balance of the training part.
        threshold: "youden", "argmax" or a number; chosen on the training part.
        hidden_dim: hidden units of the head.
        dropout: dropout of the head.
        seed: seed of initialisation and batch order.
        device: torch device.
        progress: show progress bars.
    """

    epochs: int = 50
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 1e-2
    optimizer: str = "adamw"
    loss: str = "focal"
    focal_gamma: float = 2.0
    focal_alpha: float | None = None
    threshold: str | float = "youden"
    hidden_dim: int = 128
    dropout: float = 0.5
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


class _FeatureSet(Dataset):
    """Precomputed features with labels: items ``{"features": (F,), "label": int}``."""

    def __init__(self, features: np.ndarray, labels: np.ndarray):
        self.features = torch.as_tensor(np.asarray(features), dtype=torch.float32)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"features": self.features[i], "label": self.labels[i]}


class MaskedInputClassifier(nn.Module):
    """Give a supervised network the ``forward(x, mask) -> logits`` interface of the fine-tuned classifiers.

    Networks that take a mask receive it; others receive the signals with absent leads set to zero (the mask is
    the only record of absence; the zeros are what such a network can be given).

    Args:
        net: module mapping (B, L, T) (and optionally a (B, L) mask) to logits (B, C).
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        try:
            self._takes_mask = "mask" in inspect.signature(net.forward).parameters
        except (TypeError, ValueError):
            self._takes_mask = False

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits.

        Args:
            x: (batch, leads, time).
            mask: (batch, leads) bool, True = present, or None (all present).

        Returns:
            logits: (batch, classes).
        """
        if self._takes_mask:
            return self.net(x, mask=mask)
        if mask is not None:
            x = torch.where(mask.bool().unsqueeze(-1), x, torch.zeros_like(x))
        return self.net(x)


def _forward(model: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
    if "features" in batch:
        return model(batch["features"].to(device))
    mask = batch.get("mask")
    return model(batch["signals"].to(device).float(), None if mask is None else mask.to(device).bool())


def _positive_prob(logits: torch.Tensor) -> torch.Tensor:
    if logits.dim() == 1 or logits.shape[-1] == 1:
        return torch.sigmoid(logits.reshape(-1))
    return torch.softmax(logits.float(), dim=-1)[:, 1]


def make_loss(settings: FinetuneSettings, train_labels: np.ndarray) -> nn.Module:
    """The classification loss of a fold, with focal alpha from the fold's training labels when not fixed."""
    if settings.loss == "cross_entropy":
        return nn.CrossEntropyLoss()
    if settings.loss != "focal":
        raise ValueError(f"loss {settings.loss!r} is not accepted; use 'focal' or 'cross_entropy'")
    alpha = settings.focal_alpha
    if alpha is None or alpha < 0:
        alpha = class_balance_alpha(train_labels)
    return FocalLoss(alpha=float(alpha), gamma=settings.focal_gamma)


def _optimizer(model: nn.Module, settings: FinetuneSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr)
    raise ValueError(f"optimizer {settings.optimizer!r} is not accepted; use 'adamw' or 'adam'")


class ClassifierModule(pl.LightningModule):
    """Lightning wrapper of a classifier: the fine-tuning loss, the optimiser, per-epoch loss logging.

    Args:
        model: classifier; called as ``model(features)`` for items with ``features``, else ``model(signals, mask)``.
        loss_fn: classification loss ``loss_fn(logits, labels)``.
        settings: ``FinetuneSettings`` (optimiser, learning rate, weight decay).
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, settings: FinetuneSettings):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.settings = settings

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Loss of one mini-batch, logged as the epoch mean."""
        logits = _forward(self.model, batch, self.device)
        loss = self.loss_fn(logits, batch["label"])
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The optimiser of the fine-tuning recipe over the trainable parameters."""
        return _optimizer(self.model, self.settings)


def fit_classifier(
    model: nn.Module,
    dataset: Dataset,
    labels: np.ndarray,
    settings: FinetuneSettings,
    description: str = "fine-tune",
    log_dir: str | Path | None = None,
) -> nn.Module:
    """Train ``model`` on ``dataset`` (features or signals) with the fine-tuning recipe, through Lightning.

    The batch order comes from a generator seeded with ``settings.seed`` and the global generators are seeded with
    it inside a forked RNG, so the same seed gives the same weights and the caller's random state is untouched.

    Args:
        model: classifier; called as ``model(features)`` for items with ``features``, else ``model(signals, mask)``.
        dataset: items with ``label`` and either ``features`` (F,) or ``signals`` (L, T) and ``mask`` (L,).
        labels: (N,) labels of ``dataset`` (for the focal alpha of this training part).
        settings: ``FinetuneSettings``.
        description: name of the run in the logs.
        log_dir: folder of this run's TensorBoard and CSV logs; None = no logs.

    Returns:
        The trained model (same object), in eval mode.
    """
    loss_fn = make_loss(settings, np.asarray(labels))
    generator = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=True, generator=generator)
    loggers = []
    if log_dir is not None:
        loggers = [
            TensorBoardLogger(Path(log_dir), name="tensorboard", version=description),
            CSVLogger(Path(log_dir), name="csv", version=description),
        ]
    device = torch.device(settings.device)
    trainer = pl.Trainer(
        max_epochs=settings.epochs,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        logger=loggers or False,
        enable_checkpointing=False,
        enable_progress_bar=settings.progress,
        enable_model_summary=False,
        log_every_n_steps=max(len(loader), 1),
        num_sanity_val_steps=0,
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        torch.manual_seed(settings.seed)
        model.train()  # Lightning keeps the mode a module arrives in; a frozen extractor stays in eval mode
        trainer.fit(ClassifierModule(model, loss_fn, settings), train_dataloaders=loader)
    return model.to(device).eval()


@torch.no_grad()
def predict_proba(model: nn.Module, dataset: Dataset, batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """Positive-class probabilities (N,) of ``model`` over ``dataset`` (features or signals items)."""
    model.to(device).eval()
    out = [
        _positive_prob(_forward(model, batch, torch.device(device))).float().cpu()
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator())
    ]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


@torch.no_grad()
def extract_features(
    extractor: nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
) -> np.ndarray:
    """Features of every item of ``dataset`` through a frozen extractor.

    Args:
        extractor: module ``(x (B,L,T), mask (B,L)) -> (B, F)``, e.g. ``LatentFeatureExtractor``.
        dataset: items with ``signals`` (L, T) and ``mask`` (L,).
        batch_size: batch size.
        device: torch device.
        progress: show a progress bar.

    Returns:
        (N, F) float32 array.
    """
    extractor.to(device).eval()
    chunks = []
    # a private generator: creating the iterator must not draw from the global one
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator())
    for batch in tqdm(loader, desc="features", disable=not progress, leave=False):
        x = batch["signals"].to(device).float()
        mask = batch["mask"].to(device).bool()
        chunks.append(extractor(x, mask).float().cpu())
    return torch.cat(chunks).numpy()


@dataclass
class FoldOutcome:
    """One fold: its test indices, threshold (from its training part), test probabilities and trained model."""

    fold: int
    train_idx: np.ndarray
    test_idx: np.ndarray
    threshold: float
    test_prob: np.ndarray
    model: nn.Module
    metrics: dict = field(default_factory=dict)


@dataclass
class CrossValidationResult:
    """Out-of-fold predictions of all records and the per-fold outcomes."""

    folds: np.ndarray
    prob: np.ndarray
    threshold: np.ndarray
    outcomes: list[FoldOutcome]


def cross_validate(
    make_model: Callable[[], nn.Module],
    dataset: Dataset,
    labels: np.ndarray,
    folds: np.ndarray,
    settings: FinetuneSettings,
    on_fold_end: Callable[[FoldOutcome], None] | None = None,
    skip_fold: Callable[[int], FoldOutcome | None] | None = None,
    log_dir: str | Path | None = None,
) -> CrossValidationResult:
    """Train and score one classifier per fold.

    For fold k: train on the other folds, choose the threshold on the training part's own predictions, and
    predict the held-out fold. The model is built by ``make_model()`` inside a forked RNG seeded with
    ``settings.seed + k``.

    Args:
        make_model: builds a fresh classifier (a head on features, or a supervised net wrapped in
            ``MaskedInputClassifier``).
        dataset: all labelled items (features or signals).
        labels: (N,) labels.
        folds: (N,) fold id per item (from ``make_folds``).
        settings: ``FinetuneSettings``.
        on_fold_end: called with each finished fold (e.g. to save its model).
        skip_fold: returns a finished ``FoldOutcome`` to reuse instead of training fold k, or None.
        log_dir: folder of the per-fold TensorBoard/CSV logs (``fold<k>`` versions); None = no logs.

    Returns:
        ``CrossValidationResult`` with out-of-fold probabilities and each item's fold threshold.
    """
    labels = np.asarray(labels).astype(np.int64)
    folds = np.asarray(folds)
    prob = np.full(len(labels), np.nan)
    thresholds = np.full(len(labels), np.nan)
    outcomes = []
    for k in sorted(np.unique(folds).tolist()):
        outcome = skip_fold(k) if skip_fold is not None else None
        if outcome is None:
            train_idx, test_idx = fold_split(folds, k)
            fold_settings = FinetuneSettings(**{**settings.__dict__, "seed": settings.seed + k})
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(fold_settings.seed)
                model = make_model()
            fit_classifier(
                model,
                Subset(dataset, train_idx.tolist()),
                labels[train_idx],
                fold_settings,
                description=f"fold{k}",
                log_dir=log_dir,
            )
            train_prob = predict_proba(model, Subset(dataset, train_idx.tolist()), device=settings.device)
            threshold = choose_threshold(labels[train_idx], train_prob, settings.threshold)
            test_prob = predict_proba(model, Subset(dataset, test_idx.tolist()), device=settings.device)
            outcome = FoldOutcome(k, train_idx, test_idx, float(threshold), test_prob, model.cpu())
            outcome.metrics = binary_metrics(labels[test_idx], test_prob, threshold)
            logger.info("fold %d: %s", k, {m: round(v, 3) for m, v in outcome.metrics.items()})
            if on_fold_end is not None:
                on_fold_end(outcome)
        prob[outcome.test_idx] = outcome.test_prob
        thresholds[outcome.test_idx] = outcome.threshold
        outcomes.append(outcome)
    return CrossValidationResult(folds=folds, prob=prob, threshold=thresholds, outcomes=outcomes)


def head_factory(in_features: int, settings: FinetuneSettings) -> Callable[[], nn.Module]:
    """A ``make_model`` for ``cross_validate`` building the paper's head on ``in_features`` features."""

    def make() -> nn.Module:
        return ClassificationHead(in_features, 2, settings.hidden_dim, settings.dropout)

    return make


def feature_dataset(features: np.ndarray, labels: Sequence[int] | np.ndarray) -> Dataset:
    """Wrap precomputed features (N, F) and labels (N,) as a dataset for ``cross_validate``."""
    return _FeatureSet(features, np.asarray(labels))
