"""The consensus gate (``ExpertGate(context="consensus")``): the leave-one-out disagreement it reads, its start equal
to the plain gate, masking, and that it can learn what a gate reading one expert at a time cannot: turn down the
expert that disagrees with the others."""

import pytest
import torch

from kale_ext.embed.fusion import (
    GATE_CONTEXTS,
    ExpertGate,
    HierarchicalModalityExperts,
    consensus_disagreement,
)
from kale_ext.embed.zoo import build_model


def _brute_force(mean, log_var, mask, pool):
    k_all, b_all, d = mean.shape
    out = torch.zeros_like(mean)
    for k in range(k_all):
        for b in range(b_all):
            others = [j for j in range(pool) if j != k and mask[j, b]]
            if not mask[k, b] or not others:
                continue
            p = torch.stack([torch.exp(-log_var[j, b]) for j in others])
            m = (p * torch.stack([mean[j, b] for j in others])).sum(0) / p.sum(0)
            out[k, b] = torch.log1p((mean[k, b] - m) ** 2 / (torch.exp(log_var[k, b]) + 1 / p.sum(0)))
    return out


@pytest.mark.parametrize("pool", [6, 5, 2])
def test_disagreement_is_against_the_product_of_the_other_present_pool_experts(pool):
    g = torch.Generator().manual_seed(0)
    mean, log_var = torch.randn(6, 5, 3, generator=g), torch.randn(6, 5, 3, generator=g)
    mask = torch.rand(6, 5, generator=g) > 0.3
    mask[:, 0] = False
    mask[0, 0] = True  # a sample with one present expert: nothing to compare with
    d = consensus_disagreement(mean, log_var, mask, pool)
    torch.testing.assert_close(d, _brute_force(mean, log_var, mask, pool), atol=1e-5, rtol=1e-5)
    assert (d[:, 0] == 0).all() and (d[~mask] == 0).all()


def test_extreme_precisions_do_not_cancel():
    mean = torch.tensor([[[0.0]], [[1.0]], [[3.0]]])
    log_var = torch.tensor([[[-9.0]], [[0.0]], [[0.0]]])  # expert 0 is 8,000x more confident than the others
    d = consensus_disagreement(mean, log_var, torch.ones(3, 1, dtype=torch.bool), 3)
    # expert 0 against the product of experts 1 and 2: mean 2, variance 1/2
    expected = torch.log1p(torch.tensor(4.0) / (torch.exp(torch.tensor(-9.0)) + 0.5))
    torch.testing.assert_close(d[0, 0, 0], expected)


def test_consensus_gate_starts_equal_to_the_plain_gate_and_ignores_absent_experts():
    torch.manual_seed(0)
    plain = HierarchicalModalityExperts(4, 3)
    consensus = HierarchicalModalityExperts(4, 3, gate_context="consensus")
    missing = set(consensus.state_dict()) - set(plain.state_dict())
    assert missing == {"gate.context_layer.weight"}
    consensus.load_state_dict(plain.state_dict(), strict=False)
    g = torch.Generator().manual_seed(1)
    mean, log_var = torch.randn(4, 7, 3, generator=g), torch.randn(4, 7, 3, generator=g)
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[2, :3] = False
    torch.testing.assert_close(consensus(mean, log_var, mask).weights, plain(mean, log_var, mask).weights)
    torch.nn.init.normal_(consensus.gate.context_layer.weight)
    before = consensus(mean, log_var, mask).weights
    moved = mean.clone()
    moved[2] += 100.0  # absent in samples 0-2 (must not reach their weights), present in 3-6
    torch.testing.assert_close(consensus(moved, log_var, mask).weights[:, :3], before[:, :3])
    assert not torch.allclose(consensus(moved, log_var, mask).weights[:, 3:], before[:, 3:])


def test_bad_options_are_refused_and_the_registry_builds_the_consensus_gate():
    assert GATE_CONTEXTS == ("expert", "consensus")
    with pytest.raises(ValueError, match="gate context"):
        ExpertGate(3, 4, context="neighbours")
    with pytest.raises(ValueError, match="context_pool"):
        ExpertGate(3, 4, context="consensus", context_pool=5)
    model = build_model("lsemvae", ("I", "II", "III"), 64, 4, gate_context="consensus")
    assert model.fusion.gate.context == "consensus" and model.fusion.gate.context_pool == 3


def _train_gate(context: str, steps: int = 300, seed: int = 0):
    """Four lead experts see z; in half the samples one of them is replaced by an unrelated draw of the same spread.
    The gate is trained to bring the fused mean to z; returns (final loss, share of bad experts < 1/2 of clean)."""
    torch.manual_seed(seed)
    hime = HierarchicalModalityExperts(4, 4, use_prior=False, gate_hidden_dim=32, gate_context=context)
    opt = torch.optim.Adam(hime.parameters(), lr=3e-2)
    g = torch.Generator().manual_seed(seed + 1)

    def batch(n):
        z = torch.randn(n, 4, generator=g)
        mean = z.expand(4, n, 4) + 0.3 * torch.randn(4, n, 4, generator=g)
        bad = torch.randint(0, 4, (n,), generator=g)
        hit = torch.rand(n, generator=g) < 0.5
        rows = torch.arange(n)[hit]
        clean = mean.clone()
        mean[bad[hit], rows] = torch.randn(len(rows), 4, generator=g)  # same marginal spread as a good expert
        return z, clean, mean, torch.full((4, n, 4), 2 * torch.log(torch.tensor(0.3))), bad, hit

    for _ in range(steps):
        z, _, mean, log_var, _, _ = batch(128)
        loss = (hime(mean, log_var).mean - z).square().sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        z, clean, mean, log_var, bad, hit = batch(2000)
        out = hime(mean, log_var)
        w_clean = hime(clean, log_var).weights
        rows = torch.arange(2000)[hit]
        ratio = out.weights[bad[hit], rows] / w_clean[bad[hit], rows]
        return float((out.mean - z).square().sum(-1).mean()), float((ratio < 1 / 2).float().mean())


def test_consensus_gate_learns_to_turn_down_the_expert_that_disagrees():
    loss_plain, share_plain = _train_gate("expert")
    loss_consensus, share_consensus = _train_gate("consensus")
    assert share_consensus >= 0.8, share_consensus
    assert share_plain < 0.2, share_plain  # one expert at a time cannot tell an unrelated draw from a good one
    assert loss_consensus < 0.5 * loss_plain, (loss_consensus, loss_plain)
