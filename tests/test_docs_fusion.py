"""The reuse snippet of docs/fusion.md runs exactly as written."""

import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "fusion.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_docs_fusion_snippet_runs(capsys):
    blocks = _python_blocks(DOC.read_text(encoding="utf-8"))
    assert blocks, "docs/fusion.md lost its ```python example"
    namespace = {"__name__": "docs_fusion_snippet"}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)
    # the snippet trained through the fusion layer and respected the missing modalities
    out, mask = namespace["out"], namespace["mask"]
    assert out.weights.shape == (mask.shape[0] + 1, mask.shape[1])
    assert (out.weights[:-1][~mask] == 0).all()
    assert torch.isfinite(namespace["loss"])
    assert torch.isfinite(namespace["balance"]) and namespace["balance"] >= 0  # the gate balance losses ran
    assert "fused posterior" in capsys.readouterr().out


def test_block_extraction_finds_only_python_blocks():
    text = "intro\n```\nnot python\n```\n```python\nx = 1\n```\nmid\n```python\ny = 2\n```\n"
    assert _python_blocks(text) == ["x = 1\n", "y = 2\n"]
