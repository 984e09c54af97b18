"""Tests of kale_ext.embed.zoo: the registry is complete, consistent, and builds what it says."""

import pytest
import torch

from kale_ext.embed.multimodal_vae import MultimodalVAE
from kale_ext.embed.zoo import FUSED_MEAN, LEAD_MEANS, MODELS, build_from_args, build_model, model_spec
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
    model = build_model(name, LEADS, 32, 4, **kwargs)
    if spec.features:  # a latent model: lead-named MultimodalVAE
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
