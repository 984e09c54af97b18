"""Tests of kale_ext.embed.zoo: the registry is complete, consistent, and builds what it says."""

import pytest
import torch

from kale_ext.embed.multimodal_vae import MultimodalVAE
from kale_ext.embed.zoo import (
    FUSED_MEAN,
    LEAD_MEANS,
    MODELS,
    POOLED,
    build_from_args,
    build_model,
    model_spec,
    stmem_patch_size,
)
from kale_ext.predict.heads import FEATURE_MODES
from kale_ext.predict.objectives import OBJECTIVES

LEADS = ("I", "II", "V1")


@pytest.mark.parametrize("name", list(MODELS))
def test_every_entry_is_consistent_and_builds(name):
    spec = MODELS[name]
    assert spec.label and isinstance(spec.label, str)
    assert set(spec.features) <= set(FEATURE_MODES)
    if spec.pretrained:
        assert spec.objective in OBJECTIVES and spec.features and spec.frozen
    else:
        assert spec.objective is None
    kwargs = {"widths": (4, 4, 8, 8)} if "widths" in spec.options else {}
    if "preset" in spec.options:
        kwargs["preset"] = "small"
    model = build_model(name, LEADS, 32, 4, **kwargs)
    if spec.features == (POOLED,):  # a token model with its own pooled features
        assert model.lead_names == LEADS and model.features(torch.randn(2, 3, 32), leads=LEADS).shape[0] == 2
    elif spec.features:  # a latent model: lead-named MultimodalVAE
        assert isinstance(model, MultimodalVAE) and model.lead_names == LEADS
    else:  # a classifier network: (B, L, T) -> logits
        assert model(torch.randn(2, 3, 32)).shape == (2, 2)


def test_end_to_end_models_are_the_ones_not_frozen_or_without_features():
    assert {n for n, s in MODELS.items() if s.end_to_end} == {"multimodal_cnn", "resnet1d", "xresnet1d"}
    assert MODELS["betavae"].features == (FUSED_MEAN,) and not MODELS["betavae"].multimodal
    assert MODELS["lsemvae"].features[0] == LEAD_MEANS


def test_unknown_names_and_options_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="lsemvae"):
        model_spec("bogus")
    with pytest.raises(TypeError, match="unknown options"):
        build_model("mvae", LEADS, 32, 4, bogus=1)


def test_build_from_args_rebuilds_the_same_architecture():
    args = {"name": "lsemvae", "lead_names": list(LEADS), "input_dim": 32, "latent_dim": 4, "no_gate": True}
    a, b = build_from_args(**args), build_model("lsemvae", LEADS, 32, 4, gate=False)
    assert list(a.state_dict()) == list(b.state_dict())
    assert a.fusion.gate is None


def test_stmem_patch_size_keeps_the_published_thirty_patches_per_lead():
    assert stmem_patch_size(2250) == 75  # the published 2250 samples at 250 Hz
    assert stmem_patch_size(5000) == 200 and stmem_patch_size(500) == 20
    with pytest.raises(ValueError, match="longer"):
        stmem_patch_size(1)


def test_random_encoder_is_the_architecture_at_its_seeded_initialisation():
    torch.manual_seed(3)
    rand = build_model("random_encoder", LEADS, 32, 4)
    torch.manual_seed(3)
    arch = build_model("lsemvae", LEADS, 32, 4)
    assert all(torch.equal(a, b) for a, b in zip(rand.state_dict().values(), arch.state_dict().values()))
    spec = MODELS["random_encoder"]
    assert not spec.pretrained and spec.frozen and not spec.end_to_end
    with pytest.raises(ValueError, match="pre-trainable"):
        build_model("random_encoder", LEADS, 32, 4, architecture="resnet1d")
