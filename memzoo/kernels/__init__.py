"""Fused kernels for the chunked recurrences, one folder per op.

Each op folder holds ``reference.py`` (plain PyTorch: a per-step recurrence that reads like the
paper, plus a chunked form that is the fast CPU path), ``triton_*.py`` (kernels -> launcher ->
``torch.autograd.Function`` -> public function) and an ``__init__.py`` that dispatches with
``resolve_impl``.  Op signatures follow flash-linear-attention so users can swap:
``(q, k, v, *gates, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None)
-> (o, final_state)`` with inputs ``[B, T, H, K]`` and an fp32 state ``[N, H, K, V]``.
"""

from __future__ import annotations

import importlib.util
import os

from torch import Tensor

__all__ = ["IMPLS", "IMPL_ENV_VAR", "check_chunk_options", "resolve_impl", "triton_available"]

IMPLS = ("auto", "triton", "ref")
# Users force a path everywhere (e.g. "ref" while debugging) without touching code.
IMPL_ENV_VAR = "MEMZOO_KERNEL_IMPL"


# Looked up once at import without importing Triton (slow), so torch.compile sees a constant.
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _HAS_TRITON


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
        return "triton" if x.is_cuda and triton_available() else "ref"
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
