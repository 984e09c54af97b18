"""Tests of kale_ext.pipeline.finetune: head training, cross-validation hygiene, determinism, masked inputs."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from kale_ext.evaluate.cross_validation import make_folds
from kale_ext.evaluate.metrics import binary_metrics
from kale_ext.pipeline.finetune import (
    FinetuneSettings,
    MaskedInputClassifier,
    cross_validate,
    extract_features,
    feature_dataset,
    fit_classifier,
    head_factory,
    make_loss,
    predict_proba,
)
from kale_ext.predict.losses import FocalLoss


def _separable(n=72, f=6, seed=0, shift=2.0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.35).astype(int)
    x = rng.normal(size=(n, f)).astype(np.float32)
    x[:, 0] += shift * y
    return x, y


def _settings(**kw):
    base = dict(epochs=6, batch_size=24, lr=2e-2, hidden_dim=16, dropout=0.1, seed=3, progress=False)
    base.update(kw)
    return FinetuneSettings(**base)


def test_head_learns_a_separable_task_and_scores_above_chance():
    x, y = _separable()
    settings = _settings()
    head = head_factory(x.shape[1], settings)()
    fit_classifier(head, feature_dataset(x[:48], y[:48]), y[:48], settings)
    prob = predict_proba(head, feature_dataset(x[48:], y[48:]))
    assert binary_metrics(y[48:], prob, 0.5)["auroc"] > 0.8


def test_cross_validation_is_deterministic_and_leaves_global_rng_alone():
    x, y = _separable()
    folds = make_folds(y, n_splits=3, seed=1)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = cross_validate(head_factory(6, _settings()), feature_dataset(x, y), y, folds, _settings())
    after = torch.rand(1)
    b = cross_validate(head_factory(6, _settings()), feature_dataset(x, y), y, folds, _settings())
    assert torch.equal(before, after)  # training used a forked generator
    assert np.array_equal(a.prob, b.prob) and np.array_equal(a.threshold, b.threshold)
    assert not np.isnan(a.prob).any() and len(a.outcomes) == 3
    c = cross_validate(head_factory(6, _settings()), feature_dataset(x, y), y, folds, _settings(seed=4))
    assert not np.array_equal(a.prob, c.prob)


def test_threshold_and_model_of_a_fold_ignore_its_test_labels():
    x, y = _separable(seed=2)
    folds = make_folds(y, n_splits=3, seed=0)
    base = cross_validate(head_factory(6, _settings()), feature_dataset(x, y), y, folds, _settings())
    flipped = y.copy()
    flipped[folds == 1] = 1 - flipped[folds == 1]  # change only fold 1's labels
    other = cross_validate(head_factory(6, _settings()), feature_dataset(x, flipped), flipped, folds, _settings())
    k1 = folds == 1
    assert np.array_equal(base.prob[k1], other.prob[k1])
    assert np.array_equal(base.threshold[k1], other.threshold[k1])
    assert not np.array_equal(base.prob[~k1], other.prob[~k1])  # other folds trained on the changed labels


def test_focal_alpha_comes_from_the_training_labels():
    loss = make_loss(_settings(), np.array([0, 0, 0, 1]))
    assert isinstance(loss, FocalLoss)
    logits = torch.tensor([[2.0, -1.0], [0.0, 1.0]])
    target = torch.tensor([0, 1])
    # alpha 0.75 for the positive class: compare with explicit FocalLoss instances
    assert torch.allclose(loss(logits, target), FocalLoss(alpha=0.75, gamma=2.0)(logits, target))
    assert not torch.allclose(loss(logits, target), FocalLoss(alpha=0.25, gamma=2.0)(logits, target))
    assert isinstance(make_loss(_settings(loss="cross_entropy"), np.array([0, 1])), nn.CrossEntropyLoss)
    with pytest.raises(ValueError, match="focal"):
        make_loss(_settings(loss="hinge"), np.array([0, 1]))


class _Signals(Dataset):
    def __init__(self, n=40, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.y = (torch.rand(n, generator=g) < 0.5).long()
        self.x = torch.randn(n, 3, 32, generator=g)
        self.x[:, 1] += 2.0 * self.y[:, None]
        self.mask = torch.ones(n, 3, dtype=torch.bool)
        self.mask[::4, 2] = False

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"signals": self.x[i], "mask": self.mask[i], "label": self.y[i]}


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3 * 32, 2)

    def forward(self, x):
        return self.lin(x.flatten(1))


def test_masked_input_classifier_ignores_absent_channels_and_trains_end_to_end():
    data = _Signals()
    model = MaskedInputClassifier(_Net())
    x, mask = data.x[:8].clone(), data.mask[:8]
    out = model(x, mask)
    x[~mask] = 1e3  # whatever an absent lead holds
    assert torch.allclose(model(x, mask), out)
    settings = _settings(epochs=20, lr=1e-2)
    fit_classifier(model, data, data.y.numpy(), settings)
    prob = predict_proba(model, data)
    assert binary_metrics(data.y.numpy(), prob, 0.5)["auroc"] > 0.9


def test_extract_features_runs_the_extractor_over_every_item():
    data = _Signals(10)

    class Mean(nn.Module):
        def forward(self, x, mask):
            return x.mean(-1) * mask

    feats = extract_features(Mean(), data, batch_size=3, progress=False)
    assert feats.shape == (10, 3)
    assert np.allclose(feats, (data.x.mean(-1) * data.mask).numpy(), atol=1e-6)


def test_a_model_handed_over_in_eval_mode_is_trained_in_training_mode():
    """Dropout and batch norm train as they should even when the caller passes a model in eval mode."""
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 2)

        def forward(self, x):
            seen.append(self.training)
            return self.lin(x)

    x, y = _separable()
    model = Probe().eval()
    fit_classifier(model, feature_dataset(x[:16], y[:16]), y[:16], _settings(epochs=1))
    assert seen and all(seen) and not model.training  # trained in training mode, returned in eval mode
