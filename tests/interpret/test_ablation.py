"""Lead ablation through the mask: the AUROC drop per lead, per fold, and its summary."""

import numpy as np
import pandas as pd
import pytest
import torch

from kale_ext.interpret.ablation import lead_ablation, summarise_ablation


def _lead_one_model(x, mask):
    """Class-1 logit = mean of lead 1 when present (else 0) + a small share of lead 0."""
    m = mask.float()
    score = x[:, 1].mean(dim=-1) * m[:, 1] + 0.01 * x[:, 0].mean(dim=-1) * m[:, 0]
    return torch.stack([torch.zeros_like(score), score], dim=1)


def test_drop_is_large_for_the_informative_lead_and_zero_for_an_unused_one():
    """Masking the lead that carries the label drops AUROC from 1 to 0.5; masking an unused lead drops nothing."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, 20, generator=gen)
    labels = (x[:, 1].mean(dim=-1) > 0).long().numpy()
    table = lead_ablation(_lead_one_model, x, labels, ["I", "II", "III"], fold=2)
    table = table.set_index("lead")
    assert list(table.index) == ["I", "II", "III"]
    assert (table["fold"] == 2).all()
    assert table.loc["II", "auroc_full"] == pytest.approx(1.0)
    assert table.loc["II", "auroc_ablated"] == pytest.approx(0.5, abs=0.2)  # only lead 0's faint term is left
    assert table.loc["II", "drop"] > 0.3
    assert table.loc["III", "drop"] == pytest.approx(0.0)


def test_leads_not_in_use_are_skipped_and_lead_count_is_checked():
    """A lead absent in every record gets no row; a name list of the wrong length is refused."""
    x = torch.randn(10, 3, 8)
    labels = np.tile([0, 1], 5)
    mask = torch.ones(10, 3, dtype=torch.bool)
    mask[:, 2] = False
    table = lead_ablation(_lead_one_model, x, labels, ["I", "II", "V1"], mask)
    assert list(table["lead"]) == ["I", "II"]
    with pytest.raises(ValueError, match="lead_names"):
        lead_ablation(_lead_one_model, x, labels, ["I", "II"])


def test_single_class_gives_nan_not_an_error():
    """AUROC is undefined with one class: NaN, not a crash."""
    x = torch.randn(6, 3, 8)
    table = lead_ablation(_lead_one_model, x, np.ones(6), ["I", "II", "III"])
    assert table["auroc_full"].isna().all()


def test_summary_over_folds_is_sorted_by_drop():
    """Mean and std of the drop over folds, largest mean drop first."""
    table = pd.DataFrame(
        {
            "lead": ["I", "II", "I", "II"],
            "fold": [0, 0, 1, 1],
            "auroc_full": [0.9, 0.9, 0.8, 0.8],
            "auroc_ablated": [0.85, 0.6, 0.8, 0.5],
            "drop": [0.05, 0.3, 0.0, 0.3],
        }
    )
    out = summarise_ablation(table)
    assert list(out["lead"]) == ["II", "I"]
    assert out.loc[1, "drop_mean"] == pytest.approx(0.025)
    assert out.loc[0, "drop_std"] == pytest.approx(0.0)
    assert out.loc[0, "auroc_full_mean"] == pytest.approx(0.85)
