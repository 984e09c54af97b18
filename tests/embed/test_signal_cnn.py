"""Batched lead encoders and decoders: equivalence with PyKale, any length, lead conditioning, implementations."""

import pytest
import torch
import torch.nn.functional as F

from kale_ext.embed.fusion import LOG_VAR_MAX
from kale_ext.embed.signal_cnn import (
    CONV_IMPLS,
    LeadwiseSignalDecoder,
    LeadwiseSignalVAEEncoder,
    SharedLeadDecoder,
    conv_output_length,
    resolve_conv_impl,
)

# "triton" runs fused kernels (the CPU interpreter here): compared with "conv" in tests/embed/test_conv_triton.py.
TORCH_IMPLS = tuple(impl for impl in CONV_IMPLS if impl != "triton")

kale_cnn = pytest.importorskip("kale.embed.signal_cnn")

ATOL = 1e-5


def _kale_encoders(num_leads, input_dim, latent_dim):
    return [kale_cnn.SignalVAEEncoder(input_dim=input_dim, latent_dim=latent_dim) for _ in range(num_leads)]


def _kale_outputs(encoders, x):
    outs = [enc(x[:, i : i + 1]) for i, enc in enumerate(encoders)]
    return torch.stack([m for m, _ in outs]), torch.stack([v for _, v in outs])


@pytest.mark.parametrize("conv_impl", TORCH_IMPLS)
def test_from_kale_matches_independent_pykale_encoders(conv_impl):
    encoders = _kale_encoders(4, 96, 6)
    x = torch.randn(5, 4, 96)
    ours = LeadwiseSignalVAEEncoder.from_kale(encoders, conv_impl=conv_impl)
    mean, log_var = ours(x)
    ref_mean, ref_log_var = _kale_outputs(encoders, x)
    assert mean.shape == (4, 5, 6)
    torch.testing.assert_close(mean, ref_mean, atol=ATOL, rtol=0)
    torch.testing.assert_close(log_var, ref_log_var, atol=ATOL, rtol=0)


@pytest.mark.parametrize("conv_impl", TORCH_IMPLS)
def test_gradients_match_pykale(conv_impl):
    encoders = _kale_encoders(3, 40, 4)
    ours = LeadwiseSignalVAEEncoder.from_kale(encoders, conv_impl=conv_impl)
    x = torch.randn(2, 3, 40)
    mean, log_var = ours(x)
    (mean.square().sum() + log_var.sum()).backward()
    ref_mean, ref_log_var = _kale_outputs(encoders, x)
    (ref_mean.square().sum() + ref_log_var.sum()).backward()
    ref_grad = torch.stack([e.conv2.weight.grad for e in encoders])
    torch.testing.assert_close(ours.conv_weights[1].grad, ref_grad, atol=1e-4, rtol=1e-4)
    ref_head = torch.stack([torch.cat([e.fc_mu.weight.grad, e.fc_log_var.weight.grad]) for e in encoders])
    torch.testing.assert_close(ours.head_weight.grad, ref_head, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("input_dim", [64, 61])
def test_to_kale_round_trip(input_dim):
    ours = LeadwiseSignalVAEEncoder(3, input_dim, 5)
    exported = ours.to_kale()
    x = torch.randn(2, 3, input_dim)
    mean, log_var = ours(x)
    ref_mean, ref_log_var = _kale_outputs(exported, x)  # PyKale modules run on length-T signals
    torch.testing.assert_close(mean, ref_mean, atol=ATOL, rtol=0)
    torch.testing.assert_close(log_var, ref_log_var, atol=ATOL, rtol=0)
    back = LeadwiseSignalVAEEncoder.from_kale(exported, input_dim=input_dim)
    for a, b in zip(ours.parameters(), back.parameters()):
        assert torch.equal(a, b)


def test_from_kale_rejects_wrong_length():
    with pytest.raises(ValueError, match="input_dim"):
        LeadwiseSignalVAEEncoder.from_kale(_kale_encoders(2, 64, 4), input_dim=80)


@pytest.mark.parametrize("input_dim", [1000, 2500, 4999, 5000])
def test_any_length_encodes_and_decodes(input_dim):
    enc = LeadwiseSignalVAEEncoder(2, input_dim, 4)
    x = torch.randn(2, 2, input_dim)
    mean, log_var = enc(x)
    assert enc.flat_dim == 64 * -(-input_dim // 8)
    assert mean.shape == log_var.shape == (2, 2, 4)
    ref_mean, _ = _kale_outputs(enc.to_kale(), x)
    torch.testing.assert_close(mean, ref_mean, atol=ATOL, rtol=0)
    for mode in ("lead", "identical"):
        recon = SharedLeadDecoder(2, input_dim, 4, mode=mode)(mean[0])
        assert recon.shape == (2, 2, input_dim)


def test_conv_output_length_is_ceil():
    for t in [1, 7, 8, 9, 4999, 5000]:
        assert conv_output_length(t) == -(-t // 8)


def test_select_and_lead_index_equal_full_encoding():
    enc = LeadwiseSignalVAEEncoder(6, 32, 4)
    x = torch.randn(3, 6, 32)
    mean, log_var = enc(x)
    picked = [4, 1, 2]
    sub_mean, sub_log_var = enc(x[:, picked], lead_index=picked)
    assert torch.equal(sub_mean, mean[picked])
    sel_mean, _ = enc.select(picked)(x[:, picked])
    torch.testing.assert_close(sel_mean, mean[picked], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="lead_index"):
        enc(x[:, :3])


def test_log_var_is_bounded_and_float32_under_autocast():
    enc = LeadwiseSignalVAEEncoder(2, 16, 3)
    with torch.no_grad():
        enc.head_bias[:, 3:] = 1e4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mean, log_var = enc(torch.randn(2, 2, 16))
    assert mean.dtype == log_var.dtype == torch.float32
    assert torch.all(log_var == LOG_VAR_MAX)


def _reference_decode(decoder, z, lead):
    shift = decoder.lead_embedding[lead] if decoder.mode == "lead" else 0.0
    h = decoder.fc(z + shift).view(z.shape[0], 64, -1)
    h = F.relu(decoder.deconvs[0](h))
    h = F.relu(decoder.deconvs[1](h))
    return decoder.deconvs[2](h)[:, 0, : decoder.output_dim]


@pytest.mark.parametrize("mode", ["lead", "identical"])
@pytest.mark.parametrize("conv_impl", TORCH_IMPLS)
def test_shared_decoder_matches_per_lead_reference(mode, conv_impl):
    decoder = SharedLeadDecoder(3, 45, 5, mode=mode, conv_impl=conv_impl)
    z = torch.randn(4, 5)
    recon = decoder(z)
    reference = torch.stack([_reference_decode(decoder, z, lead) for lead in range(3)], dim=1)
    torch.testing.assert_close(recon, reference, atol=1e-5, rtol=1e-5)


def test_lead_mode_differs_across_leads_identical_mode_does_not():
    z = torch.randn(3, 6)
    lead = SharedLeadDecoder(4, 40, 6, mode="lead")(z)
    same = SharedLeadDecoder(4, 40, 6, mode="identical")(z)
    for i in range(1, 4):
        assert not torch.allclose(lead[:, 0], lead[:, i])
        assert torch.equal(same[:, 0], same[:, i])


def test_paper_size_parameter_counts():
    with torch.device("meta"):
        enc = LeadwiseSignalVAEEncoder(1, 5000, 256)
        dec = SharedLeadDecoder(12, 5000, 256, mode="identical")
        lead_dec = SharedLeadDecoder(12, 5000, 256, mode="lead")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(enc) == 20_488_352  # method_spec.md section 1.1
    assert count(dec) == 10_290_353  # section 1.3
    assert count(lead_dec) == 10_290_353 + 12 * 256


def test_leadwise_decoder_equals_separate_decoders():
    dec = LeadwiseSignalDecoder(3, 30, 4)
    z = torch.randn(2, 4)
    recon = dec(z)
    for lead in range(3):
        single = SharedLeadDecoder(1, 30, 4, mode="identical")
        with torch.no_grad():
            single.fc.weight.copy_(dec.fc_weight[lead].t())
            single.fc.bias.copy_(dec.fc_bias[lead])
            for i, deconv in enumerate(single.deconvs):
                deconv.weight.copy_(dec.deconv_weights[i][lead])
                deconv.bias.copy_(dec.deconv_biases[i][lead])
        torch.testing.assert_close(recon[:, lead], single(z)[:, 0], atol=1e-5, rtol=1e-5)


def test_auto_implementation_resolves_by_device_and_block_diagonal_equals_grouped():
    """auto = grouped kernels on CPU, block-diagonal dense kernels on CUDA; the two give the same numbers."""
    assert resolve_conv_impl("auto", torch.device("cpu")) == "conv"
    assert resolve_conv_impl("auto", torch.device("cuda")) in ("triton", "blockdiag")  # triton when installed
    assert resolve_conv_impl("matmul", torch.device("cuda")) == "matmul"
    grouped = LeadwiseSignalVAEEncoder(4, 37, 3, conv_impl="conv")
    dense = LeadwiseSignalVAEEncoder(4, 37, 3, conv_impl="blockdiag")
    dense.load_state_dict(grouped.state_dict())
    x = torch.randn(5, 4, 37)
    for a, b in zip(grouped(x), dense(x)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    dec_a = SharedLeadDecoder(4, 37, 3, conv_impl="conv")
    dec_b = SharedLeadDecoder(4, 37, 3, conv_impl="blockdiag")
    dec_b.load_state_dict(dec_a.state_dict())
    z = torch.randn(5, 3, requires_grad=True)
    out_a, out_b = dec_a(z), dec_b(z)
    torch.testing.assert_close(out_a, out_b, atol=1e-5, rtol=1e-5)
    (ga,) = torch.autograd.grad(out_a.square().sum(), z)
    (gb,) = torch.autograd.grad(out_b.square().sum(), z)
    torch.testing.assert_close(ga, gb, atol=1e-4, rtol=1e-4)
