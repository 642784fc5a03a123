"""Old public names kept for one release: a module ``__getattr__`` that warns and returns the new object."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any


def renamed_attributes(module: str, namespace: dict[str, Any], renamed: dict[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``module``: ``old`` in ``renamed`` warns (DeprecationWarning) and returns
    ``namespace[renamed[old]]``; any other missing name is an ``AttributeError``."""

    def __getattr__(name: str) -> Any:
        if name in renamed:
            warnings.warn(f"{module}.{name} is now {renamed[name]}; the old name will be removed in the next release",
                          DeprecationWarning, stacklevel=2)
            return namespace[renamed[name]]
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
