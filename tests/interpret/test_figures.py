"""The interpretation figures are written as readable PNGs of sensible size."""

import numpy as np
import pandas as pd
import pytest

from kale_ext.interpret.figures import (
    plot_attribution_ecg,
    plot_gate_weights,
    plot_lead_ablation,
    plot_lead_importance,
    plot_wave_attribution,
)

LEADS = ("I", "II", "III", "aVR", "aVL", "aVF")


def _png_shape(path):
    import matplotlib.image

    return matplotlib.image.imread(str(path)).shape


def test_attribution_ecg_figure(tmp_path):
    """One row per lead, wider than tall per row, with an absent lead drawn as such."""
    rng = np.random.default_rng(0)
    t = np.arange(1000) / 100
    signals = np.sin(2 * np.pi * 1.2 * t)[None] * np.linspace(0.5, 1.0, 6)[:, None] + rng.normal(0, 0.05, (6, 1000))
    attr = rng.normal(0, 0.1, (6, 1000))
    attr[1, 300:340] = 3.0
    mask = np.array([True, True, True, True, True, False])
    path = plot_attribution_ecg(
        signals,
        attr,
        LEADS,
        100,
        tmp_path / "sub" / "subject.png",
        title="subject 7 | label 1 | P(1) = 0.91",
        mask=mask,
        smooth=3,
        ratios=np.array([0.01, 0.2, 0.0, 0.0, 0.0, np.nan]),
    )
    assert path.exists()
    height, width = _png_shape(path)[:2]
    assert 900 <= width <= 2000
    assert 500 <= height <= 1500


def test_bar_charts(tmp_path):
    """Lead importance (per class, error bars), ablation, gate weights and wave shares all render."""
    importance = pd.DataFrame(
        {
            "lead": [*LEADS, *LEADS],
            "class": [0] * 6 + [1] * 6,
            "share_mean": np.r_[np.full(6, 1 / 6), [0.1, 0.5, 0.1, 0.1, 0.1, 0.1]],
            "share_std": np.full(12, 0.02),
        }
    )
    ablation = pd.DataFrame(
        {
            "lead": LEADS,
            "drop_mean": [0.0, 0.3, 0.01, -0.01, 0.0, 0.02],
            "drop_std": np.full(6, 0.01),
            "auroc_full_mean": np.full(6, 0.9),
        }
    )
    gates = pd.DataFrame(
        {
            "expert": [*LEADS, "shared (PoE)"],
            "class": ["all"] * 7,
            "gate": ["learned"] * 7,
            "weight_mean": np.full(7, 1 / 7),
            "weight_std": np.zeros(7),
        }
    )
    waves = pd.DataFrame({"lead": LEADS, "share_P": 0.2, "share_QRS": 0.3, "share_T": 0.3, "share_other": 0.2})
    paths = [
        plot_lead_importance(importance, tmp_path / "importance.png"),
        plot_lead_ablation(ablation, tmp_path / "ablation.png"),
        plot_gate_weights(gates, tmp_path / "gates.png"),
        plot_wave_attribution(waves, tmp_path / "waves.png"),
    ]
    for path in paths:
        height, width = _png_shape(path)[:2]
        assert 400 <= width <= 1600, path.name
        assert 250 <= height <= 900, path.name


def test_importance_requires_its_columns(tmp_path):
    """A table without the summary columns is refused (not silently drawn empty)."""
    with pytest.raises(KeyError):
        plot_lead_importance(pd.DataFrame({"lead": ["I"], "class": [0]}), tmp_path / "x.png")


def test_class_names_caveat_and_wrapped_titles(tmp_path):
    from kale_ext.interpret.figures import _class_label, wrap_title

    names = {0: "no LVH", 1: "LVH"}
    assert [_class_label(v, names) for v in (0, "1", "all")] == ["no LVH", "LVH", "all"]
    assert _class_label(1, None) == "1"
    title = "LVH: attribution by wave window (template windows around R peaks) [synthetic data]"
    wrapped = wrap_title(title, 5.0)
    assert wrapped.replace("\n", " ") == title and max(len(line) for line in wrapped.split("\n")) <= 65
    importance = pd.DataFrame(
        {"lead": [*LEADS, *LEADS], "class": [0] * 6 + [1] * 6, "share_mean": 1 / 6, "share_std": 0.01}
    )
    plain = plot_lead_importance(importance, tmp_path / "plain.png")
    named = plot_lead_importance(importance, tmp_path / "named.png", class_names=names, caveat="Caveat: chance")
    assert _png_shape(named)[0] > _png_shape(plain)[0]  # the caveat line adds height under the axes
