"""Classification head, latent feature extraction by lead name, and the frozen-encoder classifier."""

from typing import NamedTuple

import pytest
import torch
from torch import nn

from kale_ext.predict.heads import ClassificationHead, FeatureClassifier, LatentFeatureExtractor

LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
T, D = 16, 4


class _Fused(NamedTuple):
    mean: torch.Tensor
    log_var: torch.Tensor


class _TinyVAE(nn.Module):
    """Stand-in with the MultimodalVAE encode/fuse contract: one linear encoder per lead, masked-average fusion."""

    def __init__(self):
        super().__init__()
        self.lead_names = LEADS
        self.latent_dim = D
        self.input_dim = T
        self.enc = nn.ModuleList(nn.Linear(T, 2 * D) for _ in LEADS)
        self.drop = nn.Dropout(0.5)

    def encode(self, x, leads=None):
        leads = LEADS if leads is None else tuple(leads)
        batch = x.shape[0]
        # Placeholders for leads not given are non-finite on purpose: consumers must go through the mask.
        mean = torch.full((len(LEADS), batch, D), float("nan"))
        log_var = torch.full((len(LEADS), batch, D), float("nan"))
        mask = torch.zeros(len(LEADS), batch, dtype=torch.bool)
        for j, name in enumerate(leads):
            i = LEADS.index(name)
            out = self.drop(self.enc[i](x[:, j]))
            mean = mean.index_put((torch.tensor([i]),), out[None, :, :D])
            log_var = log_var.index_put((torch.tensor([i]),), out[None, :, D:])
            mask[i] = True
        return mean, log_var, mask

    def fuse(self, mean, log_var, mask):
        keep = mask.unsqueeze(-1)
        count = keep.sum(0).clamp(min=1)
        fused = torch.where(keep, mean, torch.zeros_like(mean)).sum(0) / count
        fused_lv = torch.where(keep, log_var, torch.zeros_like(log_var)).sum(0) / count
        return _Fused(fused, fused_lv)


@pytest.fixture
def vae():
    return _TinyVAE().eval()


def test_head_structure_and_shapes():
    head = ClassificationHead(24)
    layers = list(head.net)
    assert [type(m) for m in layers] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert layers[0].out_features == 128 and layers[2].p == 0.5 and layers[3].out_features == 2
    assert head(torch.randn(5, 24)).shape == (5, 2)
    head = ClassificationHead(7, num_classes=3, hidden_dim=8, dropout=0.1)
    assert head(torch.randn(2, 7)).shape == (2, 3)
    with pytest.raises(ValueError, match="dropout"):
        ClassificationHead(4, dropout=1.0)


def test_concat_means_follow_the_order_of_leads(vae):
    leads = ("aVL", "I", "V1")
    x = torch.randn(3, len(leads), T)
    ext = LatentFeatureExtractor(vae, leads, mode="concat_means")
    feats = ext(x)
    assert feats.shape == (3, len(leads) * D) and ext.out_features == len(leads) * D
    for j, name in enumerate(leads):
        expected = vae.enc[LEADS.index(name)](x[:, j])[:, :D]
        torch.testing.assert_close(feats[:, j * D : (j + 1) * D], expected)
    # Reordering the input channels and the names together permutes the feature blocks the same way.
    swapped = LatentFeatureExtractor(vae, ("I", "aVL", "V1"))(x[:, [1, 0, 2]])
    torch.testing.assert_close(swapped[:, :D], feats[:, D : 2 * D])
    torch.testing.assert_close(swapped[:, D : 2 * D], feats[:, :D])


def test_absent_leads_contribute_zeros_even_if_their_signal_is_not_finite(vae):
    leads = ("I", "II", "III")
    x = torch.randn(2, 3, T)
    x[1, 1] = float("nan")  # sample 1 has no lead II
    mask = torch.tensor([[True, True, True], [True, False, True]])
    feats = LatentFeatureExtractor(vae, leads)(x, mask)
    assert torch.isfinite(feats).all()
    assert torch.equal(feats[1, D : 2 * D], torch.zeros(D))
    assert feats[0, D : 2 * D].abs().sum() > 0
    full = LatentFeatureExtractor(vae, leads)(torch.nan_to_num(x))
    torch.testing.assert_close(feats[0], full[0])


def test_fused_mean_through_the_mask_equals_removing_the_lead(vae):
    x = torch.randn(4, 3, T)
    ext = LatentFeatureExtractor(vae, ("I", "II", "V6"), mode="fused_mean")
    assert ext.out_features == D
    mask = torch.tensor([[True, False, True]] * 4)
    masked = ext(x, mask)
    removed = LatentFeatureExtractor(vae, ("I", "V6"), mode="fused_mean")(x[:, [0, 2]])
    assert masked.shape == (4, D)
    torch.testing.assert_close(masked, removed)
    assert not torch.allclose(ext(x), masked)


def test_extractor_refuses_unknown_leads_and_modes(vae):
    with pytest.raises(ValueError, match="not among the model's leads"):
        LatentFeatureExtractor(vae, ("I", "V7"))
    with pytest.raises(ValueError, match="feature mode"):
        LatentFeatureExtractor(vae, ("I",), mode="sum")
    with pytest.raises(ValueError, match="leads"):
        LatentFeatureExtractor(vae, ("I", "II"))(torch.randn(2, 3, T))


def test_frozen_extractor_gets_no_gradient_but_the_input_does(vae):
    leads = ("I", "II", "III", "aVR", "aVL", "aVF")
    ext = LatentFeatureExtractor(vae, leads)
    model = FeatureClassifier(ext, ClassificationHead(ext.out_features, hidden_dim=8))
    model.train()
    assert model.head.training and not model.extractor.training and not vae.drop.training
    assert not any(p.requires_grad for p in model.extractor.parameters())
    x = torch.randn(5, 6, T, requires_grad=True)
    logits = model(x)
    assert logits.shape == (5, 2)
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0, 1, 1])).backward()
    assert all(p.grad is None for p in model.extractor.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters())
    assert x.grad is not None and x.grad.abs().sum() > 0  # attribution differentiates through the encoders
    feats = model.features(x.detach())
    assert not feats.requires_grad and feats.shape == (5, 6 * D)
    model.eval()
    torch.testing.assert_close(model.head(feats), model(x.detach()))


def test_unfrozen_extractor_trains_end_to_end(vae):
    ext = LatentFeatureExtractor(vae, ("I", "II"))
    model = FeatureClassifier(ext, ClassificationHead(ext.out_features, hidden_dim=8), freeze_extractor=False)
    model.train()
    assert model.extractor.training
    model(torch.randn(3, 2, T)).sum().backward()
    used = [vae.enc[LEADS.index(name)].weight.grad for name in ("I", "II")]
    assert all(g is not None and g.abs().sum() > 0 for g in used)
    assert vae.enc[LEADS.index("V1")].weight.grad is None  # leads not in use are untouched


class _JointVAE(_TinyVAE):
    """Stand-in with one joint encoder over all leads (a single expert) whose encode takes the channel mask."""

    joint = True

    def __init__(self):
        super().__init__()
        self.seen_mask = None
        self.joint_enc = nn.Linear(len(LEADS) * T, 2 * D)

    def encode(self, x, leads=None, mask=None):
        self.seen_mask = mask
        full = x.new_zeros(x.shape[0], len(LEADS), T)
        full[:, [LEADS.index(name) for name in leads]] = x
        out = self.joint_enc(full.flatten(1))
        return out[None, :, :D], out[None, :, D:], torch.ones(1, x.shape[0], dtype=torch.bool)


def test_joint_encoder_gives_its_mean_and_receives_the_mask():
    vae = _JointVAE().eval()
    for mode in ("concat_means", "fused_mean"):
        ext = LatentFeatureExtractor(vae, ("I", "II"), mode=mode)
        assert ext.out_features == D
        x = torch.randn(3, 2, T)
        mask = torch.tensor([[True, False]] * 3)
        feats = ext(x, mask)
        assert feats.shape == (3, D)
        assert vae.seen_mask is not None and torch.equal(vae.seen_mask, mask)
        mean, _, _ = vae.encode(x, leads=("I", "II"))
        torch.testing.assert_close(ext(x), mean[0])


def test_extractor_on_the_project_models_when_present():
    zoo = pytest.importorskip("kale_ext.embed.zoo")
    six = ("I", "II", "III", "aVR", "aVL", "aVF")
    x = torch.randn(2, 6, 64)
    mask = torch.tensor([[True] * 6, [True, True, True, False, True, True]])
    x[1, 3] = float("nan")
    for name, width in (("lsemvae", 6 * 4), ("betavae", 4)):
        vae = zoo.build_model(name, input_dim=64, latent_dim=4)
        ext = LatentFeatureExtractor(vae, six)
        model = FeatureClassifier(ext, ClassificationHead(ext.out_features, hidden_dim=8))
        assert ext.out_features == width
        feats = model.features(x, mask)
        assert feats.shape == (2, width) and torch.isfinite(feats).all()
        signal = x.clone().requires_grad_(True)
        model(signal, mask).sum().backward()  # attribution path: finite input gradients, none into absent leads
        assert torch.isfinite(signal.grad).all() and signal.grad[1, 3].abs().sum() == 0
        assert signal.grad[0, 3].abs().sum() > 0
        fused = LatentFeatureExtractor(vae, six, mode="fused_mean").eval()(x, mask)
        assert fused.shape == (2, 4) and torch.isfinite(fused).all()


def test_six_lead_fused_features_of_a_12_lead_model_equal_those_of_the_six_leads_alone():
    """One head serves 12- and 6-lead input: masking six leads equals giving only the six named leads."""
    from kale_ext.embed.zoo import build_model

    torch.manual_seed(0)
    leads12 = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
    vae = build_model("lsemvae", leads12, input_dim=48, latent_dim=5).eval()
    x = torch.randn(3, 12, 48)
    mask = torch.zeros(3, 12, dtype=torch.bool)
    mask[:, :6] = True
    x[:, 6:] = float("nan")  # whatever the absent channels hold
    masked = LatentFeatureExtractor(vae, leads12, "fused_mean")(x, mask)
    six = LatentFeatureExtractor(vae, leads12[:6], "fused_mean")(x[:, :6].clone())
    torch.testing.assert_close(masked, six, atol=1e-6, rtol=1e-5)
    full = LatentFeatureExtractor(vae, leads12, "fused_mean")(torch.randn(3, 12, 48))
    assert masked.shape == full.shape == (3, 5)  # the same head width for both settings


# ---------------------------------------------------------------------------------------------------------------------
# Windowed models: every window of a record, pooled; window 0 = the whole-record features exactly
# ---------------------------------------------------------------------------------------------------------------------
def _whole_record_reference(ext, x, mask):
    """The extractor's forward before windows existed (kept verbatim as the reference)."""
    if ext.mode == "pooled":
        return ext.vae.features(x, leads=ext.leads, mask=None if mask is None else mask.bool())
    if mask is not None and ext._encode_takes_mask:
        mean, log_var, enc_mask = ext.vae.encode(x, leads=ext.leads, mask=mask.bool())
    else:
        if mask is not None:
            x = torch.where(mask.bool().unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
        mean, log_var, enc_mask = ext.vae.encode(x, leads=ext.leads)
    present = enc_mask.bool()
    if ext.joint:
        return torch.where(present[0].unsqueeze(-1), mean[0], torch.zeros_like(mean[0]))
    if mask is not None:
        given = torch.zeros_like(present)
        given[ext._lead_index] = mask.t().bool().to(present.device)
        present = present & given
    if ext.mode == "fused_mean":
        return ext.vae.fuse(mean, log_var, present).mean
    means = mean[ext._lead_index]
    keep = present[ext._lead_index].unsqueeze(-1)
    means = torch.where(keep, means, torch.zeros_like(means))
    return means.permute(1, 0, 2).reshape(means.shape[1], -1)


SIX = ("I", "II", "III", "aVR", "aVL", "aVF")
MODEL_MODES = [("lsemvae", "concat_means"), ("lsemvae", "fused_mean"), ("betavae", "fused_mean"), ("stmem", "pooled")]


def _project_model(name, length):
    from kale_ext.embed.zoo import build_model

    torch.manual_seed(0)
    options = {"preset": "small"} if name == "stmem" else {}
    return build_model(name, SIX, input_dim=length, latent_dim=4, **options).eval()


@pytest.mark.parametrize("name, mode", MODEL_MODES)
def test_window_zero_gives_the_whole_record_features_bit_for_bit(name, mode):
    """WINDOW 0 (and a window as long as the record) reproduces the features of the unwindowed path exactly."""
    length = 60
    vae = _project_model(name, length)
    x = torch.randn(3, 6, length)
    mask = torch.tensor([[True] * 6, [True, True, True, False, True, True], [True] * 6])
    x[1, 3] = float("nan")
    with torch.no_grad():
        for m in (mask, None):
            reference = _whole_record_reference(
                LatentFeatureExtractor(vae, SIX, mode), x if m is not None else x.nan_to_num(), m
            )
            for window in (0, length):
                ext = LatentFeatureExtractor(vae, SIX, mode, window=window)
                assert torch.equal(ext(x if m is not None else x.nan_to_num(), m), reference)


@pytest.mark.parametrize("name, mode", MODEL_MODES)
def test_whole_record_features_of_a_windowed_model_use_every_window(name, mode):
    """Windows 0, 16, 24 of a 40-sample record (the last flush with the end): mean pooling is their mean."""
    window, length = 16, 40
    vae = _project_model(name, window)
    x = torch.randn(2, 6, length)
    mask = torch.tensor([[True] * 6, [True, False, True, True, True, True]])
    single = LatentFeatureExtractor(vae, SIX, mode)
    with torch.no_grad():
        expected = torch.stack([single(x[..., s : s + window], mask) for s in (0, 16, 24)]).mean(0)
        for pooling in ("mean", "poe"):
            ext = LatentFeatureExtractor(vae, SIX, mode, window=window, pooling=pooling)
            feats = ext(x, mask)
            assert feats.shape == expected.shape and torch.isfinite(feats).all()
            if pooling == "mean" or mode == "pooled":
                torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)
            for lo, hi in ((0, 8), (16, 24), (32, 40)):  # a change in any window changes the features
                y = x.clone()
                y[:, :, lo:hi] += 1.0
                assert not torch.allclose(ext(y, mask), feats), (pooling, lo)


def test_poe_pooling_is_the_product_of_the_windows_posteriors_per_lead():
    window, length = 16, 48
    vae = _project_model("lsemvae", window)
    x = torch.randn(2, 6, length)
    mask = torch.tensor([[True] * 6, [True, True, False, True, True, True]])
    with torch.no_grad():
        posts = [vae.encode(x[..., s : s + window], leads=SIX, mask=mask) for s in (0, 16, 32)]
        precision = sum(torch.exp(-p.log_var) for p in posts)
        mean = sum(torch.exp(-p.log_var) * p.mean for p in posts) / precision
        present = posts[0].mask
        concat = LatentFeatureExtractor(vae, SIX, "concat_means", window=window, pooling="poe")(x, mask)
        expected = torch.where(present.unsqueeze(-1), mean, torch.zeros(())).permute(1, 0, 2).reshape(2, -1)
        torch.testing.assert_close(concat, expected, atol=1e-5, rtol=1e-5)
        fused = LatentFeatureExtractor(vae, SIX, "fused_mean", window=window, pooling="poe")(x, mask)
        log_var = torch.where(present.unsqueeze(-1), -torch.log(precision), torch.zeros(()))
        torch.testing.assert_close(fused, vae.fuse(expected.view(2, 6, -1).permute(1, 0, 2), log_var, present).mean)


def test_extractor_refuses_unknown_pooling_and_negative_windows(vae):
    with pytest.raises(ValueError, match="poe"):
        LatentFeatureExtractor(vae, LEADS, window=8, pooling="max")
    with pytest.raises(ValueError, match="whole records"):
        LatentFeatureExtractor(vae, LEADS, window=-1)
    with pytest.raises(ValueError, match="window=16"):  # a windowed model given whole records without its window
        LatentFeatureExtractor(vae, LEADS)(torch.randn(2, len(LEADS), 4 * T))
