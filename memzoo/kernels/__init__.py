"""Fused kernels for the chunked recurrences, one folder per op.

Each op folder holds ``reference.py`` (plain PyTorch: a per-step recurrence that reads like the
paper, plus a chunked form that is the fast CPU path), ``triton_*.py`` (kernels -> launcher ->
``torch.library`` custom ops -> public function) and an ``__init__.py`` that dispatches with
``dispatch``: one rule for every op (path, env override, chunk option, T = 0, a debug log line).
The recurrence ops' signatures follow flash-linear-attention so users can swap:
``(q, k, v, *gates, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None)
-> (o, final_state)`` with inputs ``[B, T, H, K]`` and an fp32 state ``[N, H, K, V]``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import re
import warnings

import torch
from torch import Tensor

__all__ = ["IMPLS", "IMPL_ENV_VAR", "EMPTY", "MIN_TRITON", "check_chunk_options", "dispatch", "resolve_impl",
           "triton_available", "triton_version", "with_empty_grads"]

IMPLS = ("auto", "triton", "ref")
# Users force a path everywhere (e.g. "ref" while debugging) without touching code.
IMPL_ENV_VAR = "MEMZOO_KERNEL_IMPL"


# The path ``dispatch`` returns for a call with no tokens: the op returns empty outputs without running a kernel.
EMPTY = "empty"

_log = logging.getLogger(__name__)
_logged: set[tuple[str, str]] = set()

# The oldest Triton release the kernels are checked against: each of them compiles for sm_80 and sm_90 with it
# (``python -m memzoo.kernels.aot``).  An older Triton is not used: "auto" runs the PyTorch references and
# impl="triton" raises.  Keep in step with the ``triton`` extra in pyproject.toml (a test checks).
MIN_TRITON = (3, 5)


def _installed_triton() -> str | None:
    """The installed Triton's version from package metadata (importing Triton is slow), "unknown" when the module
    is there without metadata (a source build), None when it is not installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    for dist in ("triton", "pytorch-triton"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _too_old(version: str | None) -> bool:
    m = re.match(r"(\d+)\.(\d+)", version or "")
    return m is not None and (int(m[1]), int(m[2])) < MIN_TRITON


# Looked up once at import, so torch.compile sees constants.
_TRITON_VERSION = _installed_triton()
_TRITON_TOO_OLD = _too_old(_TRITON_VERSION)
_HAS_TRITON = _TRITON_VERSION is not None and not _TRITON_TOO_OLD
_warned_old = False


def triton_available() -> bool:
    """Whether the Triton kernels can run here: Triton is installed and not older than ``MIN_TRITON``."""
    return _HAS_TRITON


def triton_version() -> str | None:
    """The installed Triton's version (None when it is not installed), whether or not memzoo can use it."""
    return _TRITON_VERSION


def _old_triton_message() -> str:
    need = ".".join(map(str, MIN_TRITON))
    return (f"triton {_TRITON_VERSION} is older than {need}, the oldest release memzoo's kernels are checked with; "
            f"install triton>={need} (it comes with torch>=2.9)")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, x: Tensor) -> str:
    """Pick ``"triton"`` or ``"ref"`` for an op whose inputs live where ``x`` does.

    ``"auto"`` (or ``$MEMZOO_KERNEL_IMPL`` when set) picks Triton for CUDA inputs when Triton
    imports, and the reference for everything else: CPU tensors go to the reference even under
    ``TRITON_INTERPRET=1``, where only an explicit ``"triton"`` runs the interpreter (tests).
    Forcing Triton where it cannot run raises instead of silently falling back.
    """
    if impl == "auto":
        impl = os.environ.get(IMPL_ENV_VAR, "auto")
    if impl not in IMPLS:
        raise ValueError(f"impl (or ${IMPL_ENV_VAR}) must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if x.is_cuda and _TRITON_TOO_OLD:
            global _warned_old
            if not _warned_old and not torch.compiler.is_compiling():
                _warned_old = True
                warnings.warn(_old_triton_message() + "; the PyTorch references run instead (slower)", stacklevel=3)
            return "ref"
        return "triton" if x.is_cuda and triton_available() else "ref"
    if impl == "triton" and _TRITON_TOO_OLD:
        raise RuntimeError(f"impl='triton': {_old_triton_message()}")
    if impl == "triton" and not (triton_available() and (x.is_cuda or _interpreting())):
        raise RuntimeError(
            f"impl='triton' needs triton installed and CUDA inputs (or TRITON_INTERPRET=1 on CPU); "
            f"got device={x.device}, triton installed={triton_available()}"
        )
    return impl


def check_chunk_options(chunk_size: int, impl: str, *, max_chunk: int | None = None) -> None:
    """Validate a layer config's chunked-op options: ``chunk_size`` a power of two >= 16 (the
    smallest legal ``tl.dot`` tile), at most ``max_chunk`` if given, and ``impl`` one of ``IMPLS``."""
    too_big = max_chunk is not None and chunk_size > max_chunk
    if chunk_size < 16 or chunk_size & (chunk_size - 1) or too_big:
        upper = f" and <= {max_chunk}" if max_chunk is not None else ""
        raise ValueError(f"chunk_size must be a power of two >= 16{upper}, got {chunk_size}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def dispatch(op: str, impl: str, x: Tensor, *, tokens: int, chunk_size: int | None = None,
             max_chunk: int | None = None, triton: bool = True, auto_ref: bool = False) -> str:
    """The one dispatch rule of every op: ``"triton"``, ``"ref"`` or ``EMPTY`` for a call on inputs like ``x``.

    Args:
        op: the op's name, for the log line.
        impl: ``"auto"`` | ``"triton"`` | ``"ref"``; ``$MEMZOO_KERNEL_IMPL`` overrides ``"auto"`` (``resolve_impl``).
        x: an input of the call: its device decides ``"auto"``.
        tokens: the length of the sequence axis; 0 gives ``EMPTY`` (after every check), and the op returns empty
            outputs whose gradients have the inputs' shapes (``with_empty_grads``), states passed through.
        chunk_size: the op's chunk (tile) length, checked on every path, so a config that runs on the CPU
            reference also runs on the GPU: a power of two >= 16, at most ``max_chunk`` when given.
        triton: False when no Triton kernel covers these inputs: the reference runs whatever ``impl`` says.
        auto_ref: the kernel covers these inputs only when forced: ``"auto"`` takes the reference.

    The choice is logged once per (op, path) at DEBUG level on the ``memzoo.kernels`` logger (not while
    torch.compile traces: logging would break the graph; the eager call before compiling logs it).
    """
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be an int, got {chunk_size!r}")
        check_chunk_options(chunk_size, impl, max_chunk=max_chunk)
    path = resolve_impl(impl, x)
    if not triton or (auto_ref and impl == "auto"):
        path = "ref"
    if tokens == 0:
        path = EMPTY
    if not torch.compiler.is_compiling() and (op, path) not in _logged:
        _logged.add((op, path))
        _log.debug("%s: the %s path (impl=%r, %s inputs)", op, path, impl, x.device.type)
    return path


def with_empty_grads(out: Tensor, *inputs: Tensor | None) -> Tensor:
    """``out``, a fresh tensor, tied to ``inputs`` through an empty slice of each: the value is unchanged and
    backward gives every input that requires grad a zero gradient of its own shape instead of none.  Used by
    the ops' T = 0 paths."""
    for t in inputs:
        if isinstance(t, Tensor) and t.requires_grad:
            out = out + t.flatten()[:0].sum().to(out.dtype)
    return out
