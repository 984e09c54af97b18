"""The paper's lead encoders and decoders for multimodal ECG VAEs, batched over leads.

The paper's lead expert (Suvon et al., arXiv 2503.13470; the architecture of
``kale.embed.signal_cnn.SignalVAEEncoder`` in PyKale) is three strided ``Conv1d`` layers 1 -> 16 -> 32 -> 64
(kernel 3, stride 2, padding 1, ReLU) followed by two linear heads to the mean and log-variance. The authors run
one such module per lead in a Python loop. :class:`LeadwiseSignalVAEEncoder` holds the weights of all ``L`` lead
encoders in stacked tensors and computes them in one pass with one of the convolution strategies of
:mod:`kale_ext.embed.conv_ops`; all give the same numbers as ``L`` independent PyKale modules (see
``tests/embed/test_signal_cnn.py``).

Decoders:

- :class:`SharedLeadDecoder`: one set of weights for every lead (linear, three ``ConvTranspose1d`` 64 -> 32 -> 16
  -> 1). In ``mode="lead"`` (default) it is told which lead to produce through a learned lead embedding added to
  ``z``; in ``mode="identical"`` it sees ``z`` alone, as in the authors' code, so all leads get the same output.
- :class:`LeadwiseSignalDecoder`: a separate decoder per lead (MVAE), batched with grouped operations.

The beta-VAE's joint encoder and decoder (all leads as channels of one network) are in
:mod:`kale_ext.embed.joint_cnn`.

Any signal length ``T`` works: the width after the three stride-2 layers is ``ceil(T / 8)`` and decoders crop or
pad their ``8 * ceil(T / 8)`` samples to exactly ``T`` (``conv_ops.fit_length``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kale_ext.embed.conv_ops import (
    CONV_IMPLS,
    block_diagonal,
    block_diagonal_transposed,
    check_conv_impl,
    conv_output_length,
    fit_length,
    resolve_conv_impl,
    strided_conv_matmul,
    transposed_conv_matmul,
    uniform_init_,
)
from kale_ext.embed.conv_triton import decoder_tail, encoder_conv_stack
from kale_ext.embed.fusion import bound_log_var

__all__ = [
    "CONV_IMPLS",
    "DECODER_MODES",
    "LeadwiseSignalDecoder",
    "LeadwiseSignalVAEEncoder",
    "SharedLeadDecoder",
    "conv_output_length",
    "resolve_conv_impl",
]

DECODER_MODES = ("lead", "identical")


class LeadwiseSignalVAEEncoder(nn.Module):
    """All L lead encoders of the paper in one batched module (weights not shared between leads).

    Per lead: Conv1d 1 -> 16 -> 32 -> 64 (kernel 3, stride 2, padding 1, ReLU), flatten channel-major
    (64 x ceil(T/8)), linear heads to the mean and log-variance. The log-variance is bounded here, once, with
    :func:`kale_ext.embed.fusion.bound_log_var`; outputs are float32 even under autocast.

    Args:
        num_leads: number of leads L.
        input_dim: samples per lead T (any positive length).
        latent_dim: latent size D.
        channels: convolution widths (the paper: 16, 32, 64).
        conv_impl: ``"auto"`` (the default, see ``resolve_conv_impl``), ``"conv"`` (grouped Conv1d, lead-major
            channels), ``"conv2d"`` (grouped height-1 Conv2d on
            channels-last tensors), ``"matmul"`` (channels-last batched matmuls) or ``"blockdiag"`` (dense channels-last
            Conv2d with block-diagonal weights); the maths is identical, only the speed differs by device (see
            benchmarks/pretrain_throughput.py).

    Attributes:
        conv_weights: per layer (L, C_out, C_in, 3). conv_biases: per layer (L, C_out).
        head_weight: (L, 2 D, F) rows ``[mean; log_var]``, F = 64 * ceil(T/8) channel-major. head_bias: (L, 2 D).
    """

    def __init__(
        self,
        num_leads: int,
        input_dim: int,
        latent_dim: int,
        channels: Sequence[int] = (16, 32, 64),
        conv_impl: str = "auto",
    ) -> None:
        super().__init__()
        check_conv_impl(conv_impl)
        if num_leads < 1 or input_dim < 1 or latent_dim < 1:
            raise ValueError("num_leads, input_dim and latent_dim must all be positive")
        self.num_leads = num_leads
        self.input_dim = input_dim
        self.latent_dim = latent_dim
        self.channels = tuple(channels)
        self.conv_impl = conv_impl
        self.feature_length = conv_output_length(input_dim, len(self.channels))
        self.flat_dim = self.channels[-1] * self.feature_length
        self.conv_weights = nn.ParameterList()
        self.conv_biases = nn.ParameterList()
        c_in = 1
        for c_out in self.channels:
            self.conv_weights.append(nn.Parameter(uniform_init_(torch.empty(num_leads, c_out, c_in, 3), c_in * 3)))
            self.conv_biases.append(nn.Parameter(uniform_init_(torch.empty(num_leads, c_out), c_in * 3)))
            c_in = c_out
        self.head_weight = nn.Parameter(
            uniform_init_(torch.empty(num_leads, 2 * latent_dim, self.flat_dim), self.flat_dim)
        )
        self.head_bias = nn.Parameter(uniform_init_(torch.empty(num_leads, 2 * latent_dim), self.flat_dim))

    def forward(self, x: Tensor, lead_index: Sequence[int] | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Encode every lead (or the leads named by ``lead_index``) in one pass.

        Args:
            x: (B, L', T) signals; L' = L, or ``len(lead_index)`` when given.
            lead_index: positions (into this encoder's L leads) of the channels of ``x``. Only these leads'
                encoders run, so encoding a subset costs only the subset.

        Returns:
            mean: (L', B, D) float32. log_var: (L', B, D) float32, bounded.
        """
        conv_w, conv_b = list(self.conv_weights), list(self.conv_biases)
        head_w, head_b = self.head_weight, self.head_bias
        if lead_index is not None:
            idx = torch.as_tensor(lead_index, dtype=torch.long, device=head_w.device)
            conv_w = [w.index_select(0, idx) for w in conv_w]
            conv_b = [b.index_select(0, idx) for b in conv_b]
            head_w, head_b = head_w.index_select(0, idx), head_b.index_select(0, idx)
        leads = head_w.shape[0]
        if x.dim() != 3 or x.shape[1] != leads or x.shape[2] != self.input_dim:
            raise ValueError(
                f"expected signals of shape (batch, {leads}, {self.input_dim}), got {tuple(x.shape)}; "
                "pass lead_index naming the encoder of each channel when encoding a subset"
            )
        impl = resolve_conv_impl(self.conv_impl, x.device)
        if impl == "triton" and (len(conv_w) != 3 or any(c & (c - 1) or c < 16 for c in self.channels)):
            impl = "conv"  # the fused kernel is written for three layers of power-of-two widths >= 16
        if impl == "triton":
            h = encoder_conv_stack(x, conv_w, conv_b)
        elif impl == "conv":
            h = self._features_conv(x, conv_w, conv_b)  # (L', B, F)
        elif impl == "conv2d":
            h = self._features_conv2d(x, conv_w, conv_b)
        elif impl == "blockdiag":
            h = self._features_blockdiag(x, conv_w, conv_b)
        else:
            h = self._features_matmul(x, conv_w, conv_b)
            # Channels-last features are time-major: reorder the head's columns to match (a cheap weight copy).
            head_w = head_w.view(leads, -1, self.channels[-1], self.feature_length).transpose(2, 3)
            head_w = head_w.reshape(leads, -1, self.flat_dim)
        out = torch.baddbmm(head_b.unsqueeze(1).to(h.dtype), h, head_w.transpose(1, 2).to(h.dtype))
        mean, log_var = out.float().split(self.latent_dim, dim=-1)
        return mean, bound_log_var(log_var)

    def _features_conv(self, x: Tensor, conv_w: list[Tensor], conv_b: list[Tensor]) -> Tensor:
        leads = conv_w[0].shape[0]
        h = x
        for w, b in zip(conv_w, conv_b):
            # Lead-major channel order: channels [l * C, (l + 1) * C) belong to lead l.
            h = F.relu(F.conv1d(h, w.reshape(-1, w.shape[2], 3), b.reshape(-1), stride=2, padding=1, groups=leads))
        # (B, L' * C, T') -> (L', B, C * T'): per lead the same channel-major flatten as PyKale.
        return h.reshape(h.shape[0], leads, -1).transpose(0, 1)

    def _features_conv2d(self, x: Tensor, conv_w: list[Tensor], conv_b: list[Tensor]) -> Tensor:
        # Height-1 Conv2d on channels-last tensors: cuDNN's NHWC kernels without layout conversions.
        leads = conv_w[0].shape[0]
        h = x.unsqueeze(2).contiguous(memory_format=torch.channels_last)
        for w, b in zip(conv_w, conv_b):
            w2 = w.reshape(-1, w.shape[2], 1, 3).contiguous(memory_format=torch.channels_last)
            h = F.relu(F.conv2d(h, w2, b.reshape(-1), stride=(1, 2), padding=(0, 1), groups=leads))
        return h.reshape(h.shape[0], leads, -1).transpose(0, 1)

    def _features_blockdiag(self, x: Tensor, conv_w: list[Tensor], conv_b: list[Tensor]) -> Tensor:
        # Dense height-1 Conv2d (channels-last) with block-diagonal weights: the same maths as the grouped form.
        leads = conv_w[0].shape[0]
        h = x.unsqueeze(2).contiguous(memory_format=torch.channels_last)
        for w, b in zip(conv_w, conv_b):
            w2 = block_diagonal(w).unsqueeze(2).contiguous(memory_format=torch.channels_last)
            h = F.relu(F.conv2d(h, w2, b.reshape(-1), stride=(1, 2), padding=(0, 1)))
        return h.reshape(h.shape[0], leads, -1).transpose(0, 1)

    def _features_matmul(self, x: Tensor, conv_w: list[Tensor], conv_b: list[Tensor]) -> Tensor:
        h = x.transpose(0, 1).unsqueeze(-1)  # (L', B, T, 1) channels-last
        for w, b in zip(conv_w, conv_b):
            h = F.relu(strided_conv_matmul(h, w, b))
        return h.reshape(h.shape[0], h.shape[1], -1)  # (L', B, T' * C), time-major

    def select(self, lead_index: Sequence[int]) -> LeadwiseSignalVAEEncoder:
        """A new encoder holding copies of the weights of the leads at ``lead_index`` (in that order).

        Args:
            lead_index: positions of the leads to keep.

        Returns:
            LeadwiseSignalVAEEncoder with ``len(lead_index)`` leads.
        """
        idx = torch.as_tensor(list(lead_index), dtype=torch.long)
        new = LeadwiseSignalVAEEncoder(len(idx), self.input_dim, self.latent_dim, self.channels, self.conv_impl)
        new.to(self.head_weight.device)
        with torch.no_grad():
            for src, dst in zip(self.parameters(), new.parameters()):
                dst.copy_(src.index_select(0, idx.to(src.device)))
        return new

    @classmethod
    def from_kale(
        cls, encoders: Sequence[nn.Module], input_dim: int | None = None, conv_impl: str = "auto"
    ) -> LeadwiseSignalVAEEncoder:
        """Stack the weights of PyKale ``SignalVAEEncoder`` modules, one per lead, in lead order.

        Args:
            encoders: L ``kale.embed.signal_cnn.SignalVAEEncoder`` modules with equal shapes.
            input_dim: the signal length T; default ``8 * fc_in / 64`` (the length PyKale was built for).
            conv_impl: implementation of the new module.

        Returns:
            A LeadwiseSignalVAEEncoder computing the same means (and bounded log-variances).
        """
        if not encoders:
            raise ValueError("from_kale needs at least one encoder")
        first = encoders[0]
        channels = [first.conv1.out_channels, first.conv2.out_channels, first.conv3.out_channels]
        flat = first.fc_mu.in_features
        input_dim = input_dim if input_dim is not None else 8 * flat // channels[-1]
        new = cls(len(encoders), input_dim, first.fc_mu.out_features, channels, conv_impl)
        if new.flat_dim != flat:
            raise ValueError(
                f"the PyKale encoders flatten {flat} features but input_dim={input_dim} gives {new.flat_dim}; "
                "pass the signal length the encoders were built for"
            )
        with torch.no_grad():
            for layer in range(3):
                convs = [getattr(enc, f"conv{layer + 1}") for enc in encoders]
                new.conv_weights[layer].copy_(torch.stack([c.weight for c in convs]))
                new.conv_biases[layer].copy_(torch.stack([c.bias for c in convs]))
            new.head_weight.copy_(torch.stack([torch.cat([e.fc_mu.weight, e.fc_log_var.weight]) for e in encoders]))
            new.head_bias.copy_(torch.stack([torch.cat([e.fc_mu.bias, e.fc_log_var.bias]) for e in encoders]))
        return new.to(first.fc_mu.weight.device)

    def to_kale(self) -> list[nn.Module]:
        """Export one PyKale ``SignalVAEEncoder`` per lead holding this module's weights.

        PyKale sizes its linear heads as ``64 * (input_dim // 8)``, which only matches the real convolution output
        when T is a multiple of 8. For other T the exported modules are built with ``input_dim = 8 * ceil(T/8)``
        (same head width ``64 * ceil(T/8)``) and give identical outputs on signals of length T.
        Note PyKale does not bound the log-variance; values inside the bound are identical.

        Returns:
            list of L ``kale.embed.signal_cnn.SignalVAEEncoder`` modules.
        """
        from kale.embed.signal_cnn import SignalVAEEncoder  # optional dependency, imported where used

        if self.channels != (16, 32, 64):
            raise ValueError(f"to_kale needs the PyKale widths (16, 32, 64); this encoder has {self.channels}")
        kale_dim = 8 * self.feature_length
        out = []
        d = self.latent_dim
        with torch.no_grad():
            for lead in range(self.num_leads):
                enc = SignalVAEEncoder(input_dim=kale_dim, latent_dim=d).to(self.head_weight.device)
                for layer in range(3):
                    conv = getattr(enc, f"conv{layer + 1}")
                    conv.weight.copy_(self.conv_weights[layer][lead])
                    conv.bias.copy_(self.conv_biases[layer][lead])
                enc.fc_mu.weight.copy_(self.head_weight[lead, :d])
                enc.fc_mu.bias.copy_(self.head_bias[lead, :d])
                enc.fc_log_var.weight.copy_(self.head_weight[lead, d:])
                enc.fc_log_var.bias.copy_(self.head_bias[lead, d:])
                out.append(enc)
        return out


class SharedLeadDecoder(nn.Module):
    """The paper's shared decoder: one set of weights for all leads, batched over leads.

    Linear D -> 64 * ceil(T/8), reshape (64, ceil(T/8)), ConvTranspose1d 64 -> 32 -> 16 -> 1 (kernel 4, stride 2,
    padding 1) with ReLU, ReLU, identity; output cropped or zero-padded to exactly T.

    ``mode="lead"`` (default): lead l decodes ``z + e_l`` with a learned lead embedding ``e_l`` (L x D extra
    parameters, initialised N(0, 1) like z's prior) so each lead gets its own reconstruction. Since the first
    layer is linear, ``W (z + e_l) + b = (W z + b) + W e_l``: the linear runs once per sample and the lead term
    is added per lead; then the leads are folded into the batch for the transposed convolutions.
    The first transposed convolution is also linear, so it too runs once per sample (plus once per lead on the
    embedding term); only the last two layers run on all B x L (lead, sample) pairs.
    ``mode="identical"``: the authors' behaviour; the decoder sees z alone, is run once and its output repeated
    for every lead.

    Args:
        num_leads: number of leads L produced.
        output_dim: samples per lead T.
        latent_dim: latent size D.
        mode: ``"lead"`` or ``"identical"``.
        channels: widths after the linear layer (the paper: 64, 32, 16; the last layer has 1 channel).
        conv_impl: ``"auto"`` (the default, see ``resolve_conv_impl``), ``"conv"`` (``conv_transpose1d``),
            ``"conv2d"`` (height-1 ``conv_transpose2d``, channels-last),
            ``"matmul"`` (channels-last matmuls) or ``"blockdiag"`` (leads in the channels, the shared weight
            repeated on a block diagonal, dense channels-last kernels); same maths.
    """

    def __init__(
        self,
        num_leads: int,
        output_dim: int,
        latent_dim: int,
        mode: str = "lead",
        channels: Sequence[int] = (64, 32, 16),
        conv_impl: str = "auto",
    ) -> None:
        super().__init__()
        check_conv_impl(conv_impl)
        if mode not in DECODER_MODES:
            raise ValueError(f"mode must be one of {DECODER_MODES}, got {mode!r}")
        self.num_leads = num_leads
        self.output_dim = output_dim
        self.latent_dim = latent_dim
        self.mode = mode
        self.conv_impl = conv_impl
        self.channels = tuple(channels)
        self.feature_length = conv_output_length(output_dim, len(self.channels))
        self.flat_dim = self.channels[0] * self.feature_length
        self.fc = nn.Linear(latent_dim, self.flat_dim)
        widths = [*self.channels, 1]
        self.deconvs = nn.ModuleList(
            nn.ConvTranspose1d(c_in, c_out, kernel_size=4, stride=2, padding=1)
            for c_in, c_out in zip(widths[:-1], widths[1:])
        )
        self.lead_embedding = nn.Parameter(torch.randn(num_leads, latent_dim)) if mode == "lead" else None

    def forward(self, z: Tensor) -> Tensor:
        """Decode every lead.

        Args:
            z: (B, D) latent.

        Returns:
            (B, L, T) reconstructions.
        """
        batch = z.shape[0]
        impl = resolve_conv_impl(self.conv_impl, z.device)
        if impl == "triton" and (self.mode != "lead" or len(self.deconvs) != 3):
            impl = "conv"  # the fused tail is written for the lead-conditioned three-layer decoder
        if impl == "triton":
            return self._forward_triton(z)
        if impl == "blockdiag" and self.mode == "lead":
            return self._forward_blockdiag(z)
        if impl == "matmul":
            # Time-major rows so the linear output is already channels-last (a cheap weight permutation).
            c0, t0 = self.channels[0], self.feature_length
            w = self.fc.weight.view(c0, t0, -1).transpose(0, 1).reshape(self.flat_dim, -1)
            b = self.fc.bias.view(c0, t0).t().reshape(-1)
        else:
            w, b = self.fc.weight, self.fc.bias
        h = self._layer(0, self._unflatten(F.linear(z, w, b), impl), impl)
        if self.mode == "lead":
            # The first transposed convolution is linear too: conv(h + W e_l) = conv(h) + conv_nobias(W e_l), so
            # it runs once per sample and the lead term (L rows) is added before its ReLU; from there on the
            # leads are folded into the batch.
            lead = self._layer(0, self._unflatten(F.linear(self.lead_embedding, w), impl), impl, bias=False)
            h = (h.unsqueeze(1) + lead.to(h.dtype).unsqueeze(0)).flatten(0, 1)
            if impl in ("conv2d", "blockdiag"):
                h = h.contiguous(memory_format=torch.channels_last)
        for i in range(1, len(self.deconvs)):
            h = self._layer(i, F.relu(h), impl)
        out = fit_length(self._flatten(h), self.output_dim)  # (N, T)
        if self.mode == "lead":
            return out.view(batch, self.num_leads, self.output_dim)
        return out.unsqueeze(1).expand(batch, self.num_leads, self.output_dim)

    def _forward_triton(self, z: Tensor) -> Tensor:
        # The first two (linear) layers as in "conv" mode, once per sample and once per lead; the lead add, the last
        # two transposed convolutions, ReLUs and the crop run fused per (sample, lead) in Triton.
        w, b = self.fc.weight, self.fc.bias
        h1 = self._layer(0, self._unflatten(F.linear(z, w, b), "conv"), "conv")
        lead = self._layer(0, self._unflatten(F.linear(self.lead_embedding, w), "conv"), "conv", bias=False)
        d2, d3 = self.deconvs[1], self.deconvs[2]
        return decoder_tail(h1, lead.to(h1.dtype), d2.weight, d2.bias, d3.weight, d3.bias, self.output_dim)

    def _forward_blockdiag(self, z: Tensor) -> Tensor:
        # As the lead mode above, but the leads go into the channels (lead-major) instead of the batch, and the
        # remaining transposed convolutions use the shared weight repeated on a block diagonal: dense kernels.
        batch, leads = z.shape[0], self.num_leads
        w, b = self.fc.weight, self.fc.bias
        h = self._layer(0, self._unflatten(F.linear(z, w, b), "blockdiag"), "blockdiag")  # (B, C1, 1, T1)
        lead = self._layer(0, self._unflatten(F.linear(self.lead_embedding, w), "blockdiag"), "blockdiag", bias=False)
        lead = lead.to(h.dtype)
        h = (h.unsqueeze(1) + lead.unsqueeze(0)).flatten(1, 2)  # (B, L * C1, 1, T1)
        h = h.contiguous(memory_format=torch.channels_last)
        for i in range(1, len(self.deconvs)):
            deconv = self.deconvs[i]
            w2 = block_diagonal_transposed(deconv.weight, leads).unsqueeze(2)
            h = F.conv_transpose2d(F.relu(h), w2, deconv.bias.repeat(leads), stride=(1, 2), padding=(0, 1))
        return fit_length(h.reshape(batch, leads, -1), self.output_dim)

    def _unflatten(self, h: Tensor, impl: str) -> Tensor:
        # (N, F) -> the layout of the implementation.
        if impl == "matmul":
            return h.view(h.shape[0], self.feature_length, self.channels[0])
        h = h.view(h.shape[0], self.channels[0], self.feature_length)
        if impl in ("conv2d", "blockdiag"):
            h = h.unsqueeze(2).contiguous(memory_format=torch.channels_last)
        return h

    def _flatten(self, h: Tensor) -> Tensor:
        # Last layer output (1 channel) -> (N, 8 * ceil(T/8)).
        return h.reshape(h.shape[0], -1)

    def _layer(self, i: int, h: Tensor, impl: str, bias: bool = True) -> Tensor:
        deconv = self.deconvs[i]
        b = deconv.bias if bias else None
        if impl == "matmul":
            return transposed_conv_matmul(h, deconv.weight, b if b is not None else torch.zeros_like(deconv.bias))
        if impl in ("conv2d", "blockdiag"):
            return F.conv_transpose2d(h, deconv.weight.unsqueeze(2), b, stride=(1, 2), padding=(0, 1))
        return F.conv_transpose1d(h, deconv.weight, b, stride=2, padding=1)


class LeadwiseSignalDecoder(nn.Module):
    """A separate decoder per lead (MVAE), same architecture as :class:`SharedLeadDecoder`, batched over leads.

    The per-lead linear layers run as one batched matmul and the transposed convolutions as grouped
    ``conv_transpose1d`` (lead-major channels).

    Args:
        num_leads: number of leads L.
        output_dim: samples per lead T.
        latent_dim: latent size D.
        channels: widths after the linear layer (the paper: 64, 32, 16).
    """

    def __init__(self, num_leads: int, output_dim: int, latent_dim: int, channels: Sequence[int] = (64, 32, 16)):
        super().__init__()
        self.num_leads = num_leads
        self.output_dim = output_dim
        self.latent_dim = latent_dim
        self.channels = tuple(channels)
        self.feature_length = conv_output_length(output_dim, len(self.channels))
        self.flat_dim = self.channels[0] * self.feature_length
        self.fc_weight = nn.Parameter(uniform_init_(torch.empty(num_leads, latent_dim, self.flat_dim), latent_dim))
        self.fc_bias = nn.Parameter(uniform_init_(torch.empty(num_leads, self.flat_dim), latent_dim))
        widths = [*self.channels, 1]
        self.deconv_weights = nn.ParameterList()
        self.deconv_biases = nn.ParameterList()
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            # ConvTranspose1d's default init uses fan_in = C_out * kernel (its weight is (C_in, C_out, k)).
            self.deconv_weights.append(nn.Parameter(uniform_init_(torch.empty(num_leads, c_in, c_out, 4), c_out * 4)))
            self.deconv_biases.append(nn.Parameter(uniform_init_(torch.empty(num_leads, c_out), c_out * 4)))

    def forward(self, z: Tensor) -> Tensor:
        """Decode every lead with its own decoder.

        Args:
            z: (B, D) latent.

        Returns:
            (B, L, T) reconstructions.
        """
        batch, leads = z.shape[0], self.num_leads
        h = torch.einsum("bd,ldf->blf", z, self.fc_weight) + self.fc_bias.to(z.dtype)
        h = h.reshape(batch, leads * self.channels[0], self.feature_length)
        last = len(self.deconv_weights) - 1
        for i, (w, b) in enumerate(zip(self.deconv_weights, self.deconv_biases)):
            h = F.conv_transpose1d(h, w.reshape(-1, w.shape[2], 4), b.reshape(-1), stride=2, padding=1, groups=leads)
            h = F.relu(h) if i < last else h
        return fit_length(h, self.output_dim)
