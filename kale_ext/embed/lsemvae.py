"""LS-EMVAE in its paper configuration.

LS-EMVAE: Suvon et al., "Multimodal Lead-Specific Modeling of ECG for Low-Cost Pulmonary Hypertension
Assessment" (arXiv 2503.13470). Every compared model, this one included, is built by name through the registry
:mod:`kale_ext.embed.zoo`. Departures from the paper and the authors' code are listed in docs/models.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kale_ext.embed.fusion import HierarchicalModalityExperts
from kale_ext.embed.multimodal_vae import MultimodalVAE
from kale_ext.embed.signal_cnn import LeadwiseSignalVAEEncoder, SharedLeadDecoder
from kale_ext.loaddata.leads import CANONICAL_LEADS


class LSEMVAE(MultimodalVAE):
    """LS-EMVAE: one CNN encoder per lead, gated HiME fusion with a prior, shared lead-conditioned decoder.

    Defaults are the paper's configuration: 12 leads, T = 5000, D = 256 (about 256.2 M parameters).

    Args:
        lead_names: the model's leads (default the 12 standard leads).
        input_dim: samples per lead T.
        latent_dim: latent size D.
        use_prior: N(0, I) expert in the shared product.
        use_poe: include the shared PoE expert in the mixture (ablation ``no_poe``).
        use_moe: fuse by the gated mixture; False returns the PoE expert (ablation ``no_moe``).
        gate: learned gate; False = uniform weights over present experts (ablation ``no_gate``).
        fusion_mode: ``"paper"`` or ``"reference"`` (the authors' grouped averaging; see HiME).
        decoder_mode: ``"lead"`` (lead-conditioned) or ``"identical"`` (the authors' decoder).
        lead_dropout: training-time lead dropout probability (see MultimodalVAE).
        conv_impl: how the small convolutions run (same maths): ``"auto"`` (block-diagonal dense kernels on CUDA,
            grouped kernels elsewhere), ``"conv"``, ``"conv2d"``, ``"matmul"`` or ``"blockdiag"``.
        gate_hidden_dim: hidden width of the gate.
        gate_noise: Shazeer's noisy gating (learned noise scale, training mode only).
        gate_top_k: keep the k largest gate values per sample (None = dense, all experts).
        generator: torch.Generator for lead dropout and sampling.
        gate_context: ``"expert"`` (the gate reads each expert alone) or ``"consensus"`` (also each lead's
            disagreement with the other leads, so that a bad lead can be turned down; see ``ExpertGate``).
    """

    def __init__(
        self,
        lead_names: Sequence[str] = CANONICAL_LEADS,
        input_dim: int = 5000,
        latent_dim: int = 256,
        use_prior: bool = True,
        use_poe: bool = True,
        use_moe: bool = True,
        gate: bool = True,
        fusion_mode: str = "paper",
        decoder_mode: str = "lead",
        lead_dropout: float = 0.0,
        conv_impl: str = "auto",
        gate_hidden_dim: int = 64,
        gate_noise: bool = False,
        gate_top_k: int | None = None,
        generator: torch.Generator | None = None,
        gate_context: str = "expert",
    ) -> None:
        num_leads = len(lead_names)
        super().__init__(
            encoder=LeadwiseSignalVAEEncoder(num_leads, input_dim, latent_dim, conv_impl=conv_impl),
            fusion=HierarchicalModalityExperts(
                num_leads,
                latent_dim,
                use_prior=use_prior,
                use_poe=use_poe,
                use_moe=use_moe,
                gate=gate,
                mode=fusion_mode,
                gate_hidden_dim=gate_hidden_dim,
                gate_noise=gate_noise,
                gate_top_k=gate_top_k,
                gate_context=gate_context,
            ),
            decoder=SharedLeadDecoder(num_leads, input_dim, latent_dim, mode=decoder_mode, conv_impl=conv_impl),
            lead_names=lead_names,
            lead_dropout=lead_dropout,
            generator=generator,
        )
