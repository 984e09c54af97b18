"""Supervised 1-D residual networks for multi-lead ECG: the unimodal baselines of LS-EMVAE's comparison.

Written from the published descriptions, no vendored code:

- :class:`ResNet1d`: the residual network of He et al. ("Deep residual learning for image recognition", CVPR 2016)
  with 1-D convolutions, as used for 12-lead ECG classification (e.g. Strodthoff et al., "Deep learning for ECG
  analysis: benchmarks and insights from PTB-XL", 2021): a strided stem convolution and max-pool, stages of basic
  blocks (two convolutions with batch norm and an identity or projection shortcut), global average pooling.
- :class:`XResNet1d`: the "bag of tricks" ResNet of He et al. (CVPR 2019) in 1-D: a three-convolution stem
  (ResNet-C), bottleneck blocks striding in the middle convolution (ResNet-B), shortcuts that average-pool before
  their 1x1 projection (ResNet-D), the last batch norm of each block initialised to zero; layers 3-4-6-3 and stem
  kernel 11 as in the authors' baseline.

Both take ``forward(x (B, L, T), mask (B, L) | None) -> logits (B, num_classes)``; absent leads are zeroed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm1d(c_out),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _zero_absent(x: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return x
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask must be (batch, leads) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
    return torch.where(mask.to(torch.bool).unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))


class BasicBlock1d(nn.Module):
    """Two convolutions with batch norm and a shortcut (projection when the shape changes).

    Args:
        c_in: input channels. c_out: output channels. stride: stride of the first convolution.
        kernel_size: convolution kernel.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, kernel_size: int = 7) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn(c_in, c_out, kernel_size, stride), _conv_bn(c_out, c_out, kernel_size, relu=False)
        )
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else _conv_bn(c_in, c_out, 1, stride, relu=False)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block. x: (B, C_in, T) -> (B, C_out, T / stride)."""
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet1d(nn.Module):
    """1-D ResNet with basic blocks for multi-lead signals.

    Args:
        in_leads: number of input leads L (channels).
        num_classes: number of output logits.
        layers: basic blocks per stage (default 2-2-2-2, ResNet-18 depth).
        widths: channels per stage.
        stem_kernel: kernel of the strided stem convolution.
        kernel_size: kernel of the block convolutions.
    """

    def __init__(
        self,
        in_leads: int,
        num_classes: int = 2,
        layers: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_kernel: int = 15,
        kernel_size: int = 7,
    ) -> None:
        super().__init__()
        self.in_leads = in_leads
        self.stem = nn.Sequential(_conv_bn(in_leads, widths[0], stem_kernel, 2), nn.MaxPool1d(3, 2, 1))
        blocks: list[nn.Module] = []
        c_in = widths[0]
        for stage, (count, width) in enumerate(zip(layers, widths)):
            for i in range(count):
                stride = 2 if i == 0 and stage > 0 else 1
                blocks.append(BasicBlock1d(c_in, width, stride, kernel_size))
                c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Classify.

        Args:
            x: (B, L, T) signals. mask: (B, L) bool, True = present; absent leads are zeroed.

        Returns:
            (B, num_classes) logits.
        """
        h = self.blocks(self.stem(_zero_absent(x, mask)))
        return self.head(h.mean(dim=-1))


class Bottleneck1d(nn.Module):
    """XResNet bottleneck: 1x1 reduce, k-wide strided conv, 1x1 expand (last BN zero-initialised); ResNet-D shortcut.

    Args:
        c_in: input channels. width: bottleneck channels. expansion: output = width * expansion.
        stride: stride of the middle convolution. kernel_size: middle kernel.
    """

    def __init__(self, c_in: int, width: int, expansion: int = 4, stride: int = 1, kernel_size: int = 5) -> None:
        super().__init__()
        c_out = width * expansion
        self.body = nn.Sequential(
            _conv_bn(c_in, width, 1),
            _conv_bn(width, width, kernel_size, stride),
            _conv_bn(width, c_out, 1, relu=False),
        )
        nn.init.zeros_(self.body[-1][1].weight)  # each block starts as the identity (He et al. 2019)
        shortcut: list[nn.Module] = []
        if stride != 1:
            shortcut.append(nn.AvgPool1d(stride, stride, ceil_mode=True))
        if c_in != c_out:
            shortcut.append(_conv_bn(c_in, c_out, 1, relu=False))
        self.shortcut = nn.Sequential(*shortcut)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block. x: (B, C_in, T) -> (B, width * expansion, ceil(T / stride))."""
        return torch.relu(self.body(x) + self.shortcut(x))


class XResNet1d(nn.Module):
    """1-D XResNet (ResNet-B/C/D tweaks) with bottleneck blocks; default depth 3-4-6-3 (XResNet1d-50).

    Args:
        in_leads: number of input leads L (channels).
        num_classes: number of output logits.
        layers: bottleneck blocks per stage.
        widths: bottleneck channels per stage (output = width * expansion).
        stem_channels: channels of the three stem convolutions.
        stem_kernel: kernel of the stem convolutions.
        kernel_size: kernel of the middle block convolutions.
        expansion: bottleneck expansion.
        dropout: dropout before the final linear layer.
    """

    def __init__(
        self,
        in_leads: int,
        num_classes: int = 2,
        layers: Sequence[int] = (3, 4, 6, 3),
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_channels: Sequence[int] = (32, 32, 64),
        stem_kernel: int = 11,
        kernel_size: int = 5,
        expansion: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_leads = in_leads
        stem: list[nn.Module] = []
        c_in = in_leads
        for i, c_out in enumerate(stem_channels):
            stem.append(_conv_bn(c_in, c_out, stem_kernel, 2 if i == 0 else 1))
            c_in = c_out
        stem.append(nn.MaxPool1d(3, 2, 1))
        self.stem = nn.Sequential(*stem)
        blocks: list[nn.Module] = []
        for stage, (count, width) in enumerate(zip(layers, widths)):
            for i in range(count):
                stride = 2 if i == 0 and stage > 0 else 1
                blocks.append(Bottleneck1d(c_in, width, expansion, stride, kernel_size))
                c_in = width * expansion
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(c_in, num_classes))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Classify.

        Args:
            x: (B, L, T) signals. mask: (B, L) bool, True = present; absent leads are zeroed.

        Returns:
            (B, num_classes) logits.
        """
        h = self.blocks(self.stem(_zero_absent(x, mask)))
        return self.head(h.mean(dim=-1))
