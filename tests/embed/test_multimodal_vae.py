"""MultimodalVAE: named leads, the mask path, explicit sampling and lead dropout."""

import pytest
import torch

from kale_ext.embed.fusion import HierarchicalModalityExperts, MeanFusion
from kale_ext.embed.joint_cnn import JointSignalDecoder, JointSignalVAEEncoder
from kale_ext.embed.multimodal_vae import MultimodalVAE, VAEOutput
from kale_ext.embed.signal_cnn import LeadwiseSignalVAEEncoder, SharedLeadDecoder

LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
LIMB = LEADS[:6]
T, D = 48, 6


def _model(lead_dropout=0.0, generator=None):
    return MultimodalVAE(
        LeadwiseSignalVAEEncoder(12, T, D),
        HierarchicalModalityExperts(12, D),
        SharedLeadDecoder(12, T, D),
        LEADS,
        lead_dropout=lead_dropout,
        generator=generator,
    )


def _assert_fusion_equal(a, b):
    # Equal to float32 rounding: the mask path runs all 12 encoders as one grouped convolution (no host sync to
    # skip absent ones), the named-subset path runs 6; the kernels may round the same sums differently.
    for name, x, y in zip(a._fields, a, b):
        if x.dtype == torch.bool:
            assert torch.equal(x, y), name
        else:
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=name)


def test_six_lead_subset_equals_mask_path():
    model = _model().eval()
    x = torch.randn(4, 12, T)
    mask = torch.zeros(4, 12, dtype=torch.bool)
    mask[:, :6] = True
    by_mask = model(x, mask=mask, sample=False)
    by_names = model(x[:, :6], leads=LIMB, sample=False)
    _assert_fusion_equal(by_mask.fusion, by_names.fusion)
    torch.testing.assert_close(by_mask.recon, by_names.recon, atol=1e-6, rtol=1e-5)
    assert torch.equal(by_mask.lead_mask, by_names.lead_mask)
    assert by_names.lead_mask[:, :6].all() and not by_names.lead_mask[:, 6:].any()
    # The subset's experts equal the full model's experts for those leads.
    full = model.encode(x)
    torch.testing.assert_close(by_names.fusion.expert_mean[:6], full.mean[:6], atol=1e-6, rtol=0)


def test_absent_channel_content_is_ignored_even_nan():
    model = _model().eval()
    x = torch.randn(3, 12, T)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[0, 7] = mask[1, 2] = False
    other = x.clone()
    other[0, 7] = float("nan")
    other[1, 2] = 1e6
    a = model(x, mask=mask, sample=False)
    b = model(other, mask=mask, sample=False)
    _assert_fusion_equal(a.fusion, b.fusion)
    b.recon.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert not a.fusion.expert_mask[7, 0] and a.fusion.weights[7, 0] == 0


def test_leads_in_any_order():
    model = _model().eval()
    x = torch.randn(2, 12, T)
    order = [5, 0, 3]
    a = model(x[:, :6][:, [0, 3, 5]], leads=["I", "aVR", "aVF"], sample=False)
    b = model(x[:, order], leads=[LEADS[i] for i in order], sample=False)
    torch.testing.assert_close(a.fusion.mean, b.fusion.mean, atol=1e-6, rtol=0)


def test_encode_errors_say_what_to_do():
    model = _model()
    with pytest.raises(ValueError, match="leads="):
        model.encode(torch.randn(2, 6, T))
    with pytest.raises(ValueError, match="not leads of this model"):
        model.encode(torch.randn(2, 1, T), leads=["X"])


def test_sampling_is_explicit_not_a_mode_side_effect():
    model = _model()
    x = torch.randn(3, 12, T)
    for train in (True, False):
        model.train(train)
        out = model(x, sample=False)
        assert isinstance(out, VAEOutput)
        assert torch.equal(out.z, out.fusion.mean)
    model.eval()
    s1 = model(x, sample=True, generator=torch.Generator().manual_seed(3))
    s2 = model(x, sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(s1.z, s2.z)
    assert not torch.allclose(s1.z, s1.fusion.mean)
    assert s1.recon.shape == (3, 12, T)


def test_lead_dropout_keeps_a_present_lead_and_only_in_training():
    model = _model(lead_dropout=0.7, generator=torch.Generator().manual_seed(0))
    present = torch.rand(2000, 12) < 0.8
    present[0] = False  # a sample with nothing present stays empty
    dropped = model.drop_leads(present)
    assert not (dropped & ~present).any()
    has_any = present.any(dim=1)
    assert torch.equal(dropped.any(dim=1), has_any)
    rate = 1 - dropped[has_any].sum() / present[has_any].sum()
    assert 0.6 < rate < 0.75  # about p, a little less because one lead is always kept
    x = torch.randn(8, 12, T)
    train_out = model.train()(x, sample=False)
    assert (train_out.lead_mask.sum(dim=1) < 12).any()
    assert model.eval()(x, sample=False).lead_mask.all()


def test_lead_dropout_reproducible_with_generator():
    model = _model(lead_dropout=0.5).train()
    present = torch.ones(50, 12, dtype=torch.bool)
    a = model.drop_leads(present, torch.Generator().manual_seed(7))
    b = model.drop_leads(present, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_joint_encoder_model_zero_fills_absent_leads():
    model = MultimodalVAE(JointSignalVAEEncoder(12, T, D), MeanFusion(), JointSignalDecoder(12, T, D), LEADS).eval()
    x = torch.randn(2, 12, T)
    post = model.encode(x[:, :6], leads=LIMB)
    assert post.mean.shape == (1, 2, D) and post.mask.all()
    zero_filled = x.clone()
    zero_filled[:, 6:] = 0
    torch.testing.assert_close(post.mean, model.encode(zero_filled).mean, atol=1e-6, rtol=0)


def test_num_parameters_counts_all_parts():
    model = _model()
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    model.encoder.requires_grad_(False)
    assert model.num_parameters(trainable_only=True) == model.num_parameters() - sum(
        p.numel() for p in model.encoder.parameters()
    )


def test_masked_forward_compiles_without_a_graph_break():
    """No host synchronisation in the masked path: dynamo traces encode, fuse, sample and decode as one graph."""
    import torch._dynamo

    from kale_ext.embed.zoo import build_model

    leads = ("I", "II", "V1")
    model = build_model("lsemvae", leads, 32, 4, conv_impl="conv")
    x = torch.randn(4, 3, 32)
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[0, 2] = False
    explained = torch._dynamo.explain(model.forward)(x, mask=mask, leads=leads, sample=True)
    assert explained.graph_break_count == 0, explained.break_reasons
