"""The beta-VAE's joint encoder and decoder (kale_ext.embed.joint_cnn): shapes at any length, bounded variance."""

import torch

from kale_ext.embed.fusion import LOG_VAR_MAX
from kale_ext.embed.joint_cnn import JointSignalDecoder, JointSignalVAEEncoder


def test_joint_encoder_decoder_shapes():
    enc = JointSignalVAEEncoder(12, 99, 5)
    mean, log_var = enc(torch.randn(2, 12, 99))
    assert mean.shape == log_var.shape == (1, 2, 5)
    assert JointSignalDecoder(12, 99, 5)(mean[0]).shape == (2, 12, 99)


def test_joint_encoder_bounds_the_log_variance():
    enc = JointSignalVAEEncoder(2, 16, 3)
    with torch.no_grad():
        enc.fc_log_var.bias.fill_(1e4)
    _, log_var = enc(torch.randn(1, 2, 16))
    assert log_var.max() <= LOG_VAR_MAX
