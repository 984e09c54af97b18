"""Run by test_pretrain.py: a two-process CPU DDP pre-training that logs the record indices of every rank.

Lightning's "ddp" strategy re-launches this script for rank 1, so it must be a file (not a function of the test).
"""

import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.lightning import IndexLogger  # noqa: E402

from kale_ext.embed.zoo import build_model  # noqa: E402
from kale_ext.pipeline.pretrain import PretrainSettings, run_pretraining  # noqa: E402
from kale_ext.predict.objectives import ELBOObjective  # noqa: E402

LEADS = ("I", "II")


class Tiny(Dataset):
    """20 random two-lead records, one subject each."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(20, 2, 32, generator=g)
        self.subject_ids = np.arange(20).astype(str)
        self.leads = LEADS

    def __len__(self):
        return 20

    def __getitem__(self, i):
        return {"signals": self.x[i], "mask": torch.ones(2, dtype=torch.bool)}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    model = build_model("lsemvae", LEADS, 32, 2, conv_impl="conv")
    settings = PretrainSettings(
        epochs=1, batch_size=4, val_fraction=0.0, accelerator="cpu", devices=2, strategy="ddp", progress_bar=False
    )
    run_pretraining(model, ELBOObjective(), Tiny(), out, settings, callbacks=[IndexLogger(out)])
