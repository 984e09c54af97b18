"""Every ```python block of README.md and docs/*.md runs as written.

A block that cannot run here (it needs real data, a GPU or a long job) carries the marker line
``<!-- snippet-skip: REASON -->`` right above its fence; the test then skips it with that reason, so the skip and
its cause show in the test report instead of the block silently going stale. Blocks run in a fresh namespace with
an empty temporary folder as the working directory (relative paths such as ``out/cache`` land there).
"""

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Documents whose blocks a dedicated test runs (with checks of their results); not run twice.
DEDICATED = {"fusion.md": "tests/test_docs_fusion.py"}
BLOCK = re.compile(r"(?:^<!-- snippet-skip: (?P<skip>.*?) -->\n)?^```python\n(?P<code>.*?)^```", flags=re.S | re.M)


def python_blocks(text: str) -> list[tuple[str, str | None]]:
    """``(code, skip reason or None)`` of each ```python block of a Markdown text, in order."""
    return [(m.group("code"), m.group("skip")) for m in BLOCK.finditer(text)]


def _cases():
    for doc in DOCS:
        for i, (code, skip) in enumerate(python_blocks(doc.read_text(encoding="utf-8"))):
            yield pytest.param(doc, code, skip, id=f"{doc.relative_to(ROOT)}#{i + 1}")


CASES = list(_cases())


def test_the_docs_have_python_blocks():
    names = {case.values[0].name for case in CASES}
    assert {"README.md", "fusion.md", "data.md"} <= names


@pytest.mark.parametrize("doc,code,skip", CASES)
def test_snippet_runs_as_written(doc, code, skip, tmp_path, monkeypatch):
    if skip:
        pytest.skip(f"{doc.name}: {skip}")
    if doc.name in DEDICATED:
        pytest.skip(f"{doc.name} runs in {DEDICATED[doc.name]}")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = {"__name__": f"doc_snippet_{doc.stem}"}
    exec(compile(code, str(doc), "exec"), namespace)  # noqa: S102 - the point is to run the documented code


def test_readme_model_snippet_gives_the_documented_shapes(tmp_path, monkeypatch):
    readme = python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    code = next(code for code, _ in readme if "LSEMVAE(" in code)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    x, mask, out = namespace["x"], namespace["lead_mask"], namespace["out"]
    assert out.recon.shape == x.shape and mask.dtype == torch.bool
    assert torch.isfinite(out.recon).all()


def test_block_parser_reads_the_skip_marker():
    text = (
        "intro\n```python\nx = 1\n```\n<!-- snippet-skip: needs ../shared/data/ecg -->\n```python\ny = 2\n```\n"
        "```bash\nls\n```\n"
    )
    assert python_blocks(text) == [("x = 1\n", None), ("y = 2\n", "needs ../shared/data/ecg")]
