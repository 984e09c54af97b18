"""Self-supervised pre-training of a multimodal ECG model with PyTorch Lightning.

``PretrainModule(model, objective)`` trains any model with any objective of :mod:`kale_ext.predict.objectives`
(the paper's ELBO + alignment, the authors' reference objective, ...): the training step asks the objective for the
loss of a batch and never branches on a mode. The objective's parameters, if any, are optimised with the model's.

Exact resume: ``EpochSeededSampler`` draws each epoch's order from ``seed + epoch`` (and shards it across DDP ranks
without overlap) and ``ReseedCallback`` reseeds the global generators (reparameterisation noise, dropout) at the start
of every epoch, so a run killed after an epoch checkpoint and resumed from ``last.ckpt`` ends with the same weights as
an uninterrupted run. Checkpoints are read with ``weights_only=True``; the trained model is saved and loaded by
:mod:`kale_ext.pipeline.artifacts`.

Windowed pre-training (``PretrainSettings.window`` > 0): every training step crops a fresh uniform random window of
every record on the device (the start is drawn from torch's global generator, which ``ReseedCallback`` reseeds per
step, so a resumed run crops the same windows); validation uses every window of each held-out record.

What a run shows per epoch (logged to CSV/TensorBoard and as one line of the run log): the Pearson r between the
posterior-mean reconstruction and the input over present leads, on held-out subjects (``val/recon_r``) and on a fixed
subset of the training records (``train/recon_r``, measured the same way), and, for 12-lead models, the held-out
generation of V1-V6 from the six limb leads alone (``val/gen_r_6to12``). A held-out r far below the training r is
memorising; ``PretrainSettings.early_stop_patience`` stops on the held-out r and saves the best held-out epoch's
weights (``checkpoints/best.ckpt``) as the model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.seed import seed_everything
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from kale_ext.loaddata.batch_stream import BatchStream
from kale_ext.loaddata.leads import CANONICAL_LEADS, LIMB_LEADS
from kale_ext.loaddata.windows import all_windows, check_window, random_crop
from kale_ext.pipeline.artifacts import save_model
from kale_ext.predict.objectives import Objective, PretrainBatch, TrainingProgress

logger = logging.getLogger(__name__)

GATE_DIAGNOSTICS_FILE = "gate_diagnostics.csv"
BEST_CHECKPOINT = "best"  # checkpoints/best.ckpt: the best held-out epoch (kept with early stopping)

# Base seed of the validation draws (z, sub-ELBO subsets): batch k uses VAL_SEED + k.
VAL_SEED = 20_251_207

LOADERS = ("auto", "stream", "dataloader")
# Names of the validation loaders: held-out subjects, and a fixed subset of the training records (for train recon r).
HELD_OUT, TRAIN_PROBE = "held-out", "train"


# ---------------------------------------------------------------------------------------------------------------------
# Data: subject-wise split, seeded distributed sampler
# ---------------------------------------------------------------------------------------------------------------------
def split_by_subject(
    subject_ids: Sequence | np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split record indices into training and validation parts with no subject in both.

    Args:
        subject_ids: (N,) owner of each record; empty strings or NaN count as one subject per record.
        val_fraction: share of subjects held out (0 = no validation part).
        seed: seed of the subject permutation.

    Returns:
        (train_idx, val_idx), sorted int arrays.
    """
    ids = np.asarray(
        [str(s) if s is not None and str(s) not in ("", "nan") else f"__rec{i}" for i, s in enumerate(subject_ids)]
    )
    unique = np.unique(ids)
    n_val = int(round(len(unique) * val_fraction)) if val_fraction > 0 else 0
    if val_fraction > 0 and len(unique) > 1:
        n_val = min(max(n_val, 1), len(unique) - 1)
    order = np.random.default_rng(seed).permutation(len(unique))
    val_subjects = set(unique[order[:n_val]].tolist())
    is_val = np.array([s in val_subjects for s in ids], dtype=bool)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


class EpochSeededSampler(Sampler[int]):
    """Sampler whose order depends only on ``(seed, epoch)``, sharded across processes without overlap.

    Lightning calls ``set_epoch`` at the start of every training epoch (also after a resume), so the order of epoch
    k is the same in an interrupted-and-resumed run as in an uninterrupted one. With several replicas, every rank
    takes a disjoint slice of the epoch's permutation; the tail that does not divide evenly is dropped (training) so
    that ranks never see the same record in an epoch and run the same number of steps.

    Args:
        indices: (N,) dataset indices to draw from.
        seed: base seed.
        shuffle: permute per epoch (training) or keep the order (validation).
        num_replicas: number of processes.
        rank: this process.
        drop_last: drop the tail so every rank has the same count (else pad by repeating the first indices).
    """

    def __init__(
        self,
        indices: Sequence[int] | np.ndarray,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = True,
    ):
        self.indices = np.asarray(indices, dtype=np.int64)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.num_replicas = max(int(num_replicas), 1)
        self.rank = int(rank)
        self.drop_last = drop_last
        self.epoch = 0
        n = len(self.indices)
        if drop_last and self.num_replicas > 1:
            self.num_samples = n // self.num_replicas
        else:
            self.num_samples = math.ceil(n / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order is drawn next."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        """Yield this rank's indices for the current epoch."""
        order = self.indices
        if self.shuffle:
            order = order[np.random.default_rng(self.seed + self.epoch).permutation(len(order))]
        total = self.num_samples * self.num_replicas
        if total > len(order):  # pad (evaluation only) by wrapping around
            order = np.concatenate([order, order[: total - len(order)]])
        order = order[:total]
        return iter(order[self.rank : total : self.num_replicas].tolist())

    def __len__(self) -> int:
        """Number of indices this rank yields per epoch."""
        return self.num_samples


class _WithIndex(Dataset):
    """Adds the dataset index of each item under ``"index"`` (used to check DDP sharding)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.dataset[i])
        item["index"] = i
        return item


class ECGPretrainDataModule(pl.LightningDataModule):
    """Training/validation loaders over a lead dataset (e.g. ``ECGLeadDataset`` on a memory-mapped cache).

    The split is 90:10 by subject by default and seeded; the training order of every DDP rank is drawn from
    ``(seed, epoch)`` only. Two loaders give the same orders:

    - ``"stream"`` (:class:`~kale_ext.loaddata.batch_stream.BatchStream`, for datasets with ``read_signals``): whole
      batches read from the cache (float16 kept float16 up to the device), held on the GPU and gathered by index
      when the cache fits, else filled into reused pinned buffers by threads.
    - ``"dataloader"``: a per-item ``DataLoader`` with ``EpochSeededSampler`` (any map-style dataset).
    - ``"auto"``: the stream when the dataset supports it.

    Both keep a short last training batch, so the same records give the same number of optimiser steps per epoch
    (and the same beta warm-up) whichever loader serves them.

    Validation has up to two loaders (``val_names``): the held-out subjects, and, with ``train_probe``, a fixed
    seeded subset of the training records (as many as the held-out part, at least one batch) on which the training
    reconstruction is measured the same way as the held-out one.

    Args:
        dataset: map-style dataset whose items hold ``signals`` (L, T) and ``mask`` (L,); ``subject_ids`` attribute
            optional (else one subject per record).
        batch_size: per-process batch size.
        val_fraction: share of subjects for validation.
        seed: split and order seed.
        num_workers: DataLoader workers (``"dataloader"``) or reading threads (``"stream"``).
        loader: ``"auto"``, ``"stream"`` or ``"dataloader"``.
        resident: the stream's residency (``"auto"``, True, False).
        train_probe: add the training-subset validation loader.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        loader: str = "auto",
        resident: bool | str = "auto",
        train_probe: bool = False,
    ):
        super().__init__()
        if loader not in LOADERS:
            raise ValueError(f"loader {loader!r} is not accepted; use one of {LOADERS}")
        self.base = dataset
        self.dataset = _WithIndex(dataset)
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.use_stream = loader == "stream" or (loader == "auto" and hasattr(dataset, "read_signals"))
        self.resident = resident
        subjects = getattr(dataset, "subject_ids", None)
        if subjects is None:
            subjects = np.arange(len(dataset)).astype(str)
        self.train_idx, self.val_idx = split_by_subject(subjects, val_fraction, seed)
        n_probe = min(len(self.train_idx), max(len(self.val_idx), batch_size)) if train_probe else 0
        rng = np.random.default_rng(seed + 1)
        self.probe_idx = (
            np.sort(rng.choice(self.train_idx, size=n_probe, replace=False)) if n_probe else self.train_idx[:0]
        )
        self.val_names = tuple(
            name for name, idx in ((HELD_OUT, self.val_idx), (TRAIN_PROBE, self.probe_idx)) if len(idx)
        )

    def _loader(self, indices: np.ndarray, shuffle: bool):
        world = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        if self.use_stream:
            device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
            return BatchStream(
                self.base, indices, self.batch_size, self.seed, shuffle=shuffle, drop_last=shuffle,
                drop_last_batch=False, num_replicas=world, rank=rank, device=device, resident=self.resident,
                num_threads=max(self.num_workers, 1),
            )  # fmt: skip
        sampler = EpochSeededSampler(indices, self.seed, shuffle, world, rank, drop_last=shuffle)
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        """Loader of the training part (shuffled per epoch, sharded across ranks)."""
        return self._loader(self.train_idx, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """Loaders of ``val_names`` (fixed order): held-out subjects, then the training probe; [] when none."""
        parts = {HELD_OUT: self.val_idx, TRAIN_PROBE: self.probe_idx}
        loaders = [self._loader(parts[name], shuffle=False) for name in self.val_names]
        if len(loaders) == 1 and self.val_names == (HELD_OUT,):
            return loaders[0]
        return loaders


# ---------------------------------------------------------------------------------------------------------------------
# The Lightning module
# ---------------------------------------------------------------------------------------------------------------------
def lead_pearson_r(recon: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pearson r over time between a reconstruction and its input, per sample and lead.

    Args:
        recon: (B, L, T) reconstruction.
        target: (B, L, T) input.
        mask: (B, L) bool, leads to score (present ones).

    Returns:
        ``(r (B, L), valid (B, L) bool)``: r is 0 where not valid (masked, or a flat lead or reconstruction).
    """
    rc = recon.float() - recon.float().mean(-1, keepdim=True)
    tc = target.float() - target.float().mean(-1, keepdim=True)
    den = torch.sqrt((rc * rc).sum(-1) * (tc * tc).sum(-1))
    valid = mask.bool() & (den > 1e-12)
    r = torch.where(valid, (rc * tc).sum(-1) / den.clamp_min(1e-12), torch.zeros((), device=recon.device))
    return r, valid


def recon_line(epoch: int, epochs: int | None, values: dict[str, float]) -> str:
    """The run log's line of an epoch, e.g. ``epoch 3/20: recon r train 0.61 | held-out 0.58 | 6->12 r held-out 0.55``.

    Args:
        epoch: 1-based epoch number.
        epochs: planned epochs (None or negative = unknown).
        values: ``train/recon_r``, ``val/recon_r``, ``val/gen_r_6to12`` (any may be missing).

    Returns:
        One line of text.
    """

    def fmt(key: str) -> str:
        return f"{values[key]:.2f}" if key in values else "-"

    parts = [f"recon r train {fmt('train/recon_r')}", f"held-out {fmt('val/recon_r')}"]
    if "val/gen_r_6to12" in values:
        parts.append(f"6->12 r held-out {fmt('val/gen_r_6to12')}")
    total = f"/{epochs}" if epochs is not None and epochs >= 0 else ""
    return f"epoch {epoch}{total}: " + " | ".join(parts)


def _scalars(losses: dict) -> dict:
    """The loggable terms of an objective's output: scalar tensors, not ``beta`` or auxiliary outputs."""
    return {k: v for k, v in losses.items() if k != "beta" and isinstance(v, torch.Tensor) and v.dim() == 0}


class PretrainModule(pl.LightningModule):
    """Pre-train a model with an objective: AdamW over the model's (and the objective's) parameters.

    Args:
        model: a ``MultimodalVAE`` (or any model the objective knows how to score) with ``lead_names``.
        objective: an :class:`~kale_ext.predict.objectives.Objective`; ``objective(model, batch, progress)``
            returns the loss terms of a batch.
        leads: names of the channels in the batches' ``signals`` (default ``model.lead_names``).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        compile: run the model's forward through ``torch.compile`` (the parameters, state dict and checkpoints are
            unchanged; on a GPU this is where the block-diagonal convolutions pay off, see docs/models.md).
        fused_optimizer: use the fused AdamW kernel when every parameter is on a GPU.
        diagnostics_dir: folder of ``gate_diagnostics.csv`` (per epoch: mean gate weight per expert and mean
            per-sample gate entropy, for fusions with a learned gate); None = logged only.
        window: samples per training window (0 = whole records): each training step sees a fresh uniform random
            window of every record, validation every window of each record. The model's input length must be
            ``window``.
        augment: ``augment(signals (B, L', T), mask (B, L')) -> signals``, applied to the model's INPUT of training
            batches only (e.g. :class:`kale_ext.prepdata.corruption.LeadCorruption`); the reconstruction target
            stays the clean batch, so the model learns to explain a corrupted lead by the clean ones. None = off.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        leads: Sequence[str] | None = None,
        lr: float = 1e-4,
        weight_decay: float = 1e-5,
        compile: bool = False,
        fused_optimizer: bool = True,
        diagnostics_dir: str | Path | None = None,
        window: int = 0,
        augment: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        if int(window) < 0:
            raise ValueError(f"window = {window} is not accepted; use 0 (whole records) or a number of samples")
        self.window = int(window)
        self._r_sums: dict[str, torch.Tensor] = {}
        self.augment = augment
        self.fused_optimizer = fused_optimizer
        self.diagnostics_dir = diagnostics_dir
        self._gate_sums = None
        self.model = model
        self.objective = objective
        # A compiled view of the same forward: the module and its parameters stay as they are.
        self._forward = torch.compile(model.forward) if compile else model.forward
        self.leads = tuple(leads) if leads is not None else tuple(model.lead_names)
        unknown = [lead for lead in self.leads if lead not in model.lead_names]
        if unknown:
            raise ValueError(f"leads {unknown} have no encoder in the model (model leads: {model.lead_names})")
        self.lr = lr
        self.weight_decay = weight_decay
        # positions of the batch channels among the model's leads, to build full-width targets
        self.register_buffer(
            "_slot", torch.tensor([list(model.lead_names).index(lead) for lead in self.leads]), persistent=False
        )
        self.save_hyperparameters(ignore=["model", "objective", "diagnostics_dir", "augment"])
        # Reconstruction r needs a model that encodes, fuses and decodes at the posterior mean (the lead VAEs).
        self.measures_recon = all(hasattr(model, name) for name in ("encode", "fuse", "decode"))
        self.measures_generation = self.measures_recon and set(CANONICAL_LEADS) <= set(self.leads)

    def progress(self) -> TrainingProgress:
        """Step, epoch and steps per epoch (1 without a trainer) for the objective's schedules."""
        steps_per_epoch = 1
        if self._trainer is not None and self.trainer.num_training_batches not in (None, float("inf")):
            steps_per_epoch = max(int(self.trainer.num_training_batches), 1)
        epoch = int(self.current_epoch) if self._trainer is not None else 0
        return TrainingProgress(int(self.global_step), epoch, steps_per_epoch)

    def current_beta(self) -> float:
        """KL weight of the objective at the current step."""
        return self.objective.beta(self.progress())

    def _full_width(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Place (B, L', T) batch channels into the model's (B, L, T) lead slots; missing slots are masked out."""
        n_model = len(self.model.lead_names)
        if len(self.leads) == n_model and torch.equal(self._slot, torch.arange(n_model, device=self._slot.device)):
            return x, mask
        target = x.new_zeros(x.shape[0], n_model, x.shape[-1])
        full_mask = torch.zeros(x.shape[0], n_model, dtype=torch.bool, device=x.device)
        target[:, self._slot] = x
        full_mask[:, self._slot] = mask
        return target, full_mask

    def compute_losses(self, batch: dict, sample: bool = True, augment: bool = False) -> dict[str, torch.Tensor]:
        """All loss terms of one batch.

        Args:
            batch: ``signals`` (B, L', T) float, ``mask`` (B, L') bool.
            sample: draw z from the fused posterior or use its mean.
            augment: pass the model's input through ``self.augment`` (the target stays clean).

        Returns:
            dict with ``loss``, ``recon``, ``kl``, ``align`` (scalars), ``beta`` and any further terms of the
            objective.
        """
        x = batch["signals"].float()
        mask = batch["mask"].bool()
        target, full_mask = self._full_width(x, mask)
        inputs = self.augment(x, mask) if augment and self.augment is not None else x
        view = PretrainBatch(inputs, mask, self.leads, target, full_mask, sample, self._forward)
        return self.objective(self.model, view, self.progress())

    def crop_batch(self, batch: dict, train: bool) -> dict:
        """The batch as the model sees it: a random window per record (training), every window (evaluation).

        Args:
            batch: ``signals`` (B, L', T), ``mask`` (B, L').
            train: one fresh uniform random window per record (torch's global generator) or all windows.

        Returns:
            ``batch`` itself for whole records (``window`` 0 or T), else a dict with ``signals`` (B', L', window)
            and ``mask`` (B', L'), B' = B (training) or n_windows * B (evaluation, window-major).
        """
        x = batch["signals"]
        if self.window == 0 or check_window(self.window, x.shape[-1]) == x.shape[-1]:
            return batch
        if train:
            return {**batch, "signals": random_crop(x, self.window)}
        windows = all_windows(x, self.window)
        return {
            "signals": windows.reshape(-1, *windows.shape[2:]),
            "mask": batch["mask"].repeat(windows.shape[0], 1),
        }

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One optimisation step; logs step values locally and epoch means synchronised across processes."""
        batch = self.crop_batch(batch, train=True)
        losses = self.compute_losses(batch, sample=True, augment=True)
        size = batch["signals"].shape[0]
        self.log("train/loss_step", losses["loss"], on_step=True, on_epoch=False, prog_bar=True, batch_size=size)
        for name, value in _scalars(losses).items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, sync_dist=True, batch_size=size)
        fusion = losses.get("fusion")
        if fusion is not None and getattr(fusion, "gate_logits", None) is not None:
            self._accumulate_gate(fusion.weights.detach().float(), fusion.expert_mask)
        self.log("train/beta", float(losses["beta"]), on_step=True, on_epoch=False, batch_size=size)
        return losses["loss"]

    def _accumulate_gate(self, weights: torch.Tensor, mask: torch.Tensor) -> None:
        """Add a batch's gate weights (K, B) to the epoch's sums: weight per expert, per-sample entropy."""
        w = torch.where(mask, weights, torch.zeros((), device=weights.device))
        entropy = -(w * torch.log(w.clamp_min(1e-12))).sum(0)  # (B,) nats
        sums = torch.cat([w.sum(1), entropy.sum().view(1), w.new_full((1,), float(w.shape[1]))])  # no host copy
        self._gate_sums = sums if self._gate_sums is None else self._gate_sums + sums

    def on_train_epoch_end(self) -> None:
        """Log and write the epoch's gate diagnostics: mean weight per expert and mean per-sample entropy."""
        if self._gate_sums is None:
            return
        sums, self._gate_sums = self._gate_sums, None
        count = sums[-1].clamp_min(1.0)
        means, entropy = (sums[:-2] / count).tolist(), float(sums[-2] / count)
        names = list(self.model.lead_names)
        names = names + ["shared (PoE)"] if len(means) == len(names) + 1 else [f"expert {k}" for k in range(len(means))]
        for name, value in zip(names, means):
            self.log(f"gate/{name}", value, on_step=False, on_epoch=True, sync_dist=True)
        self.log("gate/entropy", entropy, on_step=False, on_epoch=True, sync_dist=True)
        if self.diagnostics_dir is not None and self.trainer.is_global_zero:
            path = Path(self.diagnostics_dir) / GATE_DIAGNOSTICS_FILE
            new = not path.exists() or self.current_epoch == 0
            with open(path, "w" if new else "a", encoding="utf-8") as fh:
                if new:
                    fh.write("epoch,expert,mean_weight,entropy_nats\n")
                for name, value in zip(names, means):
                    fh.write(f"{self.current_epoch},{name},{value:.6f},{entropy:.6f}\n")

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Validation loss as in training, and reconstruction r at the posterior mean (every window of each record).

        The held-out loader logs the objective's terms (``val/...``: z drawn from the posterior as in training, a
        one-sample ELBO estimate on clean inputs), its reconstruction r and 6->12 generation r; the training probe
        only its reconstruction r. The validation draws come from a generator seeded by the batch index inside a
        forked random state, so the estimate uses the same noise at every epoch and training's random stream is
        untouched.
        """
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        names = getattr(datamodule, "val_names", None) or (HELD_OUT,)
        part = names[dataloader_idx]
        batch = self.crop_batch(batch, train=False)
        if part == HELD_OUT:
            devices = [batch["signals"].device] if batch["signals"].is_cuda else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(VAL_SEED + batch_idx)
                losses = self.compute_losses(batch, sample=True)
            size = batch["signals"].shape[0]
            for name, value in _scalars(losses).items():
                self.log(
                    f"val/{name}",
                    value,
                    on_step=False,
                    on_epoch=True,
                    sync_dist=True,
                    prog_bar=name == "loss",
                    batch_size=size,
                    add_dataloader_idx=False,
                )
        if self.measures_recon:
            self._add_recon_r(batch, part)

    def _add_recon_r(self, batch: dict, part: str) -> None:
        """Add a batch's per-lead reconstruction r (and, held out, the 6->12 generation r) to the epoch's sums."""
        x = batch["signals"].float()
        mask = batch["mask"].bool()
        target, full_mask = self._full_width(x, mask)
        out = self._forward(x, mask=mask, leads=self.leads, sample=False)
        r, valid = lead_pearson_r(out.recon, target, full_mask)
        prefix = "val" if part == HELD_OUT else "train"
        self._add_sum(f"{prefix}/recon_r", r, valid)
        if part == HELD_OUT and self.measures_generation:
            limb = torch.tensor([lead in LIMB_LEADS for lead in self.leads], device=mask.device)
            limb_mask = mask & limb
            if bool(limb_mask.any()):
                out = self._forward(x, mask=limb_mask, leads=self.leads, sample=False)
                precordial = torch.tensor(
                    [lead in CANONICAL_LEADS[6:] for lead in self.model.lead_names], device=mask.device
                )
                scored = full_mask & precordial & limb_mask.any(1, keepdim=True)
                r, valid = lead_pearson_r(out.recon, target, scored)
                self._add_sum("val/gen_r_6to12", r, valid)

    def _add_sum(self, name: str, r: torch.Tensor, valid: torch.Tensor) -> None:
        # torch.where, not boolean indexing: no host synchronisation per batch
        sums = torch.stack(
            [torch.where(valid, r, torch.zeros((), device=r.device)).double().sum(), valid.double().sum()]
        )
        self._r_sums[name] = sums if name not in self._r_sums else self._r_sums[name] + sums.to(self._r_sums[name])

    def on_validation_epoch_start(self) -> None:
        """Start the epoch's reconstruction sums afresh, with the same keys on every process (reduced together)."""
        self._r_sums = {}
        if not self.measures_recon:
            return
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        names = getattr(datamodule, "val_names", None) or (HELD_OUT,)
        keys = [f"{'val' if part == HELD_OUT else 'train'}/recon_r" for part in names]
        if HELD_OUT in names and self.measures_generation:
            keys.append("val/gen_r_6to12")
        self._r_sums = {key: torch.zeros(2, dtype=torch.float64, device=self.device) for key in keys}

    def on_validation_epoch_end(self) -> None:
        """Log the epoch's reconstruction r (summed over processes) and one readable line in the run log."""
        if not self._r_sums:
            return
        values = {}
        for name, sums in sorted(self._r_sums.items()):
            total = self.trainer.strategy.reduce(sums, reduce_op="sum") if self.trainer.world_size > 1 else sums
            if float(total[1]) > 0:
                values[name] = float(total[0] / total[1])
                self.log(name, values[name], on_step=False, on_epoch=True, add_dataloader_idx=False)
        self._r_sums = {}
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            logger.info("%s", recon_line(self.current_epoch + 1, self.trainer.max_epochs, values))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the model's and the objective's parameters."""
        params = [*self.model.parameters(), *self.objective.parameters()]
        # The fused kernel (one launch for all parameters) where the parameters live on a GPU.
        fused = self.fused_optimizer and all(p.is_cuda for p in params)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, fused=fused or None)


# ---------------------------------------------------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------------------------------------------------
class ReseedCallback(pl.Callback):
    """Reseed the random generators from ``(seed, epoch, batch, rank)`` (exact resume).

    At every epoch start torch, numpy and random are reseeded with ``seed + epoch``; before every training batch
    torch is reseeded again from the epoch and batch index, so the noise of a step (reparameterisation, dropout,
    random subsets) does not depend on how much randomness anything else (e.g. creating a DataLoader iterator after
    a resume) consumed before it.
    """

    def __init__(self, seed: int):
        self.seed = int(seed)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Reseed for the epoch about to run."""
        seed_everything(self.seed + trainer.current_epoch + 1000 * trainer.global_rank, verbose=False)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        """Reseed torch for this step."""
        step_seed = self.seed + 1_000_003 * trainer.current_epoch + 7_919 * batch_idx + 104_729 * trainer.global_rank
        torch.manual_seed(step_seed % (2**63 - 1))


# ---------------------------------------------------------------------------------------------------------------------
# Running and saving
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class PretrainSettings:
    """Settings of one pre-training run (see ``examples/lsemvae_ph/config.py`` for their meaning)."""

    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 1e-5
    grad_clip: float = 1.0
    val_fraction: float = 0.1
    seed: int = 0
    num_workers: int = 0
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"
    log_every_n_steps: int = 10
    progress_bar: bool = True
    resume: bool = True
    compile: bool = False
    loader: str = "auto"
    resident: bool | str = "auto"
    fused_optimizer: bool = True
    window: int = 0
    early_stop_patience: int = 0


def resolve_precision(precision: str, accelerator: str) -> str:
    """``"auto"`` -> ``"bf16-mixed"`` when training on a GPU, ``"32-true"`` on CPU; other values unchanged."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu else "32-true"


@dataclass
class PretrainResult:
    """Outcome of ``run_pretraining``: where the model went and whether this process is the global rank 0."""

    model_path: Path
    is_global_zero: bool
    resumed_from: Path | None


def resumable_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest intact checkpoint of ``ckpt_dir``: ``last.ckpt``, else the newest ``epoch*.ckpt`` that loads.

    A checkpoint that cannot be read (truncated by a crash or a full disk) is skipped with a warning instead of
    blocking every rerun. Checkpoints are read with ``weights_only=True``.

    Args:
        ckpt_dir: the run's checkpoint folder.

    Returns:
        Path of the checkpoint to resume from, or None.
    """
    ckpt_dir = Path(ckpt_dir)
    candidates = [ckpt_dir / "last.ckpt"] + sorted(ckpt_dir.glob("epoch*.ckpt"), key=lambda p: p.stat().st_mtime)[::-1]
    for path in candidates:
        if not path.is_file():
            continue
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is skipped, with its reason
            logger.warning("checkpoint %s cannot be read (%s); trying an older one", path, err)
            continue
        return path
    return None


def _fit_batch_to_records(data: ECGPretrainDataModule, world_size: int) -> None:
    """Refuse a training part that leaves some process without a record (it would train on nothing).

    Fewer records per process than a batch are fine: both loaders keep the short last batch.
    """
    n_train = len(data.train_idx)
    per_rank = n_train // max(int(world_size), 1)
    if per_rank < 1:
        raise ValueError(
            f"pre-training has {n_train} training records after holding out the validation subjects, fewer than the "
            f"{world_size} processes: some would train on nothing; use fewer TRAINER.DEVICES or add records"
        )


def run_pretraining(
    model: nn.Module,
    objective: Objective,
    dataset: Dataset,
    out_dir: str | Path,
    settings: PretrainSettings,
    build_args: dict | None = None,
    leads: Sequence[str] | None = None,
    callbacks: Sequence[pl.Callback] = (),
    extra_files: dict[str, str] | None = None,
    augment: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> PretrainResult:
    """Pre-train ``model`` with ``objective`` on ``dataset`` with Lightning and save a plain state_dict.

    Writes ``out_dir/checkpoints/last.ckpt`` every epoch (resumed from when present and ``settings.resume``),
    TensorBoard and CSV logs under ``out_dir/logs``, and, on global rank 0 at the end, ``out_dir/model.pt`` (state
    dict, loadable with ``torch.load(weights_only=True)``), ``out_dir/model_args.json`` (``build_args``) and a
    ``DONE`` marker (``kale_ext.pipeline.artifacts.save_model``).

    Args:
        model: the model to train (initialised by the caller, after seeding).
        objective: the pre-training objective.
        dataset: lead dataset (items ``signals`` (L, T), ``mask`` (L,)).
        out_dir: output folder.
        settings: ``PretrainSettings``.
        build_args: JSON-serialisable arguments that rebuild the model (saved beside the weights).
        leads: channel names of the dataset items (default ``dataset.leads`` or the model's).
        callbacks: further Lightning callbacks (e.g. diagnostics).
        extra_files: further text files written beside the model (name -> content), e.g. a fingerprint.
        augment: transform of the training batches' model input (see :class:`PretrainModule`); None = off.

    Returns:
        ``PretrainResult``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    leads = tuple(leads or getattr(dataset, "leads", None) or model.lead_names)
    module = PretrainModule(
        model, objective, leads=leads, lr=settings.lr, weight_decay=settings.weight_decay, compile=settings.compile,
        fused_optimizer=settings.fused_optimizer,
        diagnostics_dir=out_dir, window=settings.window, augment=augment,
    )  # fmt: skip
    data = ECGPretrainDataModule(
        dataset, settings.batch_size, settings.val_fraction, settings.seed, settings.num_workers, settings.loader,
        settings.resident, train_probe=module.measures_recon,
    )  # fmt: skip
    stopping = []
    if settings.early_stop_patience > 0:
        if len(data.val_idx) == 0:
            raise ValueError(
                "early stopping (PRETRAIN.EARLY_STOP_PATIENCE) needs held-out subjects; set PRETRAIN.VAL_FRACTION > 0"
            )
        monitor, mode = ("val/recon_r", "max") if module.measures_recon else ("val/loss", "min")
        stopping.append(EarlyStopping(monitor=monitor, mode=mode, patience=int(settings.early_stop_patience)))
        # The saved model is the best held-out epoch's, not the last one (patience epochs past it).
        stopping.append(
            ModelCheckpoint(
                dirpath=out_dir / "checkpoints", filename=BEST_CHECKPOINT, monitor=monitor, mode=mode, save_top_k=1
            )
        )
    ckpt_dir = out_dir / "checkpoints"
    all_callbacks: list[pl.Callback] = [
        ReseedCallback(settings.seed),
        *callbacks,
        *stopping,
        # monitor None + top-1 keeps the latest epoch; last.ckpt (every epoch) is what a re-run resumes from
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="epoch{epoch:03d}",
            save_last=True,
            save_top_k=1,
            every_n_epochs=1,
            auto_insert_metric_name=False,
        ),
    ]
    precision = resolve_precision(settings.precision, settings.accelerator)
    trainer = pl.Trainer(
        max_epochs=settings.epochs,
        accelerator=settings.accelerator,
        devices=settings.devices,
        num_nodes=settings.num_nodes,
        strategy=settings.strategy,
        precision=precision,
        gradient_clip_val=settings.grad_clip if settings.grad_clip > 0 else None,
        callbacks=all_callbacks,
        logger=[TensorBoardLogger(out_dir / "logs", name="tensorboard"), CSVLogger(out_dir / "logs", name="csv")],
        log_every_n_steps=settings.log_every_n_steps,
        enable_progress_bar=settings.progress_bar,
        enable_model_summary=False,
        use_distributed_sampler=False,  # EpochSeededSampler shards by rank itself
        num_sanity_val_steps=0,
        deterministic=False,
    )
    _fit_batch_to_records(data, trainer.world_size)
    resume = resumable_checkpoint(ckpt_dir) if settings.resume else None
    if resume is not None:
        logger.info("resuming pre-training from %s", resume)
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None, weights_only=True)
    model_path = out_dir / "model.pt"
    if trainer.global_step == 0:  # never mark as done a model that took no optimiser step
        raise RuntimeError(
            f"pre-training in {out_dir} ran no optimiser step ({len(data.train_idx)} training records, batch size "
            f"{settings.batch_size}, {trainer.world_size} process(es)); lower PRETRAIN.BATCH_SIZE or add records"
        )
    best = next((cb for cb in stopping if isinstance(cb, ModelCheckpoint)), None)
    if best is not None and best.best_model_path:
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
        logger.info("keeping the best held-out epoch's weights (%s %.4f): %s", best.monitor, best.best_model_score,
                    best.best_model_path)  # fmt: skip
    if trainer.is_global_zero:
        model_path = save_model(model, out_dir, build_args, extra_files)
    return PretrainResult(model_path=model_path, is_global_zero=trainer.is_global_zero, resumed_from=resume)
