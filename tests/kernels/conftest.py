"""Kernel-test fixtures: outputs the kernels allocate start as NaN, so memory a kernel forgot to
write fails loudly instead of passing as zeros or stale values."""

import sys

import pytest
import torch

_KERNEL_PACKAGE = "memzoo.kernels"


def _called_from_kernels() -> bool:
    return sys._getframe(2).f_globals.get("__name__", "").startswith(_KERNEL_PACKAGE)


@pytest.fixture(autouse=True)
def nan_poisoned_empty(monkeypatch):
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def poison(t):
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        return t

    def p_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return poison(t) if _called_from_kernels() else t

    def p_empty_like(*args, **kwargs):
        t = empty_like(*args, **kwargs)
        return poison(t) if _called_from_kernels() else t

    def p_new_empty(self, *args, **kwargs):
        t = new_empty(self, *args, **kwargs)
        return poison(t) if _called_from_kernels() else t

    monkeypatch.setattr(torch, "empty", p_empty)
    monkeypatch.setattr(torch, "empty_like", p_empty_like)
    monkeypatch.setattr(torch.Tensor, "new_empty", p_new_empty)
    yield

