"""Lightning callbacks used by tests: a simulated crash, and a log of the records each rank trained on."""

from pathlib import Path

import pytorch_lightning as pl


class SimulatedInterruption(RuntimeError):
    """Raised by ``FailAtEpoch``."""


class FailAtEpoch(pl.Callback):
    """Raise at the start of epoch ``epoch`` (0-based) to simulate a killed run (tests of resume)."""

    def __init__(self, epoch: int):
        self.epoch = int(epoch)

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise SimulatedInterruption(f"simulated interruption at the start of epoch {self.epoch}")


class IndexLogger(pl.Callback):
    """Each rank appends ``<epoch> <indices...>`` of every training batch to ``folder/seen_rank<k>.txt``."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"seen_rank{trainer.global_rank}.txt", "a", encoding="utf-8") as fh:
            fh.write(f"{trainer.current_epoch} " + " ".join(map(str, batch["index"].tolist())) + "\n")
