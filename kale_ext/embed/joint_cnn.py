"""One encoder and one decoder over all leads as channels: the beta-VAE baseline's "raw-data fusion".

beta-VAE (Higgins et al. 2017) as the authors' baseline builds it: a single 12-channel convolutional encoder
(32/64/128/256 channels) and a mirrored decoder, so the model has one expert and no lead structure.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kale_ext.embed.conv_ops import conv_output_length, fit_length
from kale_ext.embed.fusion import bound_log_var


class JointSignalVAEEncoder(nn.Module):
    """One encoder over all leads as input channels (beta-VAE "raw-data fusion"): a single expert.

    Conv1d L -> 32 -> 64 -> 128 -> 256 (kernel 3, stride 2, padding 1, ReLU), flatten, linear heads.

    Args:
        num_leads: input channels L.
        input_dim: samples per lead T.
        latent_dim: latent size D.
        channels: convolution widths (default 32, 64, 128, 256 as in the authors' beta-VAE).
    """

    joint = True

    def __init__(
        self, num_leads: int, input_dim: int, latent_dim: int, channels: Sequence[int] = (32, 64, 128, 256)
    ) -> None:
        super().__init__()
        self.num_leads = num_leads
        self.input_dim = input_dim
        self.latent_dim = latent_dim
        widths = [num_leads, *channels]
        self.convs = nn.ModuleList(
            nn.Conv1d(c_in, c_out, 3, stride=2, padding=1) for c_in, c_out in zip(widths[:-1], widths[1:])
        )
        flat = channels[-1] * conv_output_length(input_dim, len(channels))
        self.fc_mu = nn.Linear(flat, latent_dim)
        self.fc_log_var = nn.Linear(flat, latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Encode all leads jointly.

        Args:
            x: (B, L, T) signals (absent leads zero-filled by the caller).

        Returns:
            mean: (1, B, D) float32. log_var: (1, B, D) float32, bounded.
        """
        h = x
        for conv in self.convs:
            h = F.relu(conv(h))
        h = h.flatten(1)
        return self.fc_mu(h).float().unsqueeze(0), bound_log_var(self.fc_log_var(h).float()).unsqueeze(0)


class JointSignalDecoder(nn.Module):
    """Decoder producing all L leads as output channels of one network (beta-VAE).

    Linear D -> 256 * ceil(T/16), ConvTranspose1d 256 -> 128 -> 64 -> 32 -> L (kernel 4, stride 2, padding 1,
    ReLU between), output cropped/padded to T.

    Args:
        num_leads: output channels L.
        output_dim: samples per lead T.
        latent_dim: latent size D.
        channels: widths after the linear layer.
    """

    def __init__(
        self, num_leads: int, output_dim: int, latent_dim: int, channels: Sequence[int] = (256, 128, 64, 32)
    ) -> None:
        super().__init__()
        self.num_leads = num_leads
        self.output_dim = output_dim
        self.channels = tuple(channels)
        self.feature_length = conv_output_length(output_dim, len(self.channels))
        self.fc = nn.Linear(latent_dim, self.channels[0] * self.feature_length)
        widths = [*self.channels, num_leads]
        self.deconvs = nn.ModuleList(
            nn.ConvTranspose1d(c_in, c_out, 4, stride=2, padding=1) for c_in, c_out in zip(widths[:-1], widths[1:])
        )

    def forward(self, z: Tensor) -> Tensor:
        """Decode all leads.

        Args:
            z: (B, D) latent.

        Returns:
            (B, L, T) reconstructions.
        """
        h = self.fc(z).view(z.shape[0], self.channels[0], self.feature_length)
        for i, deconv in enumerate(self.deconvs):
            h = deconv(h)
            h = F.relu(h) if i < len(self.deconvs) - 1 else h
        return fit_length(h, self.output_dim)
