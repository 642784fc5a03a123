"""benchmarks/gpu_check.py's verdicts on fake ops (no Triton): a correct op passes; an unwritten element, a result
that moves between two runs on the same inputs, and a wrong result each fail."""

from __future__ import annotations

import pytest
import torch
from bench_scripts import load_benchmark


@pytest.fixture(scope="module")
def gpu_check():
    return load_benchmark("gpu_check")


# A fake "kernel" module: the poisoning wraps allocations made from modules of memzoo.kernels only.
_FAKE_KERNEL = '''
import torch
calls = [0]
def double(x, fault):
    y = torch.empty_like(x)
    n = x.numel() - 1 if fault == "unwritten" else x.numel()
    y.view(-1)[:n] = 2 * x.reshape(-1)[:n]
    calls[0] += 1
    if fault == "race" and calls[0] % 2 == 0:
        y.view(-1)[0] += 1e-3
    if fault == "wrong":
        y = y * 1.1
    return y
'''


def _fake_case(gpu_check, fault):
    namespace = {"__name__": "memzoo.kernels.fake"}
    exec(compile(_FAKE_KERNEL, "<fake kernel>", "exec"), namespace)

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, impl):
            return 2 * x if impl == "ref" else namespace["double"](x, fault)

        @staticmethod
        def backward(ctx, dy):
            return 2 * dy, None

    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return gpu_check.Case("fake", fault, lambda impl, x: (Double.apply(x, impl),), [x], n_low=1)


@pytest.mark.parametrize("fault,status,what", [
    ("none", "PASS", None),
    ("unwritten", "FAIL", "nonfinite"),
    ("race", "FAIL", "run_diff"),
    ("wrong", "FAIL", "err"),
])
def test_verdicts(gpu_check, fault, status, what):
    r = gpu_check.check(_fake_case(gpu_check, fault), "fp32", 5, "cpu", seed=3)
    assert r.status == status, r
    assert set(r.errors) == {"out0", "d_in0"}
    if what == "nonfinite":
        assert r.nonfinite == 1 and r.run_diff == 0.0   # NaN in both runs is no difference
    elif what == "run_diff":
        assert r.run_diff == pytest.approx(1e-3, rel=1e-3) and r.nonfinite == 0
    elif what == "err":
        assert r.err > r.tol and r.run_diff == 0.0
    else:
        assert r.err < 1e-6 and r.run_diff == 0.0 and r.nonfinite == 0


def test_poisoning_covers_every_allocator_and_is_undone(gpu_check):
    saved = torch.empty, torch.empty_like, torch.Tensor.new_empty
    namespace = {"__name__": "memzoo.kernels.fake", "torch": torch}
    with gpu_check.nan_poisoned_allocations():
        exec("t = torch.empty(4); u = torch.empty_like(t); w = t.new_empty(2); i = torch.empty(3, dtype=torch.int64)",
             namespace)
    assert all(bool(torch.isnan(namespace[n]).all()) for n in "tuw")
    assert namespace["i"].shape == (3,)   # integer tensors are left alone (no NaN to write)
    assert (torch.empty, torch.empty_like, torch.Tensor.new_empty) == saved
