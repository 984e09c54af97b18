"""Evaluation outputs: metrics.json schema, predictions.csv, result tables and the ROC figure."""

import json

import numpy as np
import pandas as pd
import pytest

from kale_ext.evaluate.cross_validation import fold_split, make_folds
from kale_ext.evaluate.metrics import binary_metrics
from kale_ext.evaluate.reports import (
    SYNTHETIC_WARNING,
    plot_roc,
    predictions_frame,
    results_row,
    summary_with_ci,
    write_metrics_json,
    write_predictions_csv,
    write_results_table,
)


@pytest.fixture
def oof():
    """Out-of-fold predictions of an informative classifier on 100 subjects, 5 folds."""
    rng = np.random.default_rng(0)
    y = (rng.random(100) < 0.35).astype(int)
    prob = 1 / (1 + np.exp(-(rng.normal(size=100) + 1.5 * (2 * y - 1))))
    folds = make_folds(y, n_splits=5, seed=42)
    fold_metrics = [binary_metrics(y[fold_split(folds, k)[1]], prob[fold_split(folds, k)[1]]) for k in range(5)]
    return y, prob, folds, fold_metrics


def test_metrics_json_schema(tmp_path, oof):
    y, prob, folds, fold_metrics = oof
    summary = summary_with_ci(fold_metrics, y, prob, 0.5, n_boot=100, seed=0)
    path = write_metrics_json(
        tmp_path / "out" / "metrics.json",
        synthetic=True,
        task="ph_detection",
        method="lsemvae",
        leads=("I", "II", "III", "aVR", "aVL", "aVF"),
        folds=fold_metrics,
        summary=summary,
        note="synthetic pipeline check",
    )
    data = json.loads(path.read_text())
    assert list(data) == ["synthetic", "task", "method", "leads", "folds", "summary", "note"]
    assert data["synthetic"] is True and data["task"] == "ph_detection" and data["method"] == "lsemvae"
    assert data["leads"] == ["I", "II", "III", "aVR", "aVL", "aVF"]
    assert len(data["folds"]) == 5 and {"accuracy", "auroc", "mcc"} <= set(data["folds"][0])
    for metric in ("accuracy", "auroc", "mcc", "sensitivity", "specificity", "f1"):
        entry = data["summary"][metric]
        assert set(entry) == {"mean", "std", "ci95", "pooled"}
        assert entry["pooled"] == pytest.approx(binary_metrics(y, prob)[metric])  # of the pooled predictions
        values = [f[metric] for f in fold_metrics]
        assert entry["mean"] == pytest.approx(np.mean(values)) and entry["std"] == pytest.approx(np.std(values))
        lo, hi = entry["ci95"]
        assert lo <= hi
    point = binary_metrics(y, prob)["auroc"]
    assert data["summary"]["auroc"]["ci95"][0] <= point <= data["summary"]["auroc"]["ci95"][1]


def test_headline_is_the_pooled_auroc_with_its_interval_and_cohort(oof):
    from kale_ext.evaluate.reports import HEADLINE_AUROC_NAME, format_headline, headline_auroc

    y, prob, folds, fold_metrics = oof
    summary = summary_with_ci(fold_metrics, y, prob, 0.5, n_boot=50, seed=0)
    head = headline_auroc(summary, y)
    assert head["name"] == HEADLINE_AUROC_NAME and head["value"] == pytest.approx(binary_metrics(y, prob)["auroc"])
    assert head["fold_mean"] == summary["auroc"]["mean"] != head["value"]
    assert (head["n"], head["n_positive"]) == (len(y), int(np.sum(y)))
    line = format_headline(head)
    assert line.startswith(f"{HEADLINE_AUROC_NAME} {head['value']:.3f} (95% CI {head['ci95'][0]:.3f}-")
    assert f"{head['n_positive']} positive / {head['n_negative']} negative" in line
    with pytest.raises(ValueError, match="summary_with_ci"):
        headline_auroc({"auroc": {"mean": 0.5, "std": 0.1, "ci95": [0.4, 0.6]}}, y)


def test_metrics_json_writes_nan_as_null_and_refuses_bad_summaries(tmp_path):
    summary = {"auroc": {"mean": float("nan"), "std": np.float64(0.1), "ci95": [np.float32(0.2), 0.3]}}
    path = write_metrics_json(
        tmp_path / "m.json", synthetic=False, task="t", method="m", leads=["I"], folds=[{"auroc": 0.5}], summary=summary
    )
    data = json.loads(path.read_text())
    assert data["summary"]["auroc"]["mean"] is None and data["synthetic"] is False
    with pytest.raises(ValueError, match="summary_with_ci"):
        write_metrics_json(
            tmp_path / "x.json",
            synthetic=True,
            task="t",
            method="m",
            leads=[],
            folds=[],
            summary={"auroc": {"mean": 0.5}},
        )


def test_predictions_csv_one_row_per_subject(tmp_path, oof):
    y, prob, folds, _ = oof
    thresholds = np.array([0.4, 0.5, 0.5, 0.6, 0.5])[folds]
    df = predictions_frame(
        [f"s{i}" for i in range(100)], y, prob, folds, thresholds, record_ids=[f"r{i}" for i in range(100)]
    )
    path = write_predictions_csv(tmp_path / "predictions.csv", df)
    back = pd.read_csv(path)
    assert list(back.columns[:7]) == [
        "subject_id",
        "record_id",
        "label",
        "probability",
        "fold",
        "threshold",
        "prediction",
    ]
    assert len(back) == 100 and back["subject_id"].is_unique
    np.testing.assert_array_equal(back["prediction"], (prob >= thresholds).astype(int))
    np.testing.assert_allclose(back["probability"], prob)
    np.testing.assert_array_equal(back["fold"], folds)
    with pytest.raises(ValueError, match="several rows"):
        write_predictions_csv(tmp_path / "p.csv", pd.concat([df, df.iloc[:1]]))
    with pytest.raises(ValueError, match="lacks columns"):
        write_predictions_csv(tmp_path / "p.csv", df.drop(columns=["fold"]))


def _summary(acc, auc, mcc):
    return {
        "accuracy": {"mean": acc, "std": 0.01, "ci95": [acc - 0.02, acc + 0.02]},
        "auroc": {"mean": auc, "std": 0.02, "ci95": [auc - 0.03, auc + 0.03]},
        "mcc": {"mean": mcc, "std": 0.05, "ci95": [mcc - 0.1, mcc + 0.1]},
    }


def test_results_table_rows_columns_and_synthetic_warning(tmp_path):
    six = ("I", "II", "III", "aVR", "aVL", "aVF")
    rows = [
        results_row("LS-EMVAE", six, _summary(0.815, 0.814, 0.412)),
        results_row("ResNet1d", "6L", _summary(0.75, 0.763, 0.242)),
        results_row("LS-EMVAE", [f"L{i}" for i in range(12)], _summary(0.83, 0.852, 0.45)),
    ]
    assert rows[0]["leads"] == "6L" and rows[2]["leads"] == "12L"
    assert rows[0]["auroc_ci95_lo"] == pytest.approx(0.784)
    md, csv = write_results_table(rows, tmp_path / "results.md", tmp_path / "results.csv", "Task 1", synthetic=True)
    lines = md.read_text().splitlines()
    assert lines[0] == SYNTHETIC_WARNING and "not clinical results" in lines[0]
    header = next(line for line in lines if line.startswith("| Method"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "Method",
        "6L Accuracy",
        "6L AUROC",
        "6L MCC",
        "12L Accuracy",
        "12L AUROC",
        "12L MCC",
    ]
    body = [line for line in lines if line.startswith("| LS-EMVAE") or line.startswith("| ResNet1d")]
    assert len(body) == 2
    assert "0.814 +- 0.020" in body[0] and "0.852 +- 0.020" in body[0]
    assert body[1].rstrip(" |").endswith("n/a")  # ResNet1d was not run with 12 leads
    table = pd.read_csv(csv)
    assert len(table) == 3 and table["synthetic"].all()
    assert set(table["method"]) == {"LS-EMVAE", "ResNet1d"}

    md2, _ = write_results_table(rows[:1], tmp_path / "r2.md", tmp_path / "r2.csv", "Task 1", synthetic=False)
    assert "not clinical results" not in md2.read_text() and md2.read_text().startswith("## Task 1")


def test_roc_png_is_written_and_non_trivial(tmp_path, oof):
    import matplotlib.image

    y, prob, folds, _ = oof
    path = plot_roc(y, prob, folds, tmp_path / "roc.png", title="PH detection (synthetic)")
    assert path.stat().st_size > 10_000
    image = matplotlib.image.imread(path)
    assert image.shape[0] >= 400 and image.shape[1] >= 400
    rgb = image[..., :3]
    assert rgb.std() > 0.05  # curves and text, not a blank canvas
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 20  # several colours: per-fold curves


def test_predictions_and_tables_are_written_atomically(tmp_path, monkeypatch):
    """A write that dies half way (disk full, kill) leaves the previous file whole, not a truncated one."""
    from kale_ext.evaluate.reports import predictions_frame, write_predictions_csv

    y = np.array([0, 1, 0, 1])
    table = predictions_frame(["a", "b", "c", "d"], y, np.array([0.1, 0.9, 0.2, 0.8]), np.array([1, 1, 2, 2]), 0.5)
    path = write_predictions_csv(tmp_path / "predictions.csv", table)
    before = path.read_bytes()
    real = pd.DataFrame.to_csv

    def dies_half_way(self, target, *args, **kwargs):
        real(self.head(1), target, *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", dies_half_way)
    with pytest.raises(OSError):
        write_predictions_csv(path, table)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.csv"]  # no temporary file left behind
