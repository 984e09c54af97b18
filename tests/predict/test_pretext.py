"""Tests of kale_ext.predict.pretext: the capacity schedule and term against hand computations, the re-export."""

import subprocess
import sys

import pytest
import torch

from kale_ext.embed import st_mem
from kale_ext.predict.losses import gaussian_kl
from kale_ext.predict.pretext import (
    BURGESS_DSPRITES,
    capacity_kl,
    capacity_schedule,
    ecg_capacity_settings,
    masked_patch_mse,
)


def test_capacity_schedule_by_hand():
    assert capacity_schedule(0, 25.0, 100) == 0.0
    assert capacity_schedule(40, 25.0, 100) == pytest.approx(10.0)
    assert capacity_schedule(100, 25.0, 100) == 25.0 and capacity_schedule(10**6, 25.0, 100) == 25.0
    assert capacity_schedule(-5, 25.0, 100) == 0.0
    assert capacity_schedule(30, 20.0, 60, c_min=5.0) == pytest.approx(12.5)  # 5 + 15 * 0.5
    assert capacity_schedule(0, 7.0, 0) == 7.0  # no ramp
    g, c, w, c0 = BURGESS_DSPRITES
    assert (g, c, w, c0) == (1000.0, 25.0, 100_000, 0.0)
    assert capacity_schedule(50_000, c, w) == pytest.approx(12.5)


def test_capacity_kl_by_hand():
    mean = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    log_var = torch.zeros(2, 2)
    kl = gaussian_kl(mean, log_var)  # 0.5 * ||mu||^2 per sample: [0.5, 2.0], batch mean 1.25
    torch.testing.assert_close(kl, torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(capacity_kl(kl, 0.25, 1000.0), torch.tensor(1000.0))  # 1000 * |1.25 - 0.25|
    torch.testing.assert_close(capacity_kl(kl.mean(), 3.0, 2.0), torch.tensor(3.5))  # 2 * |1.25 - 3|
    # the gradient pulls KL towards C from both sides
    k = torch.tensor(4.0, requires_grad=True)
    capacity_kl(k, 5.0, 3.0).backward()
    assert k.grad.item() == -3.0
    with pytest.raises(ValueError, match="scalar or"):
        capacity_kl(torch.zeros(2, 2), 1.0, 1.0)


def test_ecg_capacity_settings():
    s = ecg_capacity_settings(1000)
    assert s.gamma == pytest.approx(1000.0 / 4096 * 12, rel=0.03) and s.c_max == 50.0 and s.warmup_steps == 500
    assert ecg_capacity_settings(10, leads=6).gamma == 1.5


def test_masked_patch_mse_reexported_and_light():
    assert masked_patch_mse is st_mem.masked_patch_mse
    code = (
        "import sys, kale_ext.predict.pretext\n"
        "heavy = [m for m in ('wfdb', 'pandas', 'lightning', 'pytorch_lightning', 'captum') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
