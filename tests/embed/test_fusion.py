"""Properties of the Gaussian fusion layers: masking, moments, gate, HiME flags and modes, numerics, export."""

import math

import pytest
import torch

from kale_ext.embed.fusion import (
    LOG_VAR_MAX,
    LOG_VAR_MIN,
    ExpertGate,
    FusionOutput,
    HierarchicalModalityExperts,
    MeanFusion,
    MixtureOfExperts,
    PoEFusion,
    ProductOfExperts,
    SubsetPoEFusion,
    all_nonempty_subsets,
    bound_log_var,
    is_gate,
    masked_softmax,
    subset_products,
)

M, B, D = 5, 6, 4


def _experts(m=M, b=B, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(m, b, d, generator=g)
    log_var = torch.randn(m, b, d, generator=g)
    return mean, log_var


def _mask(m=M, b=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(m, b, generator=g) > 0.4
    mask[0, 0] = False
    return mask


def _poe_by_hand(mean, log_var, prior):
    """Direct product formula in float64 over a list of experts (E, D)."""
    prec = torch.exp(-log_var.double())
    num = (mean.double() * prec).sum(0)
    den = prec.sum(0) + (1.0 if prior else 0.0)
    return num / den, -torch.log(den)


# ---------------------------------------------------------------- product of experts


@pytest.mark.parametrize("use_prior", [True, False])
def test_poe_matches_formula_and_masking_equals_removal(use_prior):
    mean, log_var = _experts()
    mask = _mask()
    mask[:, 1] = True  # at least one sample with everything present
    fused_mean, fused_log_var = ProductOfExperts(use_prior)(mean, log_var, mask)
    for b in range(B):
        keep = mask[:, b]
        if not keep.any():
            continue
        # removal: fuse only the present experts of this sample
        rm_mean, rm_log_var = ProductOfExperts(use_prior)(mean[keep, b : b + 1], log_var[keep, b : b + 1])
        torch.testing.assert_close(fused_mean[b], rm_mean[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused_log_var[b], rm_log_var[0], rtol=1e-5, atol=1e-6)
        hand_mean, hand_log_var = _poe_by_hand(mean[keep, b], log_var[keep, b], use_prior)
        torch.testing.assert_close(fused_mean[b].double(), hand_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused_log_var[b].double(), hand_log_var, rtol=1e-5, atol=1e-6)


def test_poe_absent_placeholders_do_not_leak():
    mean, log_var = _experts()
    mask = _mask()
    dirty_mean = mean.clone()
    dirty_log_var = log_var.clone()
    dirty_mean[~mask] = float("nan")
    dirty_log_var[~mask] = float("inf")
    dirty_mean.requires_grad_(True)
    out = ProductOfExperts()(dirty_mean, dirty_log_var, mask)
    clean = ProductOfExperts()(mean, log_var, mask)
    torch.testing.assert_close(out[0], clean[0])
    torch.testing.assert_close(out[1], clean[1])
    out[0].sum().backward()
    assert torch.isfinite(dirty_mean.grad).all()
    assert (dirty_mean.grad[~mask] == 0).all()


@pytest.mark.parametrize("k", [1, 2, 7])
def test_k_identical_experts_without_prior_give_variance_over_k(k):
    mean = torch.randn(1, B, D).expand(k, B, D)
    log_var = torch.randn(1, B, D).expand(k, B, D)
    fused_mean, fused_log_var = ProductOfExperts(use_prior=False)(mean, log_var)
    torch.testing.assert_close(fused_mean, mean[0])
    torch.testing.assert_close(fused_log_var.exp(), log_var[0].exp() / k, rtol=1e-5, atol=0)


def test_all_absent_sample_gets_standard_normal():
    mean, log_var = _experts()
    mask = torch.ones(M, B, dtype=torch.bool)
    mask[:, 2] = False
    for use_prior in (True, False):
        fused_mean, fused_log_var = ProductOfExperts(use_prior)(mean, log_var, mask)
        assert torch.equal(fused_mean[2], torch.zeros(D))
        assert torch.equal(fused_log_var[2], torch.zeros(D))
        assert torch.isfinite(fused_mean).all() and torch.isfinite(fused_log_var).all()
    out = HierarchicalModalityExperts(M, D)(mean, log_var, mask)
    assert torch.allclose(out.mean[2], torch.zeros(D), atol=1e-6)
    assert torch.allclose(out.log_var[2], torch.zeros(D), atol=1e-6)


def test_poe_agrees_with_pykale():
    kale_fusion = pytest.importorskip("kale.embed.multimodal_fusion")
    # pykale adds eps = 1e-8 to variances twice and has no prior or mask: it is valid where variances >> eps.
    mean, log_var = _experts(m=3)
    log_var = log_var.clamp(-5, 5)
    ref_mean, ref_log_var = kale_fusion.ProductOfExperts()(mean, log_var)
    ours_mean, ours_log_var = ProductOfExperts(use_prior=False)(mean, log_var)
    torch.testing.assert_close(ours_mean, ref_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_log_var, ref_log_var, rtol=1e-4, atol=1e-5)
    # With the prior: pykale's PoE over the stack with an explicit N(0, I) expert appended.
    with_prior = kale_fusion.ProductOfExperts()(
        torch.cat([mean, torch.zeros(1, B, D)]), torch.cat([log_var, torch.zeros(1, B, D)])
    )
    ours = ProductOfExperts(use_prior=True)(mean, log_var)
    torch.testing.assert_close(ours[0], with_prior[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[1], with_prior[1], rtol=1e-4, atol=1e-5)


def test_poe_stable_where_naive_overflows():
    mean = torch.randn(3, 2, D)
    # exp(20) overflows float16 (max 65504): the product must be computed in float32 log space.
    log_var = torch.full((3, 2, D), -20.0)
    fused_mean, fused_log_var = ProductOfExperts(use_prior=True)(mean.half(), log_var.half())
    assert fused_mean.dtype == torch.float32
    expected = math.log(1.0 / (3 * math.exp(20.0) + 1.0))
    torch.testing.assert_close(fused_log_var, torch.full_like(fused_log_var, expected), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_mean, mean.half().float().mean(0), rtol=1e-4, atol=1e-4)
    # the fused log-variance is itself bounded: three experts at the lower bound give exactly LOG_VAR_MIN
    _, at_min = ProductOfExperts()(mean, torch.full((3, 2, D), LOG_VAR_MIN))
    assert (at_min == LOG_VAR_MIN).all()


# ---------------------------------------------------------------- mixture and gate


def test_moe_masking_equals_removal_and_renormalises():
    mean, log_var = _experts()
    mask = _mask()
    weights = torch.rand(M, B)
    fused_mean, fused_log_var = MixtureOfExperts()(mean, log_var, weights, mask)
    for b in range(B):
        keep = mask[:, b]
        if not keep.any():
            continue
        w = weights[keep, b : b + 1]
        rm_mean, rm_log_var = MixtureOfExperts()(mean[keep, b : b + 1], log_var[keep, b : b + 1], w)
        torch.testing.assert_close(fused_mean[b], rm_mean[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused_log_var[b], rm_log_var[0], rtol=1e-5, atol=1e-6)
        # the textbook moments, by hand
        wn = (w[:, 0] / w.sum()).double()[:, None]
        mu = (wn * mean[keep, b].double()).sum(0)
        var = (wn * (log_var[keep, b].double().exp() + mean[keep, b].double() ** 2)).sum(0) - mu**2
        torch.testing.assert_close(fused_mean[b].double(), mu, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused_log_var[b].double(), var.log(), rtol=1e-5, atol=1e-6)


def test_moe_moments_match_monte_carlo():
    g = torch.Generator().manual_seed(3)
    k, d, n = 4, 3, 2_000_000
    mean = torch.randn(k, 1, d, generator=g) * 2
    log_var = torch.randn(k, 1, d, generator=g) * 0.5
    weights = torch.rand(k, 1, generator=g) + 0.1
    fused_mean, fused_log_var = MixtureOfExperts()(mean, log_var, weights)
    comp = torch.multinomial((weights[:, 0] / weights.sum()), n, replacement=True, generator=g)
    samples = mean[comp, 0] + (0.5 * log_var[comp, 0]).exp() * torch.randn(n, d, generator=g)
    mc_mean, mc_var = samples.mean(0), samples.var(0)
    scale = fused_log_var[0].exp().sqrt()
    assert ((fused_mean[0] - mc_mean).abs() / scale).max() < 0.01
    assert ((fused_log_var[0].exp() - mc_var).abs() / mc_var).max() < 0.01


def test_moe_variance_never_negative_for_tiny_variances():
    mean = torch.full((3, 2, D), 1234.5)
    log_var = torch.full((3, 2, D), LOG_VAR_MIN)
    _, fused_log_var = MixtureOfExperts()(mean, log_var, torch.rand(3, 2))
    assert torch.isfinite(fused_log_var).all()
    assert (fused_log_var >= LOG_VAR_MIN).all() and (fused_log_var <= LOG_VAR_MIN + 1e-3).all()


def test_gate_weights_sum_to_one_and_zero_for_absent():
    mean, log_var = _experts()
    mask = _mask()
    mask[:, 3] = False  # a sample with nothing present
    gate = ExpertGate(D, M, hidden_dim=8, temperature=0.7)
    with torch.no_grad():
        gate.expert_embedding.normal_()
    weights = gate(mean, log_var, mask).weights  # the gate returns a GateOutput; weights as before
    assert weights.shape == (M, B)
    has_any = mask.any(0)
    torch.testing.assert_close(weights.sum(0)[has_any], torch.ones(int(has_any.sum())))
    assert (weights[~mask] == 0).all()
    assert (weights[:, 3] == 0).all() and torch.isfinite(weights).all()
    assert (weights[mask] > 0).all()
    # each expert is scored on its own: removing other experts only renormalises the rest
    b = int(torch.nonzero(mask.sum(0) >= 2)[0])
    present = torch.nonzero(mask[:, b])[:, 0]
    drop = torch.zeros(M, dtype=torch.bool)
    drop[present[0]] = True
    mask2 = mask.clone()
    mask2[drop, b] = False
    w2 = gate(mean, log_var, mask2).weights
    keep = mask2[:, b]
    torch.testing.assert_close(w2[keep, b], weights[keep, b] / weights[keep, b].sum())


def test_masked_softmax_gradients_finite_with_empty_rows():
    logits = torch.randn(4, 3, requires_grad=True)
    mask = torch.tensor([[True, False, False], [True, False, True], [False, False, True], [False, False, True]])
    p = masked_softmax(logits, mask)
    (p * torch.arange(12.0).reshape(4, 3)).sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (p[:, 1] == 0).all()


# ---------------------------------------------------------------- HiME


def test_hime_masking_equals_removal():
    mean, log_var = _experts()
    mask = _mask()
    hime = HierarchicalModalityExperts(M, D, gate=True, gate_hidden_dim=8)
    with torch.no_grad():
        hime.gate.expert_embedding.normal_()
    out = hime(mean, log_var, mask)
    assert isinstance(out, FusionOutput)
    assert out.weights.shape == (M + 1, B) and out.expert_mean.shape == (M + 1, B, D)
    b = int(torch.nonzero(mask.sum(0) >= 2)[0])
    keep = mask[:, b]
    # Removal: same stack with the absent experts replaced by garbage values but masked -> identical result.
    garbage_mean, garbage_log_var = mean.clone(), log_var.clone()
    garbage_mean[~mask] = 1e6
    garbage_log_var[~mask] = -1e6
    out2 = hime(garbage_mean, garbage_log_var, mask)
    torch.testing.assert_close(out2.mean, out.mean)
    torch.testing.assert_close(out2.log_var, out.log_var)
    # Removal by recomputation from the present experts only, with the same gate parameters.
    shared_m, shared_lv = ProductOfExperts(True)(mean[keep, b : b + 1], log_var[keep, b : b + 1])
    e_mean = torch.cat([mean[keep, b : b + 1], shared_m[None]])
    e_lv = torch.cat([log_var[keep, b : b + 1], shared_lv[None]])
    idx = torch.cat([torch.nonzero(keep)[:, 0], torch.tensor([M])])
    feats = torch.cat([e_mean, e_lv], -1)
    scores = hime.gate.output_layer(
        hime.gate.activation(hime.gate.input_layer(feats) + hime.gate.expert_embedding[idx].unsqueeze(1))
    ).squeeze(-1)
    w = torch.softmax(scores, 0)
    rm_mean, rm_log_var = MixtureOfExperts()(e_mean, e_lv, w)
    torch.testing.assert_close(out.weights[idx, b], w[:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.mean[b], rm_mean[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.log_var[b], rm_log_var[0], rtol=1e-5, atol=1e-6)


def test_hime_single_present_modality():
    mean, log_var = _experts()
    mask = torch.zeros(M, B, dtype=torch.bool)
    mask[2] = True
    out = HierarchicalModalityExperts(M, D, use_prior=False, gate=False)(mean, log_var, mask)
    # Without the prior the shared expert equals the single modality, so the mixture is that modality.
    torch.testing.assert_close(out.mean, mean[2])
    torch.testing.assert_close(out.log_var, log_var[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.weights[2], torch.full((B,), 0.5))
    torch.testing.assert_close(out.weights[M], torch.full((B,), 0.5))
    assert (out.weights[[0, 1, 3, 4]] == 0).all()
    # With the prior and a gate: weights only on the modality and the shared expert, finite output.
    hime = HierarchicalModalityExperts(M, D, gate=True, gate_hidden_dim=8)
    out = hime(mean, log_var, mask)
    torch.testing.assert_close(out.weights[2] + out.weights[M], torch.ones(B))
    shared_m, shared_lv = ProductOfExperts(True)(mean[2:3], log_var[2:3])
    torch.testing.assert_close(out.expert_mean[M], shared_m)
    assert torch.isfinite(out.mean).all() and torch.isfinite(out.log_var).all()


def test_hime_flags():
    mean, log_var = _experts()
    mask = _mask()
    # gate=False: uniform over present experts (modalities + the shared expert)
    out = HierarchicalModalityExperts(M, D, gate=False)(mean, log_var, mask)
    assert not any(isinstance(mod, ExpertGate) for mod in HierarchicalModalityExperts(M, D, gate=False).modules())
    count = mask.sum(0) + 1
    expected = torch.cat([mask.float(), torch.ones(1, B)]) / count
    torch.testing.assert_close(out.weights, expected)
    # use_poe=False: shared expert masked out with weight 0
    out = HierarchicalModalityExperts(M, D, use_poe=False, gate=True, gate_hidden_dim=8)(mean, log_var, mask)
    assert not out.expert_mask[M].any() and (out.weights[M] == 0).all()
    has_any = mask.any(0)
    torch.testing.assert_close(out.weights[:M].sum(0)[has_any], torch.ones(int(has_any.sum())))
    ref = MixtureOfExperts()(mean, log_var, out.weights[:M], mask)
    torch.testing.assert_close(out.mean[has_any], ref[0][has_any])
    # use_moe=False: the shared PoE expert is the output
    out = HierarchicalModalityExperts(M, D, use_moe=False)(mean, log_var, mask)
    poe = ProductOfExperts(True)(mean, log_var, mask)
    torch.testing.assert_close(out.mean, poe[0])
    torch.testing.assert_close(out.log_var, poe[1])
    assert (out.weights[M] == 1).all() and (out.weights[:M] == 0).all()
    with pytest.raises(ValueError):
        HierarchicalModalityExperts(M, D, use_poe=False, use_moe=False)
    with pytest.raises(ValueError, match="mask"):
        HierarchicalModalityExperts(M, D)(mean[:3], log_var[:3])


def test_hime_reference_mode_matches_hand_computation():
    m, d = 12, 3
    mean, log_var = _experts(m=m, b=2, d=d)
    out = HierarchicalModalityExperts(m, d, mode="reference", num_groups=4)(mean, log_var)
    assert out.expert_mean.shape == (4, 2, d) and out.weights.shape == (4, 2)
    torch.testing.assert_close(out.weights, torch.full((4, 2), 0.25))
    # prior appended at position 12: groups {0,1,2} {3,4,5} {6,7,8} {9,10,11}; the prior is in none of them
    group_means, group_log_vars = [], []
    for g in range(4):
        members = slice(3 * g, 3 * g + 3)
        prec = torch.exp(-log_var[members].double())
        group_log_vars.append(-torch.log(prec.sum(0)))
        group_means.append((mean[members].double() * prec).sum(0) / prec.sum(0))
    torch.testing.assert_close(out.mean.double(), torch.stack(group_means).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.log_var.double(), torch.stack(group_log_vars).mean(0), rtol=1e-5, atol=1e-6)
    # with 11 modalities the appended prior lands in the last group (position 11), as in the authors' split
    out11 = HierarchicalModalityExperts(11, d, mode="reference")(mean[:11], log_var[:11])
    last = ProductOfExperts(use_prior=True)(mean[9:11], log_var[9:11])
    torch.testing.assert_close(out11.expert_mean[3], last[0])
    torch.testing.assert_close(out11.expert_log_var[3], last[1])


def test_hime_reference_mode_masks_empty_groups():
    m, d = 12, 3
    mean, log_var = _experts(m=m, b=2, d=d)
    mask = torch.ones(m, 2, dtype=torch.bool)
    mask[3:6, 0] = False  # the second group is empty for sample 0
    out = HierarchicalModalityExperts(m, d, mode="reference")(mean, log_var, mask)
    assert out.expert_mask[:, 0].tolist() == [True, False, True, True]
    torch.testing.assert_close(out.weights[:, 0], torch.tensor([1 / 3, 0.0, 1 / 3, 1 / 3]))
    keep = [0, 2, 3]
    torch.testing.assert_close(out.mean[0], out.expert_mean[keep, 0].mean(0))


# ---------------------------------------------------------------- baselines


def test_baseline_fusions():
    mean, log_var = _experts()
    mask = _mask()
    has_any = mask.any(0)
    poe = PoEFusion()(mean, log_var, mask)
    ref = ProductOfExperts()(mean, log_var, mask)
    torch.testing.assert_close(poe.mean, ref[0])
    assert (poe.weights[~mask] == 0).all()
    torch.testing.assert_close(poe.weights.sum(0)[has_any], torch.ones(int(has_any.sum())))
    avg = MeanFusion()(mean, log_var, mask)
    for b in range(B):
        keep = mask[:, b]
        if keep.any():
            torch.testing.assert_close(avg.mean[b], mean[keep, b].mean(0))
            torch.testing.assert_close(avg.log_var[b], log_var[keep, b].mean(0))
        else:
            assert (avg.mean[b] == 0).all() and (avg.log_var[b] == 0).all()
    sub = SubsetPoEFusion().eval()(mean, log_var, mask)
    torch.testing.assert_close(sub.mean, ref[0])


def test_subset_poe_reaches_every_subset_size_and_respects_mask():
    m, b = 5, 400
    mask = torch.ones(m, b, dtype=torch.bool)
    mask[4, ::2] = False
    mask[:, 7] = False
    fusion = SubsetPoEFusion(generator=torch.Generator().manual_seed(0)).train()
    chosen = fusion.sample_subset(mask)
    assert not (chosen & ~mask).any()
    sizes = chosen.sum(0)
    assert sizes[7] == 0
    assert (sizes[mask.any(0)] >= 1).all()
    full = mask.all(0)  # odd columns except 7: five present experts
    assert set(sizes[full].tolist()) == {1, 2, 3, 4, 5}
    assert set(sizes[mask.sum(0) == 4].tolist()) == {1, 2, 3, 4}
    # members are drawn uniformly: every present expert gets chosen
    assert chosen[:4].any(1).all()
    # reproducible with a generator, different across calls
    again = SubsetPoEFusion(generator=torch.Generator().manual_seed(0)).sample_subset(mask)
    assert torch.equal(chosen, again)
    assert not torch.equal(chosen, fusion.sample_subset(mask))
    # forward uses the chosen subset
    mean, log_var = _experts(m=m, b=b)
    out = fusion(mean, log_var, mask, generator=torch.Generator().manual_seed(5))
    chosen5 = SubsetPoEFusion().sample_subset(mask, torch.Generator().manual_seed(5))
    torch.testing.assert_close(out.mean, ProductOfExperts()(mean, log_var, chosen5)[0])
    fixed = SubsetPoEFusion(subset_size=2).sample_subset(mask, torch.Generator().manual_seed(1))
    assert (fixed.sum(0)[mask.any(0)] == 2).all()


# ---------------------------------------------------------------- numerics and export


@pytest.mark.parametrize("value", [LOG_VAR_MIN, LOG_VAR_MAX])
def test_finite_gradients_at_bounds_under_bf16_autocast(value):
    mean = torch.randn(M, B, D, requires_grad=True)
    log_var = torch.full((M, B, D), value, requires_grad=True)
    mask = _mask()
    hime = HierarchicalModalityExperts(M, D, gate_hidden_dim=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hime(mean.bfloat16(), log_var.bfloat16(), mask)
        poe = ProductOfExperts()(mean.bfloat16(), log_var.bfloat16(), mask)
        loss = out.mean.square().sum() + out.log_var.sum() + poe[0].sum() + poe[1].sum()
    assert out.mean.dtype == torch.float32
    loss.backward()
    for grad in (mean.grad, log_var.grad, *(p.grad for p in hime.parameters())):
        assert grad is not None and torch.isfinite(grad).all()
    assert log_var.grad.abs().sum() > 0


def test_bound_log_var():
    x = torch.tensor([-100.0, LOG_VAR_MIN, 0.0, LOG_VAR_MAX, 100.0], requires_grad=True)
    y = bound_log_var(x)
    assert y.tolist() == [LOG_VAR_MIN, LOG_VAR_MIN, 0.0, LOG_VAR_MAX, LOG_VAR_MAX]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_hime_onnx_export_matches_torch(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    hime = HierarchicalModalityExperts(M, D, gate_hidden_dim=8).eval()
    mean, log_var = _experts()
    mask = _mask()
    mask[:, 2] = False
    path = tmp_path / "hime.onnx"
    torch.onnx.export(
        hime,
        (mean, log_var, mask),
        str(path),
        input_names=["modality_mean", "modality_log_var", "modality_mask"],
        output_names=list(FusionOutput._fields),
        opset_version=17,
    )
    onnx.checker.check_model(onnx.load(str(path)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # the mask is a real graph input: a different mask than at export time must be honoured
    for feed_mask in (mask, _mask(seed=7)):
        feed = {"modality_mean": mean.numpy(), "modality_log_var": log_var.numpy(), "modality_mask": feed_mask.numpy()}
        got = session.run(None, feed)
        with torch.no_grad():
            want = hime(mean, log_var, feed_mask)
        for name, g, w in zip(FusionOutput._fields, got, want):
            torch.testing.assert_close(torch.from_numpy(g).to(w.dtype), w, rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------- noisy top-k gate (Shazeer et al. 2017)


def test_noisy_gate_train_only_reproducible_and_masked():
    mean, log_var = _experts()
    mask = _mask()
    mask[:, 3] = False
    gate = ExpertGate(D, M, hidden_dim=8, noise=True)
    with torch.no_grad():
        gate.expert_embedding.normal_()
    gate.train()
    a = gate(mean, log_var, mask, generator=torch.Generator().manual_seed(0))
    b = gate(mean, log_var, mask, generator=torch.Generator().manual_seed(0))
    c = gate(mean, log_var, mask, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.weights, b.weights) and not torch.allclose(a.weights, c.weights)
    assert (a.weights[~mask] == 0).all() and (a.logits[~mask] == 0).all() and (a.weights[:, 3] == 0).all()
    has_any = mask.any(0)
    torch.testing.assert_close(a.weights.sum(0)[has_any], torch.ones(int(has_any.sum())))
    # the noise is eps * softplus(noise projection), which starts at softplus(0): logits - clean = eps * log 2
    clean = gate.eval()(mean, log_var, mask)
    eps = torch.randn((M, B), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.logits[mask], (clean.logits + eps * math.log(2.0))[mask], rtol=1e-5, atol=1e-5)
    # eval mode is deterministic and equals the noiseless gate with the same parameters
    plain = ExpertGate(D, M, hidden_dim=8)
    plain.load_state_dict({k: v for k, v in gate.state_dict().items() if not k.startswith("noise_layer")})
    e1, e2 = gate(mean, log_var, mask), gate(mean, log_var, mask)
    assert torch.equal(e1.weights, e2.weights)
    torch.testing.assert_close(e1.weights, plain.train()(mean, log_var, mask).weights)
    # dense gating: the load is the weight itself
    assert torch.equal(a.load, a.weights)
    # the noise scale is learned: its projection gets gradients through the weights
    gate.train()
    (gate(mean, log_var, mask).weights[0] * torch.arange(B)).sum().backward()
    assert gate.noise_layer.weight.grad.abs().sum() > 0


def test_top_k_gate_keeps_k_experts_per_sample():
    m, b, k = 6, 40, 2
    mean, log_var = _experts(m=m, b=b)
    mask = torch.ones(m, b, dtype=torch.bool)
    mask[:5, 0] = False  # one present expert: it is kept
    mask[2, 1:10] = False
    gate = ExpertGate(D, m, hidden_dim=8, top_k=k, noise=True)
    with torch.no_grad():
        gate.expert_embedding.normal_()
    for mode in (gate.train(), gate.eval()):
        out = mode(mean, log_var, mask, generator=torch.Generator().manual_seed(2))
        kept = (out.weights > 0).sum(0)
        assert kept[0] == 1 and (kept[1:] == k).all()
        assert (out.weights[~mask] == 0).all() and (out.load[~mask] == 0).all()
        torch.testing.assert_close(out.weights.sum(0), torch.ones(b))
        # the kept experts are those with the k largest logits among the present ones
        ranked = out.logits.masked_fill(~mask, float("-inf")).topk(k, dim=0).indices
        for j in range(1, b):
            assert set(ranked[:, j].tolist()) == set(torch.nonzero(out.weights[:, j])[:, 0].tolist())
    # eval: the load is the 0/1 selection
    assert torch.equal(out.load, (out.weights > 0).float())
    # a gate with k >= K is dense
    assert ExpertGate(D, m, top_k=m).top_k is None


def test_top_k_load_is_the_selection_probability_under_fresh_noise():
    """Shazeer's estimator: P(expert i selected | the other experts' noisy logits), checked by Monte Carlo."""
    m, k = 5, 2
    mean, log_var = _experts(m=m, b=3)
    gate = ExpertGate(D, m, hidden_dim=8, top_k=k, noise=True).train()
    with torch.no_grad():
        gate.expert_embedding.normal_()
        gate.noise_layer.bias.fill_(0.5)
    out = gate(mean, log_var, generator=torch.Generator().manual_seed(4))
    clean = gate.eval()(mean, log_var).logits
    std = torch.nn.functional.softplus(torch.tensor(0.5))
    g = torch.Generator().manual_seed(9)
    for i in range(m):
        others = torch.cat([out.logits[:i], out.logits[i + 1 :]])  # (m-1, 3), fixed
        kth_other = others.topk(k, dim=0).values[k - 1]
        draws = clean[i] + std * torch.randn(200_000, 3, generator=g)
        p_mc = (draws > kth_other).float().mean(0)
        torch.testing.assert_close(out.load[i], p_mc, atol=5e-3, rtol=0)
    # the load has gradients to the clean and the noise logits
    out.load.sum().backward()
    assert gate.noise_layer.bias.grad.abs() > 0 and gate.output_layer.bias.grad.abs() > 0


def test_hime_exposes_gate_outputs_and_takes_any_gate_module():
    mean, log_var = _experts()
    mask = _mask()
    hime = HierarchicalModalityExperts(M, D, gate_hidden_dim=8, gate_noise=True, gate_top_k=3)
    assert is_gate(hime.gate) and hime.gate.noise and hime.gate.top_k == 3
    out = hime(mean, log_var, mask, generator=torch.Generator().manual_seed(0))
    assert out.gate_logits.shape == out.gate_load.shape == (M + 1, B)
    assert ((out.weights > 0).sum(0) <= 3).all()
    assert HierarchicalModalityExperts(M, D, gate=False)(mean, log_var, mask).gate_load is None

    class Scorer(torch.nn.Module):  # no "Gate" in the name; plain (K, B) weights
        is_gate = True

        def forward(self, mean, log_var, mask):
            return torch.exp(-log_var.mean(-1))  # unnormalised, values also where absent

    custom = HierarchicalModalityExperts(M, D, gate=Scorer())
    got = custom(mean, log_var, mask)
    assert isinstance(custom.gate, Scorer) and is_gate(custom.gate)
    assert (got.weights[~got.expert_mask] == 0).all()
    torch.testing.assert_close(got.weights.sum(0), torch.ones(B))
    ref = MixtureOfExperts()(
        got.expert_mean, got.expert_log_var, torch.exp(-got.expert_log_var.mean(-1)), got.expert_mask
    )
    torch.testing.assert_close(got.mean, ref[0])
    torch.testing.assert_close(got.gate_load, got.weights)
    # a module returning a GateOutput is used as it is
    inner = ExpertGate(D, M + 1, hidden_dim=8)
    wrapped = HierarchicalModalityExperts(M, D, gate=inner)(mean, log_var, mask)
    torch.testing.assert_close(
        wrapped.weights, inner(wrapped.expert_mean, wrapped.expert_log_var, wrapped.expert_mask).weights
    )
    assert not is_gate(torch.nn.Linear(2, 2)) and not is_gate(None)


# ---------------------------------------------------------------- MoPoE subsets and subset products


def test_subset_sampling_is_uniform_over_nonempty_subsets():
    n, draws = 3, 70_000
    mask = torch.ones(n, draws, dtype=torch.bool)
    chosen = SubsetPoEFusion().sample_subset(mask, torch.Generator().manual_seed(0))
    assert chosen.any(0).all()
    code = (chosen.long() * torch.tensor([1, 2, 4])[:, None]).sum(0)
    counts = torch.bincount(code, minlength=8)[1:].double()
    expected = draws / 7
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 22.5  # chi-square, 6 degrees of freedom, p = 0.001
    # absent experts are never chosen; with 12 present the full set is rare (1/4095, the old sampler gave 1/12)
    m = 12
    mask = torch.ones(m, 40_000, dtype=torch.bool)
    mask[0, ::2] = False
    chosen = SubsetPoEFusion().sample_subset(mask, torch.Generator().manual_seed(1))
    assert not (chosen & ~mask).any() and chosen.any(0).all()
    full = chosen[:, 1::2].all(0).float().mean()
    assert full < 2e-3
    sizes = chosen[:, 1::2].sum(0).double()
    assert abs(sizes.mean() - 6 * 4096 / 4095) < 0.05  # Binomial(12, 1/2) given non-empty


def test_subset_products_equal_products_of_the_members():
    mean, log_var = _experts()
    mask = _mask()
    subsets = all_nonempty_subsets(M)
    assert subsets.shape == (2**M - 1, M) and len({tuple(r.tolist()) for r in subsets}) == 2**M - 1
    sub_mean, sub_log_var, sub_mask = subset_products(mean, log_var, mask, subsets)
    for s in (0, 6, 17, 30):
        members = subsets[s][:, None] & mask
        ref = ProductOfExperts(True)(mean, log_var, members)
        torch.testing.assert_close(sub_mean[s], ref[0])
        torch.testing.assert_close(sub_log_var[s], ref[1])
        assert torch.equal(sub_mask[s], members.any(0))
    # the unimodal posteriors q(z|x_m) ~ q_m p(z) of MVAE: precision 1/sigma_m^2 + 1
    uni_mean, uni_log_var, uni_mask = subset_products(mean, log_var, mask, torch.eye(M, dtype=torch.bool))
    assert torch.equal(uni_mask, mask)
    expected_log_var = -torch.log(torch.exp(-log_var) + 1)
    torch.testing.assert_close(uni_log_var[mask], expected_log_var[mask])
    torch.testing.assert_close(uni_mean[mask], (mean * torch.exp(expected_log_var - log_var))[mask])
    with pytest.raises(ValueError, match="subsets"):
        subset_products(mean, log_var, mask, torch.ones(3, M + 1, dtype=torch.bool))
