"""LS-EMVAE in its paper configuration, and every compared model as a configuration (:func:`build_model`).

LS-EMVAE: Suvon et al., "Multimodal Lead-Specific Modeling of ECG for Low-Cost Pulmonary Hypertension
Assessment" (arXiv 2503.13470). Baselines: MVAE (Wu and Goodman 2018), MoPoE-VAE (Sutter et al. 2021),
MMVAE-style averaging (Shi et al. 2019, as in the authors' baseline), beta-VAE (Higgins et al. 2017),
Multimodal-CNN (the LS-EMVAE encoders trained from scratch), ResNet1d and XResNet1d (supervised, see
:mod:`kale_ext.embed.resnet1d`). Departures from the paper and the authors' code are listed in docs/models.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kale_ext.embed.fusion import HierarchicalModalityExperts, MeanFusion, PoEFusion, SubsetPoEFusion
from kale_ext.embed.multimodal_vae import MultimodalVAE
from kale_ext.embed.resnet1d import ResNet1d, XResNet1d
from kale_ext.embed.signal_cnn import (
    JointSignalDecoder,
    JointSignalVAEEncoder,
    LeadwiseSignalDecoder,
    LeadwiseSignalVAEEncoder,
    SharedLeadDecoder,
)
from kale_ext.loaddata.leads import CANONICAL_LEADS

MODEL_NAMES = (
    "lsemvae",
    "lsemvae_reference",
    "mvae",
    "mopoe",
    "mmvae",
    "betavae",
    "multimodal_cnn",
    "resnet1d",
    "xresnet1d",
)


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
        generator: torch.Generator for lead dropout and sampling.
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
        generator: torch.Generator | None = None,
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
            ),
            decoder=SharedLeadDecoder(num_leads, input_dim, latent_dim, mode=decoder_mode, conv_impl=conv_impl),
            lead_names=lead_names,
            lead_dropout=lead_dropout,
            generator=generator,
        )


def _per_lead_decoder(kind: str, num_leads: int, input_dim: int, latent_dim: int, conv_impl: str) -> nn.Module:
    if kind == "separate":
        return LeadwiseSignalDecoder(num_leads, input_dim, latent_dim)
    if kind in ("lead", "identical"):
        return SharedLeadDecoder(num_leads, input_dim, latent_dim, mode=kind, conv_impl=conv_impl)
    raise ValueError(f"decoder must be 'separate', 'lead' or 'identical', got {kind!r}")


def build_model(
    name: str,
    lead_names: Sequence[str] = CANONICAL_LEADS,
    input_dim: int = 5000,
    latent_dim: int = 256,
    **options,
) -> nn.Module:
    """Build a model of the comparison by name.

    Names and what they build:

    - ``lsemvae``: :class:`LSEMVAE` (options: its keyword arguments, plus ablations ``no_poe``, ``no_moe``,
      ``no_gate`` mapping to ``use_poe=False`` / ``use_moe=False`` / ``gate=False``).
    - ``lsemvae_reference``: the authors' code path: HiME ``mode="reference"`` and the ``identical`` decoder.
    - ``mvae``: PoE with prior over the lead experts; a decoder per lead (``decoder="separate"``, default).
    - ``mopoe``: product over one random subset of present experts per sample in training (``SubsetPoEFusion``);
      decoder per lead by default. Options ``subset_size``, ``use_prior``, ``generator``.
    - ``mmvae``: average of the experts' means and log-variances (the authors' MMVAE+ baseline); decoder per lead.
    - ``betavae``: one 12-channel encoder (32/64/128/256) as a single expert and a 12-channel decoder; beta is a
      loss weight set in the pre-training objective.
    - ``multimodal_cnn``: the LS-EMVAE architecture; the pipeline trains its lead encoders from scratch with the
      classification head (no pre-training).
    - ``resnet1d`` / ``xresnet1d``: supervised classifiers (options ``num_classes`` and their arguments).

    Args:
        name: one of :data:`MODEL_NAMES`.
        lead_names: the model's leads.
        input_dim: samples per lead T.
        latent_dim: latent size D (VAE models).
        **options: model-specific keyword arguments (above); ``lead_dropout``, ``conv_impl``, ``generator`` apply
            to every VAE; ``decoder`` (``"separate"``, ``"lead"``, ``"identical"``) to mvae/mopoe/mmvae.

    Returns:
        nn.Module: a MultimodalVAE, or a ResNet1d/XResNet1d for the supervised names.
    """
    lead_names = tuple(lead_names)
    num_leads = len(lead_names)
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
    if name in ("resnet1d", "xresnet1d"):
        cls = ResNet1d if name == "resnet1d" else XResNet1d
        return cls(num_leads, options.pop("num_classes", 2), **options)
    if name in ("lsemvae", "multimodal_cnn"):
        for flag, arg in (("no_poe", "use_poe"), ("no_moe", "use_moe"), ("no_gate", "gate")):
            if options.pop(flag, False):
                options[arg] = False
        return LSEMVAE(lead_names, input_dim, latent_dim, **options)
    if name == "lsemvae_reference":
        options.setdefault("fusion_mode", "reference")
        options.setdefault("decoder_mode", "identical")
        return LSEMVAE(lead_names, input_dim, latent_dim, **options)
    common = {key: options.pop(key) for key in ("lead_dropout", "generator") if key in options}
    conv_impl = options.pop("conv_impl", "auto")
    if name == "betavae":
        encoder = JointSignalVAEEncoder(num_leads, input_dim, latent_dim, **options)
        decoder = JointSignalDecoder(num_leads, input_dim, latent_dim)
        return MultimodalVAE(encoder, MeanFusion(), decoder, lead_names, **common)
    decoder = _per_lead_decoder(options.pop("decoder", "separate"), num_leads, input_dim, latent_dim, conv_impl)
    encoder = LeadwiseSignalVAEEncoder(num_leads, input_dim, latent_dim, conv_impl=conv_impl)
    if name == "mvae":
        fusion = PoEFusion(use_prior=options.pop("use_prior", True))
    elif name == "mopoe":
        fusion = SubsetPoEFusion(
            use_prior=options.pop("use_prior", True),
            subset_size=options.pop("subset_size", None),
            generator=common.get("generator"),
        )
    else:
        fusion = MeanFusion()
    if options:
        raise TypeError(f"unknown options for {name!r}: {sorted(options)}")
    return MultimodalVAE(encoder, fusion, decoder, lead_names, **common)
