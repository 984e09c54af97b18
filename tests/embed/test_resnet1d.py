"""Supervised ResNet1d / XResNet1d baselines: shapes, masks, architecture facts."""

import pytest
import torch

from kale_ext.embed.resnet1d import Bottleneck1d, ResNet1d, XResNet1d

SMALL = {
    ResNet1d: {"widths": (8, 8, 16, 16)},
    XResNet1d: {"widths": (4, 4, 8, 8), "stem_channels": (8, 8, 8)},
}


@pytest.mark.parametrize("cls", [ResNet1d, XResNet1d])
@pytest.mark.parametrize("length", [250, 333])
def test_logits_shape_any_length(cls, length):
    model = cls(12, 3, **SMALL[cls]).eval()
    assert model(torch.randn(2, 12, length)).shape == (2, 3)


@pytest.mark.parametrize("cls", [ResNet1d, XResNet1d])
def test_mask_zeroes_absent_leads(cls):
    model = cls(6, 2, **SMALL[cls]).eval()
    x = torch.randn(3, 6, 200)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[:, 4:] = False
    noisy = x.clone()
    noisy[:, 4:] = float("nan")
    zeroed = x.clone()
    zeroed[:, 4:] = 0
    with torch.no_grad():
        torch.testing.assert_close(model(noisy, mask), model(zeroed))
        assert not torch.allclose(model(x), model(zeroed))


def test_xresnet_defaults_follow_the_description():
    model = XResNet1d(12, 2)
    blocks = [b for b in model.blocks if isinstance(b, Bottleneck1d)]
    assert len(blocks) == 3 + 4 + 6 + 3
    assert model.stem[0][0].kernel_size == (11,)
    assert all(torch.all(b.body[-1][1].weight == 0) for b in blocks)  # zero-initialised last BN
    # With zero-initialised residual branches every block starts as (ReLU of) its shortcut.
    block = blocks[1]
    x = torch.randn(2, block.body[0][0].in_channels, 16)
    block.eval()
    torch.testing.assert_close(block(x), torch.relu(block.shortcut(x)))
