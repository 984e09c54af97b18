"""Tests of kale_ext.embed.conv_ops: the one crop/pad helper and the block-diagonal weights."""

import torch
import torch.nn.functional as F

from kale_ext.embed.conv_ops import block_diagonal, check_conv_impl, fit_length, uniform_init_


def test_fit_length_crops_and_zero_pads():
    x = torch.arange(10.0).view(1, 10)
    assert torch.equal(fit_length(x, 7), x[:, :7])
    padded = fit_length(x, 12)
    assert padded.shape == (1, 12) and torch.equal(padded[:, :10], x) and padded[:, 10:].abs().sum() == 0


def test_block_diagonal_dense_convolution_equals_the_grouped_one():
    torch.manual_seed(0)
    w = torch.randn(3, 4, 2, 3)  # (L, C_out, C_in, k)
    x = torch.randn(2, 6, 17)
    grouped = F.conv1d(x, w.reshape(12, 2, 3), groups=3, stride=2, padding=1)
    dense = F.conv1d(x, block_diagonal(w), stride=2, padding=1)
    torch.testing.assert_close(dense, grouped)


def test_check_and_init():
    try:
        check_conv_impl("bogus")
    except ValueError as err:
        assert "blockdiag" in str(err)
    else:
        raise AssertionError("an unknown implementation was accepted")
    t = uniform_init_(torch.empty(1000), fan_in=4)
    assert t.abs().max() <= 0.5 and t.std() > 0.2
