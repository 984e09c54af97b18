"""The model registry: every model of the comparison, what it is and how to build it, in one table.

``MODELS`` maps a model name to a :class:`ModelSpec`: its builder, whether it is pre-trained (self-supervised, then
frozen for a head) or trained end to end, its display label, the fine-tuning features it offers, the name of its
pre-training objective (resolved by ``kale_ext.predict.objectives.build_objective``; the registry holds the name only
because ``embed`` may not import ``predict``), and which builder options it accepts. Configuration validation,
method labels, result tables and documentation lists are all read from here, so adding a model is one builder and
one entry (``docs/architecture.md`` shows the steps).

Models: LS-EMVAE (Suvon et al., arXiv 2503.13470) and its reference-code variant, MVAE (Wu and Goodman 2018),
MoPoE-VAE (Sutter et al. 2021), MMVAE-style averaging (Shi et al. 2019, as in the authors' baseline), beta-VAE
(Higgins et al. 2017), Multimodal-CNN (the LS-EMVAE encoders trained from scratch), ResNet1d and XResNet1d.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from kale_ext.embed.fusion import MeanFusion, PoEFusion, SubsetPoEFusion
from kale_ext.embed.joint_cnn import JointSignalDecoder, JointSignalVAEEncoder
from kale_ext.embed.lsemvae import LSEMVAE
from kale_ext.embed.multimodal_vae import MultimodalVAE
from kale_ext.embed.resnet1d import ResNet1d, XResNet1d
from kale_ext.embed.signal_cnn import LeadwiseSignalDecoder, LeadwiseSignalVAEEncoder, SharedLeadDecoder
from kale_ext.embed.st_mem import STMEM
from kale_ext.loaddata.leads import CANONICAL_LEADS

# Fine-tuning feature modes a latent model can offer (see kale_ext.predict.heads.LatentFeatureExtractor).
LEAD_MEANS = "concat_means"
FUSED_MEAN = "fused_mean"
POOLED = "pooled"


@dataclass(frozen=True)
class ModelSpec:
    """What a model of the comparison is.

    Attributes:
        build: ``build(lead_names, input_dim, latent_dim, **options) -> nn.Module``.
        label: name shown in result tables.
        pretrained: True = self-supervised pre-training, then a head on the frozen model; False = no pre-training.
        features: fine-tuning feature modes the model offers, the first being the default; ``()`` = the model is a
            classifier itself (trained end to end on the signals).
        objective: name of the pre-training objective (``kale_ext.predict.objectives``), or None.
        options: builder keyword arguments the model accepts from a configuration.
        frozen: whether the latent model is frozen during fine-tuning (False: trained end to end with the head).
        multimodal: one expert per lead (the multimodal block of the paper's Table 2) or not (unimodal block).
    """

    build: Callable[..., nn.Module]
    label: str
    pretrained: bool
    features: tuple[str, ...]
    objective: str | None
    options: tuple[str, ...] = ()
    frozen: bool = True
    multimodal: bool = True

    @property
    def end_to_end(self) -> bool:
        """True when fine-tuning trains the whole network on the signals (no frozen features)."""
        return not self.features or not self.frozen


_VAE_OPTIONS = ("lead_dropout", "conv_impl", "generator")


def _build_lsemvae(lead_names, input_dim, latent_dim, **options) -> nn.Module:
    if not options.get("gate_top_k"):
        options.pop("gate_top_k", None)  # 0 / None = dense
    for flag, arg in (("no_poe", "use_poe"), ("no_moe", "use_moe"), ("no_gate", "gate")):
        if options.pop(flag, False):
            options[arg] = False
    return LSEMVAE(lead_names, input_dim, latent_dim, **options)


def _build_lsemvae_reference(lead_names, input_dim, latent_dim, **options) -> nn.Module:
    options.setdefault("fusion_mode", "reference")
    options.setdefault("decoder_mode", "identical")
    return LSEMVAE(lead_names, input_dim, latent_dim, **options)


def _per_lead_decoder(kind: str, num_leads: int, input_dim: int, latent_dim: int, conv_impl: str) -> nn.Module:
    if kind == "separate":
        return LeadwiseSignalDecoder(num_leads, input_dim, latent_dim)
    if kind in ("lead", "identical"):
        return SharedLeadDecoder(num_leads, input_dim, latent_dim, mode=kind, conv_impl=conv_impl)
    raise ValueError(f"decoder must be 'separate', 'lead' or 'identical', got {kind!r}")


def _lead_vae(fusion: nn.Module, lead_names, input_dim, latent_dim, options: dict) -> nn.Module:
    common = {key: options.pop(key) for key in ("lead_dropout", "generator") if key in options}
    conv_impl = options.pop("conv_impl", "auto")
    decoder = _per_lead_decoder(options.pop("decoder", "separate"), len(lead_names), input_dim, latent_dim, conv_impl)
    if options:
        raise TypeError(f"unknown options: {sorted(options)}")
    encoder = LeadwiseSignalVAEEncoder(len(lead_names), input_dim, latent_dim, conv_impl=conv_impl)
    return MultimodalVAE(encoder, fusion, decoder, lead_names, **common)


def _build_mvae(lead_names, input_dim, latent_dim, **options) -> nn.Module:
    fusion = PoEFusion(use_prior=options.pop("use_prior", True))
    return _lead_vae(fusion, lead_names, input_dim, latent_dim, options)


def _build_mopoe(lead_names, input_dim, latent_dim, **options) -> nn.Module:
    fusion = SubsetPoEFusion(
        use_prior=options.pop("use_prior", True),
        subset_size=options.pop("subset_size", None),
        generator=options.get("generator"),
    )
    return _lead_vae(fusion, lead_names, input_dim, latent_dim, options)


def _build_mmvae(lead_names, input_dim, latent_dim, **options) -> nn.Module:
    return _lead_vae(MeanFusion(), lead_names, input_dim, latent_dim, options)


def _build_betavae(lead_names, input_dim, latent_dim, **options) -> nn.Module:
    common = {key: options.pop(key) for key in ("lead_dropout", "generator") if key in options}
    options.pop("conv_impl", None)  # plain Conv1d layers: one implementation
    encoder = JointSignalVAEEncoder(len(lead_names), input_dim, latent_dim, **options)
    decoder = JointSignalDecoder(len(lead_names), input_dim, latent_dim)
    return MultimodalVAE(encoder, MeanFusion(), decoder, lead_names, **common)


def stmem_patch_size(input_dim: int, target_patches: int = 30) -> int:
    """The patch length dividing ``input_dim`` whose patch count per lead is closest to ``target_patches``.

    The published ST-MEM cuts 2250 samples (9 s at 250 Hz) into 30 patches of 75; at other rates and lengths the
    same number of patches per lead is kept (5000 samples -> 25 x 200, 500 -> 25 x 20, 2250 -> 30 x 75).
    """
    divisors = [p for p in range(1, input_dim + 1) if input_dim % p == 0 and input_dim // p >= 2]
    if not divisors:
        raise ValueError(f"input_dim {input_dim} cannot be cut into at least two patches; use a longer signal")
    return min(divisors, key=lambda p: (abs(input_dim // p - target_patches), -p))


def _build_stmem(lead_names, input_dim, latent_dim, **options) -> nn.Module:
    # latent_dim is not used: ST-MEM's feature width is its preset's transformer width.
    preset = options.pop("preset", "paper")
    patch = int(options.pop("patch_size", 0)) or stmem_patch_size(input_dim)
    options.pop("conv_impl", None)
    options.pop("generator", None)
    return STMEM.from_preset(preset, lead_names, input_dim=input_dim, patch_size=patch, **options)


def _build_random_encoder(lead_names, input_dim, latent_dim, **options) -> nn.Module:
    architecture = options.pop("architecture", "lsemvae")
    spec = model_spec(architecture)
    if not spec.pretrained:
        raise ValueError(f"random_encoder needs a pre-trainable architecture, got {architecture!r}")
    # The options of a configuration cover every architecture; the chosen one takes those it accepts.
    return spec.build(lead_names, input_dim, latent_dim, **{k: v for k, v in options.items() if k in spec.options})


def _supervised(cls: type) -> Callable[..., nn.Module]:
    def build(lead_names, input_dim, latent_dim, **options) -> nn.Module:
        return cls(len(lead_names), options.pop("num_classes", 2), **options)

    return build


def _lead_vae_spec(
    build: Callable[..., nn.Module], label: str, objective: str = "elbo", options: tuple[str, ...] = _VAE_OPTIONS
) -> ModelSpec:
    """A pre-trained VAE with one expert per lead: both feature modes, lead-mean features first."""
    return ModelSpec(
        build, label, pretrained=True, features=(LEAD_MEANS, FUSED_MEAN), objective=objective, options=options
    )


MODELS: dict[str, ModelSpec] = {
    "lsemvae": _lead_vae_spec(
        _build_lsemvae,
        "LS-EMVAE",
        options=(
            "no_poe",
            "no_moe",
            "no_gate",
            "use_prior",
            "gate_noise",
            "gate_top_k",
            "gate_context",
            *_VAE_OPTIONS,
        ),
    ),
    "lsemvae_reference": _lead_vae_spec(_build_lsemvae_reference, "LS-EMVAE (reference code)", "reference"),
    "mvae": _lead_vae_spec(_build_mvae, "MVAE", options=("use_prior", *_VAE_OPTIONS)),
    "mopoe": _lead_vae_spec(_build_mopoe, "MoPoE-VAE", options=("use_prior", *_VAE_OPTIONS)),
    "mmvae": _lead_vae_spec(_build_mmvae, "MMVAE", options=_VAE_OPTIONS),
    "betavae": ModelSpec(
        _build_betavae,
        "beta-VAE",
        pretrained=True,
        features=(FUSED_MEAN,),  # one joint expert: its posterior mean is the only feature
        # Higgins et al.'s beta-weighted ELBO. Burgess et al.'s capacity objective ("capacity") is selectable
        # (PRETRAIN.OBJECTIVE); docs/models.md says why it is not the default.
        objective="elbo",
        options=_VAE_OPTIONS,
        multimodal=False,
    ),
    "stmem": ModelSpec(
        _build_stmem,
        "ST-MEM",
        pretrained=True,
        features=(POOLED,),
        objective="masked_patch",
        options=("preset", "patch_size"),
        multimodal=False,
    ),
    "random_encoder": ModelSpec(
        _build_random_encoder,
        "Random encoder",
        pretrained=False,  # frozen at its (seeded) initialisation: the same head and protocol, no pre-training
        features=(LEAD_MEANS, FUSED_MEAN, POOLED),
        objective=None,
        options=("architecture", "conv_impl", "preset", "patch_size"),
    ),
    "multimodal_cnn": ModelSpec(
        _build_lsemvae,
        "Multimodal-CNN",
        pretrained=False,
        features=(LEAD_MEANS,),
        objective=None,
        options=("no_poe", "no_moe", "no_gate", "conv_impl"),
        frozen=False,
    ),
    "resnet1d": ModelSpec(
        _supervised(ResNet1d),
        "ResNet1d",
        pretrained=False,
        features=(),
        objective=None,
        options=("widths",),
        multimodal=False,
    ),
    "xresnet1d": ModelSpec(
        _supervised(XResNet1d),
        "xResNet1d",
        pretrained=False,
        features=(),
        objective=None,
        options=("widths",),
        multimodal=False,
    ),
}


def model_spec(name: str) -> ModelSpec:
    """The registry entry of ``name``; the error lists the registered names."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name]


def build_model(
    name: str,
    lead_names: Sequence[str] = CANONICAL_LEADS,
    input_dim: int = 5000,
    latent_dim: int = 256,
    **options,
) -> nn.Module:
    """Build a registered model by name.

    Args:
        name: a key of :data:`MODELS`.
        lead_names: the model's leads.
        input_dim: samples per lead T.
        latent_dim: latent size D (latent models).
        **options: builder keyword arguments (``ModelSpec.options`` lists those a configuration may set; the
            builders also take the model classes' own keyword arguments, e.g. ``gate_hidden_dim``).

    Returns:
        nn.Module: a MultimodalVAE, or a classifier network for end-to-end models.
    """
    return model_spec(name).build(tuple(lead_names), input_dim, latent_dim, **options)


def build_from_args(**args) -> nn.Module:
    """Rebuild a model from a JSON record ``{"name", "lead_names", "input_dim", "latent_dim", **options}``."""
    args = dict(args)
    return build_model(args.pop("name"), args.pop("lead_names"), args.pop("input_dim"), args.pop("latent_dim"), **args)
