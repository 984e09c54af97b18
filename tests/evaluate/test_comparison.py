"""Tests of kale_ext.evaluate.comparison: the Table-2 layout, ablation findings and the Fig.-2 figure."""

import pandas as pd

from kale_ext.evaluate.comparison import ablation_findings, plot_ablation, table2_markdown, write_table2


def _row(method, leads, auroc, std=0.02, block="Multimodal", pretrained=True, task="ph"):
    return {"task": task, "block": block, "method": method, "pretrained": pretrained, "leads": leads,
            "accuracy_mean": 0.7, "accuracy_std": 0.01, "auroc_mean": auroc, "auroc_std": std, "mcc_mean": 0.3,
            "mcc_std": 0.05}  # fmt: skip


ROWS = [
    _row("ResNet1d", "12L", 0.80, block="Unimodal", pretrained=False),
    _row("ResNet1d", "6L", 0.75, block="Unimodal", pretrained=False),
    {
        "task": "ph",
        "block": "Unimodal",
        "method": "beta-VAE",
        "pretrained": True,
        "leads": "6L",
        "note": "12 leads only",
    },
    _row("beta-VAE", "12L", 0.70, block="Unimodal"),
    _row("LS-EMVAE", "12L", 0.85),
    _row("LS-EMVAE", "6L", 0.81),
    _row("LS-EMVAE w/o PoE", "12L", 0.84),
    _row("LS-EMVAE w/o PoE", "6L", 0.70, std=0.03),
]


def test_table_has_blocks_pretraining_marks_and_a_dash_with_its_reason():
    lines = table2_markdown(ROWS, "ph")
    text = "\n".join(lines)
    assert lines[2].startswith("| Method | Pre-training | 12L Acc | 12L AUROC | 12L MCC | 6L Acc")
    assert text.index("*Unimodal*") < text.index("ResNet1d") < text.index("*Multimodal*") < text.index("| LS-EMVAE |")
    resnet = next(line for line in lines if line.startswith("| ResNet1d"))
    assert "| × |" in resnet and "0.800 ± 0.020" in resnet and "0.750 ± 0.020" in resnet
    beta = next(line for line in lines if line.startswith("| beta-VAE"))
    assert "| ✓ |" in beta and beta.count("–") == 3
    assert "- beta-VAE, 6L: – = 12 leads only" in text


def test_ablation_findings_compare_the_difference_with_the_fold_std():
    lines = ablation_findings(ROWS, "LS-EMVAE", ["LS-EMVAE w/o PoE"])
    assert len(lines) == 2
    twelve = next(line for line in lines if "12L" in line)
    six = next(line for line in lines if "6L" in line)
    assert "does not exceed" in twelve and "(Δ -0.010)" in twelve
    assert "exceeds the fold std (0.030)" in six and "does not" not in six


def test_writers_produce_files_that_say_synthetic(tmp_path):
    md, csv = write_table2(ROWS, tmp_path / "t.md", tmp_path / "t.csv", "Table 2", synthetic=True, extra_lines=["x"])
    assert "SYNTHETIC DATA" in md.read_text() and md.read_text().rstrip().endswith("x")
    frame = pd.read_csv(csv)
    assert len(frame) == len(ROWS) and frame["synthetic"].all()
    png = plot_ablation(ROWS, ["LS-EMVAE", "LS-EMVAE w/o PoE"], tmp_path / "fig.png", "synthetic")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_pooled_auroc_column_when_the_cells_carry_the_headline():
    from kale_ext.evaluate.comparison import table2_markdown

    row = {"task": "ph", "block": "Multimodal", "method": "M", "pretrained": True, "leads": "6L",
           "accuracy_mean": 0.7, "accuracy_std": 0.1, "auroc_mean": 0.75, "auroc_std": 0.05, "mcc_mean": 0.3,
           "mcc_std": 0.1}  # fmt: skip
    plain = table2_markdown([row], "ph", settings=("6L",))
    assert "pooled" not in plain[2]
    lines = table2_markdown([{**row, "auroc_pooled": 0.726, "auroc_ci95_lo": 0.668, "auroc_ci95_hi": 0.781}], "ph",
                            settings=("6L",))  # fmt: skip
    assert lines[2].endswith("| 6L pooled AUROC [95% CI] |")
    assert "| 0.726 [0.668, 0.781] |" in "\n".join(lines)
    assert any(line.startswith("pooled AUROC: the runs' headline") for line in lines)
