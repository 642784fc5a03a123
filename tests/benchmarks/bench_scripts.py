"""Load a script of ``benchmarks/`` as a module for its tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` by file path, registered as ``memzoo_bench_<name>`` (dataclasses look their module up
    while a class is built), with ``sys.path`` restored afterwards: benchmarks/ on ``sys.path`` (scripts put it
    there) would shadow packages with its own modules, e.g. its kernels.py the ``kernels`` package transformers
    imports, breaking every later test in the same worker."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"memzoo_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module
