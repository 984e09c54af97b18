"""Lead corruption: each kind does what it says, to one present lead, with the input left untouched."""

import pytest
import torch

from kale_ext.prepdata.corruption import CORRUPTION_KINDS, LeadCorruption, corrupt_leads

B, L, T = 64, 4, 200


def _signals(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, T, generator=g)


def _run(kind, mask=None, prob=1.0, seed=1):
    x = _signals()
    before = x.clone()
    out = corrupt_leads(x, mask, prob=prob, kinds=[kind], generator=torch.Generator().manual_seed(seed))
    assert torch.equal(x, before)  # the input (the reconstruction target) is untouched
    return x, out


def test_one_present_lead_per_record_and_nothing_else_changes():
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[:, 0] = False  # lead 0 absent everywhere: never chosen
    x, out = _run("invert", mask)
    assert out.corrupted.sum(1).eq(1).all() and not out.corrupted[:, 0].any()
    changed = (out.signals != x).any(-1)
    assert torch.equal(changed, out.corrupted)
    assert out.kind.eq(0).all()
    # the chosen lead is spread over the present leads (uniform: about B / 3 each)
    counts = out.corrupted.sum(0)[1:]
    assert counts.min() >= 10


def test_invert_and_flat():
    x, out = _run("invert")
    torch.testing.assert_close(out.signals[out.corrupted], -x[out.corrupted])
    x, out = _run("flat")
    assert out.signals[out.corrupted].abs().max() == 0


def test_noise_burst_is_a_window_of_added_noise():
    x, out = _run("noise")
    diff = (out.signals - x)[out.corrupted]  # (B, T)
    for row in diff:
        on = (row != 0).nonzero().flatten()
        assert 0.08 * T <= len(on) <= 0.5 * T + 1
        assert on.max() - on.min() + 1 == len(on)  # one contiguous burst
    assert 0.7 < diff[diff != 0].std() < 1.3


def test_baseline_wander_is_slow_and_large():
    x, out = _run("wander")
    diff = (out.signals - x)[out.corrupted]
    amp = diff.abs().amax(-1)
    assert (amp > 0.5).all() and (amp <= 2.0 + 1e-5).all()
    # slow: at most 3 cycles per record -> at most 7 sign changes
    sign_changes = (diff[:, 1:].sign() != diff[:, :-1].sign()).sum(-1)
    assert sign_changes.max() <= 7


def test_probability_kinds_and_seeding():
    x = _signals()
    g = torch.Generator().manual_seed(3)
    out = corrupt_leads(x, prob=0.3, generator=g)
    share = out.corrupted.any(1).float().mean()
    assert 0.1 < share < 0.5
    assert torch.equal(out.kind >= 0, out.corrupted.any(1))
    assert set(out.kind[out.kind >= 0].tolist()) <= set(range(len(CORRUPTION_KINDS)))
    again = corrupt_leads(x, prob=0.3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out.signals, again.signals)
    assert torch.equal(corrupt_leads(x, prob=0.0).signals, x)
    with pytest.raises(ValueError, match="CORRUPT_KINDS"):
        LeadCorruption(kinds=["static"])
    with pytest.raises(ValueError, match="CORRUPT_PROB"):
        LeadCorruption(prob=1.5)
    aug = LeadCorruption(prob=1.0, kinds=["flat"], generator=torch.Generator().manual_seed(0))
    assert (aug(x) == 0).all(-1).sum() == B
