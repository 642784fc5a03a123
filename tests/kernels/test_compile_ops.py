"""torch.compile(fullgraph=True) traces every op through its dispatcher, forward and backward, without a graph
break: the reference paths, and the Triton paths as torch.library custom ops (under TRITON_INTERPRET=1 on CPU)."""

import os

import pytest
import torch
from op_table import IDS, OPS

from memzoo.kernels import IMPL_ENV_VAR
from memzoo.testing import assert_close

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()


def _compare(op, impl: str, backward: bool, tokens: int) -> None:
    torch._dynamo.reset()
    inputs = op.inputs(tokens)

    def fn(*xs):
        return op.run(impl, *xs)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=False)
    results = []
    for f in (fn, compiled):
        xs = [t.clone().requires_grad_(backward and t.is_floating_point()) for t in inputs]
        outs = f(*xs)
        leaves = [t for t in xs if t.requires_grad]
        grads = torch.autograd.grad(sum(o.float().sum() for o in outs), leaves) if backward else ()
        results.append((outs, grads))
    (eager, eager_grads), (got, got_grads) = results
    for i, (a, b) in enumerate(zip(got, eager)):
        if a.is_floating_point():
            assert_close(a, b, 1e-5, f"{op.name} output {i}")
        else:
            assert torch.equal(a, b), f"{op.name} output {i}"
    for i, (a, b) in enumerate(zip(got_grads, eager_grads)):
        assert_close(a, b, 1e-5, f"{op.name} grad {i}")


@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_reference_path_compiles_fullgraph(op, monkeypatch, one_thread):
    monkeypatch.delenv(IMPL_ENV_VAR, raising=False)
    # Few tokens: the per-token reference loops unroll into the graph, and what is checked is the dispatch around them.
    _compare(op, "ref", op.differentiable, tokens=5)


TRITON_OPS = [op for op in OPS if op.name not in ("titans_mlp",)]


@pytest.mark.skipif(not INTERPRET, reason="the Triton path on CPU tensors needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("op", TRITON_OPS, ids=[op.name for op in TRITON_OPS])
def test_triton_path_compiles_fullgraph(op, monkeypatch, one_thread):
    monkeypatch.delenv(IMPL_ENV_VAR, raising=False)
    # Past one chunk of 16: the custom ops' varlen and multi-chunk paths.
    _compare(op, "triton", op.differentiable and op.triton_backward, tokens=20)
