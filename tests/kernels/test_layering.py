"""Dependencies point downward: the kernels never import the models (layers are built on the ops, not the reverse)."""

from __future__ import annotations

import ast
from pathlib import Path

import memzoo.kernels

KERNELS = Path(memzoo.kernels.__file__).parent


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in ``path``, relative ones resolved."""
    # The package a relative import starts from: the folder of the file (``__init__.py`` included).
    package = ".".join(path.relative_to(KERNELS.parent.parent).parent.parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.append((node.lineno, module))
            # ``from .. import models`` names the package in the alias.
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def test_kernels_never_import_models():
    files = sorted(KERNELS.rglob("*.py"))
    assert len(files) > 10
    offending = [f"{path.relative_to(KERNELS.parent.parent)}:{line} imports {module}"
                 for path in files for line, module in _imported_modules(path)
                 if module == "memzoo.models" or module.startswith("memzoo.models.")]
    assert not offending, "memzoo.kernels must not import memzoo.models:\n" + "\n".join(offending)


def test_relative_imports_are_resolved():
    # The walker itself: a relative import two levels up from an op folder names memzoo.kernels.
    modules = {module for _, module in _imported_modules(KERNELS / "gated_delta" / "__init__.py")}
    assert {"memzoo.kernels", "memzoo.kernels.utils", "memzoo.kernels.gated_delta.reference"} <= modules
