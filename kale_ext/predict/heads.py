"""Classification heads and the frozen-encoder classifier used for fine-tuning and interpretation.

The fine-tuning recipe of LS-EMVAE (arXiv 2503.13470): the pre-trained multimodal VAE is frozen, its
latent features feed a two-layer head (128 hidden units, dropout 0.5). Features are either the
concatenated per-lead posterior means of the leads in use (what the authors' code does) or the fused
posterior mean through the lead mask (an option).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn

from kale_ext.loaddata.windows import all_windows, check_window

FEATURE_MODES = ("concat_means", "fused_mean", "pooled")
# How the features of a record's windows become one record's features (windowed models only).
WINDOW_POOLINGS = ("mean", "poe")


class ClassificationHead(nn.Module):
    """Two fully connected layers: Linear -> ReLU -> Dropout -> Linear (the paper's fine-tuning head).

    Args:
        in_features: feature size F.
        num_classes: number of logits C (2 for the binary tasks, as in the authors' code).
        hidden_dim: hidden units (128 in the paper).
        dropout: dropout probability (0.5 in the paper).
    """

    def __init__(self, in_features: int, num_classes: int = 2, hidden_dim: int = 128, dropout: float = 0.5):
        super().__init__()
        if in_features < 1 or num_classes < 1 or hidden_dim < 1:
            raise ValueError(
                f"in_features, num_classes and hidden_dim must be positive, got {in_features}, {num_classes}, "
                f"{hidden_dim}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_classes),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from features.

        Args:
            features: (batch, in_features).

        Returns:
            logits: (batch, num_classes).
        """
        return self.net(features)


class LatentFeatureExtractor(nn.Module):
    """Latent features of a multimodal VAE for the leads in use.

    The wrapped model must provide ``encode(x, leads=...) -> (mean (L,B,D), log_var (L,B,D), mask (L,B))``
    over its ``lead_names`` and ``fuse(mean, log_var, mask) -> FusionOutput`` with ``.mean`` (B, D), as
    ``kale_ext.embed.multimodal_vae.MultimodalVAE`` does.

    Args:
        vae: the (pre-trained) multimodal VAE.
        leads: names of the channels of the input, in input order (a subset of ``vae.lead_names``).
        mode: ``"concat_means"``: the posterior means of ``leads`` concatenated in ``leads`` order,
            F = len(leads) * D; a lead marked absent in the mask contributes zeros. ``"fused_mean"``:
            the fused posterior mean through the lead mask, F = D. ``"pooled"``: the model's own
            ``features(x, leads=..., mask=...)`` (e.g. ST-MEM's mean token of the present leads), F = its width.

        window: samples per window of a model pre-trained on windows (``PRETRAIN.WINDOW``); 0 = the model takes
            whole records. When ``0 < window < time``, every window of the record (non-overlapping tiles, the last
            one flush with the end, :func:`kale_ext.loaddata.windows.window_starts`) is encoded and the windows'
            features are pooled into the record's features.
        pooling: ``"mean"`` (default): the mean of the per-window features; ``"poe"``: the product of the
            per-window Gaussian posteriors of each lead expert (precisions add, means are precision-weighted), then
            ``mode`` on the pooled posteriors. ``"pooled"`` features (no posterior) are always averaged. The default
            was chosen by a probe measurement on real records (docs/models.md, "Windowed pre-training").

    A model with one joint encoder over all leads (``vae.joint`` True, e.g. the beta-VAE baseline) has a
    single expert: both modes then give its posterior mean, F = D. When the model's ``encode`` accepts a
    ``mask`` argument the lead mask is passed on, so absent channels never reach the encoders.
    """

    def __init__(
        self,
        vae: nn.Module,
        leads: Sequence[str],
        mode: str = "concat_means",
        window: int = 0,
        pooling: str = "mean",
    ):
        super().__init__()
        if mode not in FEATURE_MODES:
            raise ValueError(f"unknown feature mode {mode!r}; use one of {list(FEATURE_MODES)}")
        if pooling not in WINDOW_POOLINGS:
            raise ValueError(f"unknown window pooling {pooling!r}; use one of {list(WINDOW_POOLINGS)}")
        if int(window) < 0:
            raise ValueError(f"window = {window} is not accepted; use 0 (whole records) or a number of samples")
        self.window = int(window)
        self.pooling = pooling
        model_leads = getattr(vae, "lead_names", None)
        if model_leads is None:
            raise ValueError("the model has no lead_names attribute; wrap a MultimodalVAE (or set lead_names)")
        leads = tuple(str(lead) for lead in leads)
        unknown = [lead for lead in leads if lead not in model_leads]
        if unknown:
            raise ValueError(
                f"leads {unknown} are not among the model's leads {list(model_leads)}; rename or drop them"
            )
        if len(set(leads)) != len(leads):
            raise ValueError(f"leads {list(leads)} contain duplicates")
        self.vae = vae
        self.leads = leads
        self.mode = mode
        # Position of each input lead among the model's leads: leads are matched by name, never by position.
        self.register_buffer(
            "_lead_index",
            torch.tensor([list(model_leads).index(lead) for lead in leads], dtype=torch.long),
            persistent=False,
        )
        self.joint = bool(getattr(vae, "joint", False))
        if mode == "pooled":
            if not hasattr(vae, "features"):
                raise ValueError("feature mode 'pooled' needs a model with features(x, leads=..., mask=...)")
            self._encode_takes_mask = True
            self.out_features = getattr(vae, "width", None)
            return
        self._encode_takes_mask = "mask" in inspect.signature(vae.encode).parameters
        latent_dim = getattr(vae, "latent_dim", None)
        per_lead = mode == "concat_means" and not self.joint
        self.out_features = None if latent_dim is None else (len(leads) * latent_dim if per_lead else latent_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Features of a batch (of whole records: a windowed model sees every window of them).

        Args:
            x: (batch, len(leads), time), channels named by ``self.leads``.
            mask: (batch, len(leads)) bool, True = lead present; None = all present.

        Returns:
            features: (batch, F) with F = len(leads) * latent for ``concat_means``, latent for ``fused_mean``.
        """
        if x.dim() != 3 or x.shape[1] != len(self.leads):
            raise ValueError(
                f"x must be (batch, {len(self.leads)} leads {list(self.leads)}, time), got {tuple(x.shape)}"
            )
        if mask is not None and mask.shape != x.shape[:2]:
            raise ValueError(f"mask must be (batch, leads) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
        model_length = getattr(self.vae, "input_dim", None)
        if self.window == 0 and model_length is not None and x.shape[-1] > int(model_length):
            raise ValueError(
                f"the model takes {model_length} samples per lead but the records have {x.shape[-1]}: it was "
                f"pre-trained on windows (PRETRAIN.WINDOW); pass window={model_length} to pool every window"
            )
        if self.window == 0 or check_window(self.window, x.shape[-1]) == x.shape[-1]:
            return self._features(x, mask)  # whole records: exactly the unwindowed path
        windows = all_windows(x, self.window)  # (n_windows, B, L, W)
        n_win, batch = windows.shape[:2]
        flat = windows.reshape(n_win * batch, *windows.shape[2:])
        flat_mask = None if mask is None else mask.repeat(n_win, 1)
        if self.mode == "pooled" or self.pooling == "mean":
            return self._features(flat, flat_mask).reshape(n_win, batch, -1).mean(0)
        mean, log_var, present = self._posteriors(flat, flat_mask)  # (E, n_win * B, D), ..., (E, n_win * B)
        mean = mean.reshape(mean.shape[0], n_win, batch, -1)
        log_var = log_var.reshape(mean.shape)
        present = present.reshape(present.shape[0], n_win, batch)
        # Product of the windows' Gaussians per expert: precisions add, means are precision-weighted.
        precision = torch.where(present.unsqueeze(-1), torch.exp(-log_var.float()), torch.zeros((), device=x.device))
        total = precision.sum(1)  # (E, B, D)
        pooled_present = present.any(1)  # (E, B)
        pooled_mean = (precision * mean.float()).sum(1) / total.clamp_min(1e-12)
        pooled_log_var = -torch.log(total.clamp_min(1e-12))
        keep = pooled_present.unsqueeze(-1)
        zero = torch.zeros((), device=x.device)
        pooled_mean, pooled_log_var = torch.where(keep, pooled_mean, zero), torch.where(keep, pooled_log_var, zero)
        return self._from_posteriors(pooled_mean, pooled_log_var, pooled_present)

    def _posteriors(
        self, x: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-expert posteriors ``(mean (E, B, D), log_var (E, B, D), present (E, B))`` with the mask applied."""
        if mask is not None and self._encode_takes_mask:
            mean, log_var, enc_mask = self.vae.encode(x, leads=self.leads, mask=mask.bool())
        else:
            if mask is not None:  # absent channels may hold anything (NaN included): keep it out of the encoders
                x = torch.where(mask.bool().unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
            mean, log_var, enc_mask = self.vae.encode(x, leads=self.leads)  # (E, B, D), (E, B, D), (E, B)
        present = enc_mask.bool()
        if mask is not None and not self.joint:
            given = torch.zeros_like(present)
            given[self._lead_index] = mask.t().bool().to(present.device)
            present = present & given
        return mean, log_var, present

    def _from_posteriors(self, mean: torch.Tensor, log_var: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """The features of ``self.mode`` from per-expert posteriors (E, B, D) and presence (E, B)."""
        if self.joint:  # one expert over all leads, which has already seen the mask
            return torch.where(present[0].unsqueeze(-1), mean[0], torch.zeros_like(mean[0]))
        if self.mode == "fused_mean":
            return self.vae.fuse(mean, log_var, present).mean
        means = mean[self._lead_index]  # (len(leads), B, D) in the order of self.leads
        keep = present[self._lead_index].unsqueeze(-1)  # (len(leads), B, 1)
        # torch.where, not multiplication: placeholder values of absent leads may be non-finite.
        means = torch.where(keep, means, torch.zeros_like(means))
        return means.permute(1, 0, 2).reshape(means.shape[1], -1)

    def _features(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Features of inputs the model takes as they are (whole records, or single windows)."""
        if self.mode == "pooled":
            return self.vae.features(x, leads=self.leads, mask=None if mask is None else mask.bool())
        return self._from_posteriors(*self._posteriors(x, mask))


class FeatureClassifier(nn.Module):
    """Feature extractor followed by a head: ``forward(x, mask) -> logits``.

    This is the module that fine-tuning trains (the head only, by default) and that attribution methods
    differentiate through to the input signals: the extractor's parameters are frozen but gradients
    still flow through it to ``x``.

    Args:
        extractor: module mapping ``(x (B,L,T), mask (B,L) | None)`` to features (B, F), e.g.
            :class:`LatentFeatureExtractor`.
        head: module mapping features (B, F) to logits (B, C), e.g. :class:`ClassificationHead`.
        freeze_extractor: when True the extractor stays in eval mode (also under ``train()``) and its
            parameters have ``requires_grad=False``.
    """

    def __init__(self, extractor: nn.Module, head: nn.Module, freeze_extractor: bool = True):
        super().__init__()
        self.extractor = extractor
        self.head = head
        self.freeze_extractor = freeze_extractor
        if freeze_extractor:
            self.extractor.requires_grad_(False)
            self.extractor.eval()

    def train(self, mode: bool = True) -> FeatureClassifier:
        """Set training mode; a frozen extractor stays in eval mode (no dropout, fixed normalisation)."""
        super().train(mode)
        if self.freeze_extractor:
            self.extractor.eval()
        return self

    def features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Extractor output, for precomputing features once per fold.

        Computed without autograd when the extractor is frozen (use :meth:`forward` to differentiate).

        Args:
            x: (batch, leads, time).
            mask: (batch, leads) bool or None.

        Returns:
            features: (batch, F).
        """
        if self.freeze_extractor:
            with torch.no_grad():
                return self.extractor(x, mask)
        return self.extractor(x, mask)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of a batch.

        Args:
            x: (batch, leads, time).
            mask: (batch, leads) bool, True = present, or None.

        Returns:
            logits: (batch, num_classes).
        """
        return self.head(self.extractor(x, mask))
