"""Tests of kale_ext.embed.st_mem: masking, dropped leads, name-bound lead embeddings, batching, loss, presets."""

import pytest
import torch

from kale_ext.embed.st_mem import ST_MEM_PRESETS, STMEM, masked_patch_mse, random_patch_mask
from kale_ext.loaddata.leads import CANONICAL_LEADS, LIMB_LEADS

TINY = dict(input_dim=40, patch_size=10, width=16, depth=2, heads=2, decoder_width=8, decoder_depth=1, decoder_heads=2)


def _model(**kw) -> STMEM:
    torch.manual_seed(0)
    return STMEM(**{**TINY, **kw}).eval()


def test_random_patch_mask_exact_per_lead_and_independent():
    g = torch.Generator().manual_seed(3)
    hidden = random_patch_mask(5, 12, 30, 0.75, generator=g)
    assert hidden.shape == (5, 12, 30) and hidden.dtype == torch.bool
    assert (hidden.sum(-1) == 30 - 8).all()  # round(0.25 * 30) = round(7.5) = 8 kept in every lead
    flat = hidden.reshape(60, 30)
    assert len({tuple(row.tolist()) for row in flat}) == 60  # every (sample, lead) has its own mask
    again = random_patch_mask(5, 12, 30, 0.75, generator=torch.Generator().manual_seed(3))
    assert torch.equal(hidden, again)
    with pytest.raises(ValueError, match="keeps no patch"):
        random_patch_mask(1, 1, 2, 0.9)


def test_forward_masks_each_present_lead_exactly():
    model = _model(input_dim=200, patch_size=10)  # 20 patches, 5 kept
    x = torch.randn(3, 12, 200)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, 6:] = False
    out = model(x, mask=mask, generator=torch.Generator().manual_seed(0))
    counts = out.patch_mask.sum(-1)
    assert (counts[mask] == 15).all() and (counts[~mask] == 0).all()
    assert len({tuple(r.tolist()) for r in out.patch_mask[0]}) == 12
    assert torch.equal(out.lead_mask, mask) and out.recon.shape == (3, 12, 20, 10)
    assert (out.recon[~mask] == 0).all()
    x_nan = x.clone()
    x_nan[~mask] = float("nan")  # placeholders of absent leads never reach the loss or the gradients
    nan_out = model.train()(x_nan, mask=mask, generator=torch.Generator().manual_seed(0))
    nan_out.loss.backward()
    assert torch.equal(nan_out.patch_mask, out.patch_mask) and torch.isfinite(nan_out.loss)
    torch.testing.assert_close(nan_out.loss, out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    # eval mode without a generator: repeatable masks
    a, b = model(x, mask=mask), model(x, mask=mask)
    assert torch.equal(a.patch_mask, b.patch_mask) and torch.equal(a.loss, b.loss)


def test_subset_of_leads_equals_dropped_tokens():
    """A 12-lead input with 6 leads masked out equals a 6-channel input named by those leads; NaN never leaks."""
    model = _model()
    x = torch.randn(2, 12, 40)
    keep = [CANONICAL_LEADS.index(n) for n in ("II", "aVF", "V1", "V3", "V5", "I")]
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, keep] = True
    x_nan = x.clone()
    x_nan[~mask] = float("nan")
    full = model.features(x_nan, mask=mask)
    sub = model.features(x[:, keep], leads=[CANONICAL_LEADS[i] for i in keep])
    assert torch.isfinite(full).all()
    torch.testing.assert_close(full, sub, atol=1e-6, rtol=0)
    # and the dropped leads really are dropped, not zero-filled: zeros as signals give other features
    zeros = model.features(torch.where(mask.unsqueeze(-1), x, torch.zeros(())))
    assert (zeros - sub).abs().max() > 1e-3


def test_lead_embeddings_follow_names():
    model = _model()
    x = torch.randn(2, 6, 40)
    names = list(LIMB_LEADS)
    perm = [3, 0, 5, 1, 4, 2]
    ref = model.features(x, leads=names)
    moved = model.features(x[:, perm], leads=[names[i] for i in perm])
    torch.testing.assert_close(moved, ref, atol=1e-5, rtol=0)
    channels_only = model.features(x[:, perm], leads=names)
    assert (channels_only - ref).abs().max() > 1e-3
    aliases = model.features(x, leads=["i", "LEAD_II", "iii", "avr", "AVL", "ecg_aVF"])
    torch.testing.assert_close(aliases, ref, atol=0, rtol=0)
    with pytest.raises(ValueError, match="not one of the model's leads"):
        _model(lead_names=LIMB_LEADS).features(torch.randn(1, 1, 40), leads=["V1"])


def test_batched_per_sample_masks_equal_per_sample_calls():
    model = _model()
    x = torch.randn(3, 12, 40)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, 6:] = False  # 6 limb leads
    mask[2, [0, 4, 7, 8, 9, 10, 11]] = False
    batched = model.features(x, mask=mask)
    for i in range(3):
        alone = model.features(x[i : i + 1, mask[i]], leads=[n for n, m in zip(CANONICAL_LEADS, mask[i]) if m])
        torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=0)
    # the decoder path too: with nothing hidden the reconstruction is deterministic, batched == alone
    dense = _model(mask_ratio=0.0)
    out = dense(x, mask=mask)
    for i in range(3):
        one = dense(x[i : i + 1], mask=mask[i : i + 1])
        torch.testing.assert_close(out.recon[i : i + 1], one.recon, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no present lead"):
        model.features(x, mask=torch.zeros(3, 12, dtype=torch.bool))


def test_per_patch_normalised_mse_by_hand():
    target = torch.tensor([[[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 4.0, 4.0], [5.0, 5.0, 5.0, 5.0]]])  # (1, 3, 4)
    pred = torch.tensor([[[0.0, 0.0, 0.0, 1.0], [1.0, -1.0, 1.0, 1.0], [9.0, 9.0, 9.0, 9.0]]])
    scored = torch.tensor([[True, True, False]])
    eps = 1e-6
    # patch 0: mean 3, population var (4 + 1 + 0 + 9) / 4 = 3.5; patch 1: mean 2, var 4
    n0 = (torch.tensor([1.0, 2.0, 3.0, 6.0]) - 3.0) / (3.5 + eps) ** 0.5
    n1 = (torch.tensor([0.0, 0.0, 4.0, 4.0]) - 2.0) / (4.0 + eps) ** 0.5
    e0 = ((pred[0, 0] - n0) ** 2).mean()
    e1 = ((pred[0, 1] - n1) ** 2).mean()
    got = masked_patch_mse(pred, target, scored, normalize=True, eps=eps)
    torch.testing.assert_close(got, (e0 + e1) / 2)
    raw = masked_patch_mse(pred, target, scored, normalize=False)
    torch.testing.assert_close(raw, (((pred[0, :2] - target[0, :2]) ** 2).mean(-1)).mean())
    assert masked_patch_mse(pred, target, torch.zeros_like(scored)) == 0.0


def test_model_loss_is_the_normalised_masked_mse():
    model = _model(input_dim=60, patch_size=10)
    x = torch.randn(2, 12, 60) * 3 + 1
    out = model(x, generator=torch.Generator().manual_seed(1))
    t = out.target
    norm = (t - t.mean(-1, keepdim=True)) / (t.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    per_patch = ((out.recon - norm) ** 2).mean(-1)
    torch.testing.assert_close(out.loss, per_patch[out.patch_mask].mean())
    torch.testing.assert_close(out.target, x.reshape(2, 12, 6, 10))
    assert model.pretrain_loss(x, generator=torch.Generator().manual_seed(1))["loss"].item() == out.loss.item()


def test_loss_decreases_on_a_toy():
    """Fixed sinusoids per lead: the hidden patches become predictable, the normalised MSE falls well below 1."""
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead on a shared machine
    torch.manual_seed(0)
    model = STMEM(**{**TINY, "input_dim": 80, "width": 32, "decoder_width": 32, "decoder_depth": 2}).train()
    t = torch.linspace(0, 1, 80)
    x = torch.stack([torch.sin(2 * torch.pi * (3 + k % 4) * t + k) for k in range(12)]).expand(8, 12, 80).clone()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(150):
        loss = model.pretrain_loss(x, generator=torch.Generator().manual_seed(step))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert end < 0.5 and end < 0.4 * start, losses[::10]


def test_runs_under_bf16_autocast():
    model = _model()
    x = torch.randn(2, 12, 40)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 6:] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.train()(x, mask=mask, generator=torch.Generator().manual_seed(0))
        feats = model.features(x, mask=mask)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss) and feats.shape == (2, 16)
    out.loss.backward()
    assert model.patch_embed.weight.grad is not None


def test_presets_and_arguments():
    assert ST_MEM_PRESETS["paper"]["width"] == 768 and ST_MEM_PRESETS["paper"]["depth"] == 12
    small = STMEM.from_preset("small")
    assert small.lead_names == CANONICAL_LEADS and small.input_dim == 2250 and small.n_patches == 30
    assert small.num_parameters() == 189_291
    assert small.features(torch.randn(1, 12, 2250)).shape == (1, 64)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        STMEM(input_dim=100, patch_size=30)
    with pytest.raises(ValueError, match="input_dim"):
        small.features(torch.randn(1, 12, 2000))
    with pytest.raises(ValueError, match="unknown ST-MEM preset"):
        STMEM.from_preset("huge")


# ------------------------------------------------------------------ switches to the published choices (issue 18)
def _tiny(**kw):
    torch.manual_seed(0)
    return STMEM(LIMB_LEADS, input_dim=300, patch_size=10, width=16, depth=1, heads=2, decoder_width=8,
                 decoder_depth=1, decoder_heads=2, **kw)  # fmt: skip


def test_keep_rounding_floor_keeps_the_published_7_of_30():
    from kale_ext.embed.st_mem import kept_patches

    assert kept_patches(30, 0.75) == 8 and kept_patches(30, 0.75, "floor") == 7
    model = _tiny(keep_rounding="floor")
    out = model.train()(torch.randn(2, 6, 300), leads=LIMB_LEADS)
    assert (out.patch_mask.sum(-1) == 30 - 7).all()
    hidden = random_patch_mask(3, 2, 30, 0.75, torch.Generator().manual_seed(0), rounding="floor")
    assert (hidden.sum(-1) == 23).all()


def test_sincos_positions_are_fixed_buffers():
    from kale_ext.embed.st_mem import sincos_positions

    model = _tiny(pos_embedding="sincos")
    names = dict(model.named_parameters())
    assert "pos_embed" not in names and "decoder_pos_embed" not in names
    torch.testing.assert_close(model.pos_embed, sincos_positions(32, 16))
    pos = sincos_positions(32, 16)
    assert pos[0, :8].abs().max() == 0 and (pos[0, 8:] == 1).all()  # sin(0) = 0, cos(0) = 1
    assert len(set(map(tuple, pos.tolist()))) == 32  # every position distinct
    learned = _tiny()
    assert "pos_embed" in dict(learned.named_parameters())


def test_patch_norm_and_mean_then_norm_pooling():
    model = _tiny(patch_norm=True, pool="mean_then_norm").eval()
    kinds = [type(m).__name__ for m in model.patch_embed]
    assert kinds == ["LayerNorm", "Linear", "LayerNorm"]
    x = torch.randn(2, 6, 300)
    feats = model.features(x, leads=LIMB_LEADS)
    # the final LayerNorm (default affine: weight 1, bias 0) applied to the mean token: zero mean, unit variance
    torch.testing.assert_close(feats.mean(-1), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(feats.var(-1, unbiased=False), torch.ones(2), atol=1e-3, rtol=0)
    norm_first = _tiny(patch_norm=True).eval()
    norm_first.load_state_dict(model.state_dict())
    other = norm_first.features(x, leads=LIMB_LEADS)
    assert other.var(-1, unbiased=False).max() < 0.99  # a mean of normalised tokens is not itself normalised
    with pytest.raises(ValueError, match="pool"):
        _tiny(pool="max")


def test_published_preset_turns_every_switch():
    spec = ST_MEM_PRESETS["published"]
    assert {k: spec[k] for k in ("pos_embedding", "patch_norm", "keep_rounding", "pool")} == {
        "pos_embedding": "sincos", "patch_norm": True, "keep_rounding": "floor", "pool": "mean_then_norm"}  # fmt: skip
    assert spec["width"] == ST_MEM_PRESETS["paper"]["width"]
