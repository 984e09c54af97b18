"""LSEMVAE and build_model: paper size, every baseline trains one step, decoder modes, MoPoE subsets."""

import pytest
import torch

from kale_ext.embed.fusion import HierarchicalModalityExperts, MeanFusion, PoEFusion, SubsetPoEFusion
from kale_ext.embed.lsemvae import LSEMVAE
from kale_ext.embed.multimodal_vae import MultimodalVAE
from kale_ext.embed.resnet1d import ResNet1d, XResNet1d
from kale_ext.embed.signal_cnn import LeadwiseSignalDecoder, SharedLeadDecoder
from kale_ext.embed.st_mem import STMEM
from kale_ext.embed.zoo import MODELS, build_model

PAPER_PARAMETERS = 256_150_577  # method_spec.md section 1.3 (the authors' architecture)
T, D = 40, 4
# Narrow supervised networks keep the CPU step fast; their full widths are tested in test_resnet1d.py.
TINY = {
    "resnet1d": {"widths": (8, 8, 16, 16)},
    "xresnet1d": {"widths": (4, 4, 8, 8), "stem_channels": (8, 8, 8)},
    "stmem": {"preset": "small"},
}


def test_paper_configuration_parameter_count():
    with torch.device("meta"):  # no memory, no initialisation cost
        model = LSEMVAE()
        reference = build_model("lsemvae_reference")
    assert model.lead_names == ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
    assert (model.input_dim, model.latent_dim) == (5000, 256)
    assert isinstance(model.fusion, HierarchicalModalityExperts) and model.fusion.gate is not None
    assert model.decoder.mode == "lead"
    assert abs(model.num_parameters() / PAPER_PARAMETERS - 1) < 0.02
    # The authors' path has no gate and no lead embedding: exactly their count.
    assert reference.num_parameters() == PAPER_PARAMETERS


def _loss(model, x):
    if isinstance(model, (ResNet1d, XResNet1d)):
        return torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 1]))
    if isinstance(model, STMEM):
        return model.pretrain_loss(x, generator=torch.Generator().manual_seed(0))["loss"]
    out = model(x, sample=True, generator=torch.Generator().manual_seed(0))
    recon = (out.recon - x).square().mean()
    kl = 0.5 * (out.fusion.log_var.exp() + out.fusion.mean.square() - 1 - out.fusion.log_var).sum(-1).mean()
    return recon + kl


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_takes_a_training_step(name):
    model = build_model(name, input_dim=T, latent_dim=D, **TINY.get(name, {})).train()
    x = torch.randn(3, 12, T)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    loss = _loss(model, x)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads), "a parameter got no gradient"
    optimiser.step()
    changed = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert changed >= len(before) // 2


def test_baselines_are_configurations():
    assert isinstance(build_model("mvae", input_dim=T, latent_dim=D).fusion, PoEFusion)
    mvae = build_model("mvae", input_dim=T, latent_dim=D)
    assert mvae.fusion.use_prior and isinstance(mvae.decoder, LeadwiseSignalDecoder)
    mopoe = build_model("mopoe", input_dim=T, latent_dim=D, decoder="lead")
    assert isinstance(mopoe.fusion, SubsetPoEFusion) and isinstance(mopoe.decoder, SharedLeadDecoder)
    assert isinstance(build_model("mmvae", input_dim=T, latent_dim=D).fusion, MeanFusion)
    ref = build_model("lsemvae_reference", input_dim=T, latent_dim=D)
    assert ref.fusion.mode == "reference" and ref.decoder.mode == "identical"
    for name in ("lsemvae", "mvae", "betavae", "multimodal_cnn"):
        assert isinstance(build_model(name, input_dim=T, latent_dim=D), MultimodalVAE)
    ablated = build_model("lsemvae", input_dim=T, latent_dim=D, no_gate=True, no_poe=True)
    assert ablated.fusion.gate is None and not ablated.fusion.use_poe and ablated.fusion.use_moe
    assert not build_model("lsemvae", input_dim=T, latent_dim=D, no_moe=True).fusion.use_moe
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vae", input_dim=T)
    with pytest.raises(TypeError, match="unknown options"):
        build_model("mvae", input_dim=T, latent_dim=D, bogus=1)


def test_reconstructions_differ_across_leads_by_default_and_not_in_reference():
    x = torch.randn(2, 12, T)
    recon = build_model("lsemvae", input_dim=T, latent_dim=D).eval()(x, sample=False).recon
    assert all(not torch.allclose(recon[:, 0], recon[:, i]) for i in range(1, 12))
    same = build_model("lsemvae_reference", input_dim=T, latent_dim=D).eval()(x, sample=False).recon
    assert all(torch.equal(same[:, 0], same[:, i]) for i in range(1, 12))


def test_mopoe_subset_sampling_is_uniform_over_subsets():
    model = build_model("mopoe", input_dim=T, latent_dim=D, generator=torch.Generator().manual_seed(1)).train()
    x = torch.randn(600, 12, T)
    with torch.no_grad():
        fused = model(x, sample=False).fusion
    sizes = (fused.weights > 0).sum(dim=0)
    # uniform over the 4095 non-empty subsets of 12 leads: size ~ Binomial(12, 1/2) given >= 1 (mean 6.0, sd 1.7)
    assert sizes.min() >= 1 and abs(sizes.double().mean() - 6.0) < 0.3
    assert set(range(3, 10)) <= set(sizes.tolist())
    with torch.no_grad():
        full = model.eval()(x[:20], sample=False).fusion
    assert torch.equal((full.weights > 0).sum(dim=0), torch.full((20,), 12))


def test_lead_dropout_option_reaches_the_model():
    model = build_model("lsemvae", input_dim=T, latent_dim=D, lead_dropout=0.5)
    assert model.lead_dropout == 0.5
    assert build_model("mvae", input_dim=T, latent_dim=D, lead_dropout=0.25).lead_dropout == 0.25
