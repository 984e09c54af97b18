"""The training-curve figure reads the run's own logs and draws every panel it has data for."""

import pandas as pd
from PIL import Image

from kale_ext.evaluate.training_curves import plot_training_curves, read_training_logs


def _logs(root):
    pre = root / "pretrain" / "logs" / "csv" / "version_0"
    pre.mkdir(parents=True)
    rows = []
    for epoch in range(3):
        rows.append({"epoch": epoch, "step": epoch, "val/loss": 9 - epoch, "val/kl": 0.1})
        rows.append({"epoch": epoch, "step": epoch, "train/loss": 10 - epoch, "train/kl": 0.2, "train/loss_step": 1})
    pd.DataFrame(rows).to_csv(pre / "metrics.csv", index=False)
    gates = [{"epoch": e, "expert": x, "mean_weight": w} for e in range(3) for x, w in (("I", 0.4), ("shared", 0.6))]
    pd.DataFrame(gates).to_csv(root / "pretrain" / "gate_diagnostics.csv", index=False)
    for fold in range(2):
        folder = root / "finetune" / "logs" / "csv" / f"fold{fold}"
        folder.mkdir(parents=True)
        pd.DataFrame({"epoch": [0, 1], "step": [0, 1], "train/loss": [0.5, 0.4]}).to_csv(folder / "metrics.csv")
    return root / "pretrain", root / "finetune"


def test_reads_per_epoch_tables_and_draws_each_panel(tmp_path):
    logs = read_training_logs(*_logs(tmp_path))
    assert list(logs["pretrain"]["train/loss"]) == [10, 9, 8] and list(logs["pretrain"]["val/loss"]) == [9, 8, 7]
    assert "train/loss_step" not in logs["pretrain"]
    assert list(logs["gates"].columns) == ["I", "shared"] and len(logs["gates"]) == 3
    assert sorted(logs["finetune"]) == ["fold0", "fold1"]
    path = plot_training_curves(logs, tmp_path / "curves.png", title="LVH: model, 6L")
    panels = Image.open(path).text["Description"].split("\n")
    assert panels == [
        "pre-training loss per epoch",
        "pre-training kl per epoch",
        "gate weights per epoch",
        "fine-tuning loss per fold",
    ]
    assert Image.open(path).text["Title"] == "LVH: model, 6L"


def test_a_run_without_logs_still_gets_a_figure(tmp_path):
    logs = read_training_logs(tmp_path / "none", None)
    assert logs == {"pretrain": None, "gates": None, "finetune": {}}
    path = plot_training_curves(logs, tmp_path / "empty.png")
    assert path.stat().st_size > 1000 and Image.open(path).text["Description"] == ""
