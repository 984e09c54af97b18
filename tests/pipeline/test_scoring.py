"""Tests of kale_ext.pipeline.scoring: every record gets a row, refusals say why, predictions are integers."""

import numpy as np
import pandas as pd
import torch
from torch import nn

from kale_ext.pipeline.scoring import refusals_from_qc, score_records


class _Data(torch.utils.data.Dataset):
    def __init__(self):
        self.masks = np.array([[1, 1], [1, 0], [1, 1]], dtype=bool)
        self.record_ids = np.array(["a", "b", "c"])
        self.subject_ids = np.array(["sa", "sb", "sc"])
        self.x = torch.tensor([[[1.0] * 4, [1.0] * 4], [[0.0] * 4, [0.0] * 4], [[-1.0] * 4, [-1.0] * 4]])

    def __len__(self):
        return 3

    def __getitem__(self, i):
        return {"signals": self.x[i], "mask": torch.from_numpy(self.masks[i])}


class _Clf(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x, mask=None):
        s = x.mean(dim=(1, 2)) * self.scale
        return torch.stack([-s, s], dim=1)


def test_scores_refusals_and_provenance():
    qc = pd.DataFrame({"record_id": ["a", "b", "c", "d"], "status": ["ok", "ok", "ok", "skipped"],
                       "reason": ["", "", "", "no sampling frequency"]})  # fmt: skip
    table = score_records([_Clf(1.0), _Clf(3.0)], _Data(), ("I", "II"), 0.5, qc=qc, provenance={"model": "m"})
    assert sorted(table["record_id"]) == ["a", "b", "c", "d"]
    rows = table.set_index("record_id")
    assert rows.loc["b", "status"] == "refused: lacks lead II"
    assert rows.loc["d", "status"] == "refused: no sampling frequency"
    assert pd.isna(rows.loc["b", "probability"]) and pd.isna(rows.loc["b", "prediction"])
    assert rows.loc["a", "prediction"] == 1 and rows.loc["c", "prediction"] == 0
    assert str(table["prediction"].dtype) == "Int64" and set(table["model"]) == {"m"}
    # mean over the two fold classifiers of softmax([-s, s])[1] = sigmoid(2 s)
    expected = np.mean([1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(-6.0))])
    assert np.isclose(rows.loc["a", "probability"], expected)


def test_nothing_to_score_still_gives_a_table_with_the_refusals():
    qc = pd.DataFrame({"record_id": ["x"], "status": ["skipped"], "reason": ["unreadable header"]})
    table = score_records([], None, ("I",), 0.5, qc=qc)
    assert list(table["status"]) == ["refused: unreadable header"]
    assert refusals_from_qc(pd.DataFrame()).empty


def test_column_order_is_the_same_with_and_without_refusals():
    expected = ["record_id", "subject_id", "probability", "prediction", "status", "threshold", "model", "task"]
    provenance = {"model": "m", "task": "t"}
    clean = pd.DataFrame({"record_id": ["a", "b", "c"], "status": ["ok"] * 3, "reason": [""] * 3})
    refused = pd.DataFrame({"record_id": ["a", "b", "c", "d"], "status": ["ok", "ok", "ok", "skipped"],
                            "reason": ["", "", "", "no sampling frequency"]})  # fmt: skip
    only_ok = score_records([_Clf(1.0)], _OkData(), ("I", "II"), 0.5, qc=clean, provenance=provenance)
    mixed = score_records([_Clf(1.0)], _Data(), ("I", "II"), 0.5, qc=refused, provenance=provenance)
    nothing = score_records([], None, ("I", "II"), 0.5, qc=refused.iloc[3:], provenance=provenance)
    for table in (only_ok, mixed, nothing):
        assert list(table.columns) == expected


class _OkData(_Data):
    def __init__(self):
        super().__init__()
        self.masks = np.ones((3, 2), dtype=bool)
