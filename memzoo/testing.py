"""Comparison helpers shared by memzoo's tests and by users checking their own mixers."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .models.state import state_leaves

__all__ = ["rel_rms", "assert_close", "assert_states_close"]


def rel_rms(actual: Tensor, expected: Tensor) -> float:
    """Relative RMS error ``rms(actual - expected) / rms(expected)``, in float64."""
    a, b = actual.detach().double(), expected.detach().double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-12))


def assert_close(actual: Tensor, expected: Tensor, tol: float, what: str = "tensor") -> None:
    """Same shape, all finite, and relative RMS error below ``tol``."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if actual.is_floating_point():
        if not torch.isfinite(actual).all():
            raise AssertionError(f"{what}: non-finite values")
        err = rel_rms(actual, expected)
        if err > tol:
            raise AssertionError(f"{what}: relative RMS error {err:.3e} > {tol:.1e}")
    elif not torch.equal(actual, expected):
        raise AssertionError(f"{what}: integer tensors differ")


def assert_states_close(actual: Any, expected: Any, tol: float, what: str = "state") -> None:
    """Leaf-by-leaf ``assert_close`` over two states of the same structure."""
    a, b = state_leaves(actual), state_leaves(expected)
    if len(a) != len(b):
        raise AssertionError(f"{what}: {len(a)} leaves != expected {len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        assert_close(x, y.to(x.dtype) if y.is_floating_point() else y, tol, f"{what} leaf {i}")
