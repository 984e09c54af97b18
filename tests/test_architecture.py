"""The layout rules of docs/architecture.md, enforced by parsing every module of the package.

- Dependencies run one way: utils <- loaddata <- prepdata <- embed <- predict <- evaluate <- pipeline;
  interpret may use everything except pipeline; nothing in the library imports ``examples``.
- No cohort or dataset names and no absolute paths in library code (docstrings are exempt: credit goes there).
- Every public module, class and function has a docstring.
- The fusion layers and objectives import with torch alone.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kale_ext"
ORDER = ["utils", "loaddata", "prepdata", "embed", "predict", "evaluate", "pipeline"]
# Words naming a cohort or public data set: they belong in configs, the example or docstrings.
COHORT_WORDS = ["mimic", "aspire", "biobank", "ptb-xl", "ptbxl", "cinc", "physionet", "chapman", "ningbo", "georgia"]


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _stage(path: Path) -> str | None:
    rel = path.relative_to(PACKAGE).parts
    return rel[0] if len(rel) > 1 else None


def _allowed(stage: str) -> set[str]:
    if stage == "interpret":
        return set(ORDER) - {"pipeline"} | {"interpret"}
    return set(ORDER[: ORDER.index(stage) + 1])


def _imported_stages(tree: ast.AST, path: Path):
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the module's package
                base = list(path.relative_to(PACKAGE).parts[:-1])
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                names = [".".join(["kale_ext", *base, *(node.module.split(".") if node.module else [])])]
            else:
                names = [node.module or ""]
        for name in names:
            parts = name.split(".")
            if parts[0] == "examples":
                yield node.lineno, "examples"
            if parts[0] == "kale_ext" and len(parts) > 1:
                yield node.lineno, parts[1]


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_rules(path):
    """Each module respects the dependency order, names no cohort, holds no absolute path, documents its API."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    problems = []
    stage = _stage(path)
    for lineno, target in _imported_stages(tree, path):
        if target == "examples":
            problems.append(f"line {lineno}: the library must not import examples")
        elif stage in ORDER or stage == "interpret":
            if target in ORDER + ["interpret"] and target not in _allowed(stage):
                problems.append(f"line {lineno}: {stage} must not import {target} (upstream import)")
    docstrings = _docstring_nodes(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value.lower()
            for word in COHORT_WORDS:
                if word in text:
                    problems.append(f"line {node.lineno}: cohort/dataset name {word!r} in library code")
            if node.value.startswith(("/home/", "/work/", "/root/", "/data/", "/mnt/", "/scratch/", "C:\\")):
                problems.append(f"line {node.lineno}: absolute path {node.value!r}")
        if isinstance(node, ast.Name) and any(w in node.id.lower() for w in COHORT_WORDS):
            problems.append(f"line {node.lineno}: cohort/dataset name in identifier {node.id!r}")
    if ast.get_docstring(tree) is None:
        problems.append("module has no docstring")
    for node in tree.body:
        nodes = [node]
        if isinstance(node, ast.ClassDef):
            nodes += [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for item in nodes:
            if isinstance(item, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                if item.name.startswith("_"):
                    continue
                if ast.get_docstring(item) is None:
                    problems.append(f"line {item.lineno}: public {item.name!r} has no docstring")
    assert not problems, f"{path.relative_to(PACKAGE)}:\n" + "\n".join(problems)


def test_rules_catch_violations(tmp_path):
    """The checker itself can fail: an upstream import and a missing docstring are reported."""
    bad = "import kale_ext.pipeline\n\ndef f():\n    return '/home/x'\n"
    tree = ast.parse(bad)
    fake = PACKAGE / "embed" / "fake.py"
    assert ("pipeline" in [t for _, t in _imported_stages(tree, fake)]) and "pipeline" not in _allowed("embed")
    assert ast.get_docstring(tree) is None


@pytest.mark.parametrize("module", ["kale_ext.embed.fusion", "kale_ext.predict.losses"])
def test_light_imports(module):
    """Fusion layers and objectives need torch alone: no wfdb, Lightning, captum or matplotlib."""
    code = (
        f"import sys, {module}\n"
        "heavy = [m for m in ('wfdb', 'pytorch_lightning', 'lightning', 'captum', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


ROOT = PACKAGE.parent
CODE_DIRS = [PACKAGE, ROOT / "examples", ROOT / "benchmarks"]


def _module_name(path: Path) -> str:
    """Dotted name of a library module, or the bare name of a script module (imported from its own folder)."""
    if PACKAGE in path.parents or path.parent == PACKAGE:
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return path.stem


def _import_graph() -> dict[str, set[str]]:
    files = [p for d in CODE_DIRS for p in d.rglob("*.py") if "__pycache__" not in p.parts]
    names = {_module_name(p): p for p in files}
    graph = {name: set() for name in names}
    for name, path in names.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for target in targets:
                if target in names and target != name:
                    graph[name].add(target)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_in_the_library_the_examples_or_the_benchmarks():
    """Imports anywhere (function-level ones too) form no cycle."""
    cycle = _find_cycle(_import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_can_fail():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_registered_model_has_a_label_and_a_config_yaml():
    """Adding a model means a registry entry and a yaml naming it in configs/; both are checked here."""
    import yaml

    from kale_ext.embed.zoo import MODELS

    named = {}
    for path in (ROOT / "configs").glob("*.yaml"):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        name = (data.get("MODEL") or {}).get("NAME")
        if name:
            named.setdefault(name, []).append(path.name)
    missing = [name for name in MODELS if name not in named]
    assert not missing, f"registry models without a configs/*.yaml naming them: {missing}"
    unknown = sorted(set(named) - set(MODELS))
    assert not unknown, f"configs name models the registry does not have: {unknown} ({named})"
    assert all(spec.label for spec in MODELS.values())
