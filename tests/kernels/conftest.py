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



@pytest.fixture
def gpu_like_dots(monkeypatch):
    """Make the interpreter's ``tl.dot`` round like the GPU's: bf16 operands (stored as uint16, which NumPy would
    multiply as integers) are widened exactly to fp32, and the fp32 operands of a TF32 dot are rounded to TF32's
    10-bit mantissa, so the TF32 and bf16 error bounds are measured under ``TRITON_INTERPRET=1`` too."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot

    def widen(x, precision):
        if x.dtype == tl.bfloat16:
            data = interpreter._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)
        if x.dtype == tl.float32 and str(precision).endswith(".TF32"):
            return interpreter.TensorHandle(interpreter._round_f32_to_tf32(x.data), tl.float32)
        return x

    def gpu_like(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, widen(a, input_precision), widen(b, input_precision), d, input_precision,
                          max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", gpu_like)
    yield
