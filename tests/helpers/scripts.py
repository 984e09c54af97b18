"""Load a benchmark script of ``benchmarks/`` as a module (scripts are not a package), once per test session."""

import functools
import importlib.util
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@functools.cache
def load_benchmark(name: str) -> ModuleType:
    """The module of ``benchmarks/<name>.py`` (cached: the script's top level runs once)."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
