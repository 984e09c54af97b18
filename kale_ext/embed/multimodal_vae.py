"""One multimodal VAE for ECG leads: lead encoders -> any fusion layer -> decoder.

LS-EMVAE (Suvon et al., arXiv 2503.13470) and the multimodal baselines of its Table 2 (MVAE, MoPoE-VAE,
MMVAE-style averaging, beta-VAE) differ only in the fusion layer and the decoder, so they are configurations of
:class:`MultimodalVAE` (built by :func:`kale_ext.embed.zoo.build_model`).

Leads are named. ``encode`` takes signals whose channels are named by ``leads`` (any subset of the model's leads,
any order); leads not given, or masked out, are absent experts: their mean and log-variance are replaced by the
placeholder N(0, I) values and their mask entry is False, so a model pre-trained on 12 leads encodes a 6-lead ECG
without retraining and the result does not depend on what the absent channels contained. Only the encoders of
the channels given are run; which of them are present is decided by the mask alone, on the device (no host
synchronisation, so a compiled step has no graph break).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from kale_ext.embed.fusion import FusionOutput


@dataclass
class VAEOutput:
    """What :meth:`MultimodalVAE.forward` returns.

    Attributes:
        recon: (B, L, T) reconstruction of every lead of the model (present or not).
        fusion: the fusion layer's FusionOutput (fused ``mean``/``log_var`` (B, D), experts, weights, mask).
        z: (B, D) the latent that was decoded (a sample, or the fused mean when ``sample=False``).
        lead_mask: (B, L) bool, leads that were present (after lead dropout) in ``lead_names`` order; use it to
            restrict the reconstruction loss to observed leads.
    """

    recon: Tensor
    fusion: FusionOutput
    z: Tensor
    lead_mask: Tensor


class LeadPosterior(NamedTuple):
    """Per-lead posteriors returned by :meth:`MultimodalVAE.encode`.

    Attributes:
        mean: (E, B, D) float32; E experts = one per model lead (or 1 for a joint encoder); 0 where absent.
        log_var: (E, B, D) float32, bounded; 0 (unit variance) where absent.
        mask: (E, B) bool, True = present.
    """

    mean: Tensor
    log_var: Tensor
    mask: Tensor


class MultimodalVAE(nn.Module):
    """Lead encoders, a fusion layer and a decoder, with named leads and masks for missing ones.

    Args:
        encoder: a lead-wise encoder (``forward(x (B, L', T), lead_index) -> (mean, log_var) (L', B, D)``, e.g.
            :class:`~kale_ext.embed.signal_cnn.LeadwiseSignalVAEEncoder`) or a joint encoder with attribute
            ``joint = True`` (``forward(x (B, L, T)) -> (1, B, D)`` pair; absent leads are zero-filled for it).
        fusion: any layer of :mod:`kale_ext.embed.fusion` (``forward(mean, log_var, mask) -> FusionOutput``).
        decoder: ``forward(z (B, D)) -> (B, L, T)``.
        lead_names: the model's leads, in the order of the encoder's and decoder's leads.
        lead_dropout: in training mode, probability of dropping each present lead of each sample (at least one
            present lead is always kept) so that lead subsets are trained for; 0 disables.
        generator: torch.Generator for lead dropout and for sampling z when ``forward`` gets none.

    Attributes:
        lead_names (tuple of str), latent_dim (D), input_dim (T).
    """

    def __init__(
        self,
        encoder: nn.Module,
        fusion: nn.Module,
        decoder: nn.Module,
        lead_names: Sequence[str],
        lead_dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.lead_names = tuple(lead_names)
        if len(set(self.lead_names)) != len(self.lead_names):
            raise ValueError(f"lead_names must be unique, got {self.lead_names}")
        for part, name in ((encoder, "encoder"), (decoder, "decoder")):
            if getattr(part, "num_leads", len(self.lead_names)) != len(self.lead_names):
                raise ValueError(
                    f"the {name} has {part.num_leads} leads but lead_names has {len(self.lead_names)}; "
                    "build both for the same leads"
                )
        if not 0.0 <= lead_dropout < 1.0:
            raise ValueError(f"lead_dropout must be in [0, 1), got {lead_dropout}")
        self.encoder = encoder
        self.fusion = fusion
        self.decoder = decoder
        self.latent_dim = encoder.latent_dim
        self.input_dim = encoder.input_dim
        self.lead_dropout = float(lead_dropout)
        self.generator = generator
        self.joint = bool(getattr(encoder, "joint", False))
        try:
            self._fusion_takes_generator = "generator" in inspect.signature(fusion.forward).parameters
        except (TypeError, ValueError):
            self._fusion_takes_generator = False

    # ----------------------------------------------------------------------------------------------------------
    def lead_index(self, leads: Sequence[str] | None, num_channels: int) -> list[int]:
        """Positions in ``lead_names`` of the channels of an input.

        Args:
            leads: names of the input's channels, or None when the input has all model leads in model order.
            num_channels: number of channels of the input.

        Returns:
            list of ``num_channels`` positions.
        """
        if leads is None:
            if num_channels != len(self.lead_names):
                raise ValueError(
                    f"input has {num_channels} channels but the model has {len(self.lead_names)} leads; pass "
                    f"leads=... naming the channels (a subset of {self.lead_names})"
                )
            return list(range(num_channels))
        leads = tuple(leads)
        unknown = [name for name in leads if name not in self.lead_names]
        if unknown:
            raise ValueError(f"leads {unknown} are not leads of this model; use names from {self.lead_names}")
        if len(set(leads)) != len(leads) or len(leads) != num_channels:
            raise ValueError(f"leads must name each of the {num_channels} input channels once, got {leads}")
        return [self.lead_names.index(name) for name in leads]

    def present_leads(
        self, x: Tensor, mask: Tensor | None = None, leads: Sequence[str] | None = None
    ) -> tuple[list[int], Tensor]:
        """The channel positions of ``x`` and the (B, L) presence mask over the model's leads.

        Args:
            x: (B, L', T) signals.
            mask: (B, L') bool over the channels of x, True = present; None = all present.
            leads: names of the channels of x.

        Returns:
            (positions of x's channels in ``lead_names``, presence (B, L) bool in ``lead_names`` order).
        """
        idx = self.lead_index(leads, x.shape[1])
        present = torch.zeros(x.shape[0], len(self.lead_names), dtype=torch.bool, device=x.device)
        channel_mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask
        if channel_mask.shape != x.shape[:2]:
            raise ValueError(f"mask must be (batch, channels) = {tuple(x.shape[:2])}, got {tuple(channel_mask.shape)}")
        present[:, idx] = channel_mask.to(device=x.device, dtype=torch.bool)
        return idx, present

    def encode(self, x: Tensor, leads: Sequence[str] | None = None, mask: Tensor | None = None) -> LeadPosterior:
        """Per-lead posteriors for all model leads; leads not given or masked out are absent.

        Args:
            x: (B, L', T) signals.
            leads: names of the channels of x (a subset of ``lead_names``, any order); None = all, model order.
            mask: (B, L') bool over the channels of x; None = all present.

        Returns:
            LeadPosterior ``(mean (E, B, D), log_var (E, B, D), mask (E, B))``, E = L (or 1 for a joint encoder).
        """
        idx, present = self.present_leads(x, mask, leads)
        return self._encode(x, idx, present, mask is not None)

    def _encode(self, x: Tensor, idx: list[int], present: Tensor, masked: bool) -> LeadPosterior:
        num_leads = len(self.lead_names)
        batch = x.shape[0]
        channel_present = present[:, idx]  # (B, L')
        if masked:
            # Absent channels are zeroed so that whatever they hold (NaN included) cannot reach any gradient.
            x = torch.where(channel_present.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
        if self.joint:
            full = x
            if idx != list(range(num_leads)):
                full = x.new_zeros(batch, num_leads, x.shape[-1])
                full[:, idx] = x
            mean, log_var = self.encoder(full)
            return LeadPosterior(mean, log_var, present.any(dim=1).unsqueeze(0))
        if idx == list(range(num_leads)):
            mean, log_var = self.encoder(x)
        else:
            sub_mean, sub_log_var = self.encoder(x, lead_index=idx) if idx else (None, None)
            shape = (num_leads, batch, self.latent_dim)
            mean = torch.zeros(shape, device=x.device)
            log_var = torch.zeros(shape, device=x.device)
            if idx:
                where = torch.as_tensor(idx, device=x.device)
                mean = mean.index_copy(0, where, sub_mean)
                log_var = log_var.index_copy(0, where, sub_log_var)
        lead_mask = present.t()
        if masked or len(idx) != num_leads:
            keep = lead_mask.unsqueeze(-1)
            zero = torch.zeros((), device=mean.device)
            mean, log_var = torch.where(keep, mean, zero), torch.where(keep, log_var, zero)
        return LeadPosterior(mean, log_var, lead_mask)

    def fuse(self, mean: Tensor, log_var: Tensor, mask: Tensor | None = None) -> FusionOutput:
        """Fuse expert posteriors with the model's fusion layer.

        Args:
            mean: (E, B, D); log_var: (E, B, D); mask: (E, B) bool or None.

        Returns:
            FusionOutput.
        """
        return self.fusion(mean, log_var, mask)

    def decode(self, z: Tensor) -> Tensor:
        """Reconstruct every model lead.

        Args:
            z: (B, D) latent.

        Returns:
            (B, L, T) reconstructions in ``lead_names`` order.
        """
        return self.decoder(z)

    def drop_leads(self, present: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Randomly drop present leads with probability ``lead_dropout``, keeping at least one per sample.

        Args:
            present: (B, L) bool presence.
            generator: torch.Generator (default: the model's).

        Returns:
            (B, L) bool, a subset of ``present`` with at least one lead wherever ``present`` has one.
        """
        generator = generator if generator is not None else self.generator
        device = generator.device if generator is not None else present.device
        u = torch.rand(present.shape, generator=generator, device=device).to(present.device)
        keep = present & (u >= self.lead_dropout)
        emptied = present.any(dim=1) & ~keep.any(dim=1)
        # Where every present lead was dropped, keep the one with the largest draw (uniform over present leads).
        rescue = torch.nn.functional.one_hot(torch.where(present, u, -1.0).argmax(dim=1), present.shape[1]).bool()
        return keep | (emptied.unsqueeze(1) & rescue)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        leads: Sequence[str] | None = None,
        sample: bool = True,
        generator: torch.Generator | None = None,
    ) -> VAEOutput:
        """Encode, fuse, draw (or take the mean of) z and decode.

        Lead dropout applies in training mode only (like ``nn.Dropout``); whether z is sampled is decided by
        ``sample`` alone.

        Args:
            x: (B, L', T) signals.
            mask: (B, L') bool over the channels of x, True = present; None = all present.
            leads: names of the channels of x; None = all model leads in model order.
            sample: draw z from the fused posterior (True) or use its mean (False).
            generator: torch.Generator for this call (lead dropout and z).

        Returns:
            VAEOutput.
        """
        idx, present = self.present_leads(x, mask, leads)
        masked = mask is not None
        if self.training and self.lead_dropout > 0:
            present = self.drop_leads(present, generator)
            masked = True
        posterior = self._encode(x, idx, present, masked)
        if self._fusion_takes_generator:
            generator_ = generator if generator is not None else self.generator
            fused = self.fusion(*posterior, generator=generator_)  # gate noise and random subsets follow it
        else:
            fused = self.fuse(*posterior)
        z = fused.mean
        if sample:
            generator = generator if generator is not None else self.generator
            device = generator.device if generator is not None else z.device
            eps = torch.randn(z.shape, generator=generator, device=device).to(z.device)
            z = z + torch.exp(0.5 * fused.log_var) * eps
        return VAEOutput(self.decode(z), fused, z, present)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters.

        Args:
            trainable_only: count only parameters with ``requires_grad``.

        Returns:
            int.
        """
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
