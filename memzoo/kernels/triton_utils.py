"""Triton-only helpers shared by the ``triton_*.py`` files (import this only where Triton is installed)."""

from __future__ import annotations

import os

import triton

__all__ = ["INTERPRET", "autotune_or_fixed"]

# Under TRITON_INTERPRET=1 kernels run on the CPU through NumPy: no driver, so no autotune benchmarking.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_or_fixed(configs: list[triton.Config], key: list[str], default: triton.Config):
    """``triton.autotune`` over ``configs`` on a GPU; the single ``default`` config under the interpreter.

    ``key`` must name shape/constexpr arguments only, never the sequence length.  The tuner keeps the full
    list and the default as ``all_configs`` / ``default_config`` (the ahead-of-time compile gate,
    ``memzoo.kernels.aot``, compiles every one of them even where the interpreter runs only the default).
    """
    everything = configs if any(c.all_kwargs() == default.all_kwargs() for c in configs) else [default, *configs]

    def decorate(fn):
        tuner = triton.autotune(configs=[default] if INTERPRET else configs, key=key)(fn)
        tuner.all_configs, tuner.default_config = everything, default
        return tuner

    return decorate
