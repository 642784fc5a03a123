import logging
import re
import types
from pathlib import Path

import pytest
import torch
from op_table import IDS, OPS

import memzoo.kernels as kernels
from memzoo.kernels import IMPL_ENV_VAR, MIN_TRITON, resolve_impl, triton_available
from memzoo.kernels.gated_delta import chunk_gated_delta_rule
from memzoo.kernels.gla import chunk_gla, chunk_simple_gla, fused_recurrent_gla


def test_auto_on_cpu_is_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(IMPL_ENV_VAR, raising=False)
    assert resolve_impl("auto", torch.zeros(1)) == "ref"
    assert resolve_impl("ref", torch.zeros(1)) == "ref"


def test_forcing_triton_where_it_cannot_run_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="impl='triton' needs"):
        resolve_impl("triton", torch.zeros(1))


def _pretend_triton(monkeypatch, version: str) -> None:
    too_old = kernels._too_old(version)
    monkeypatch.setattr(kernels, "_TRITON_VERSION", version)
    monkeypatch.setattr(kernels, "_TRITON_TOO_OLD", too_old)
    monkeypatch.setattr(kernels, "_HAS_TRITON", not too_old)
    monkeypatch.setattr(kernels, "_warned_old", False)


def test_a_triton_older_than_the_checked_one_is_not_used(monkeypatch):
    monkeypatch.delenv(IMPL_ENV_VAR, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cuda = types.SimpleNamespace(is_cuda=True, device="cuda:0")  # all resolve_impl reads of an input
    _pretend_triton(monkeypatch, "3.4.0")
    assert not triton_available() and kernels.triton_version() == "3.4.0"
    with pytest.warns(UserWarning, match=r"triton 3\.4\.0 is older than 3\.5.*references run"):
        assert resolve_impl("auto", cuda) == "ref"
    with pytest.raises(RuntimeError, match=r"impl='triton': triton 3\.4\.0 is older than 3\.5"):
        resolve_impl("triton", torch.zeros(1))
    _pretend_triton(monkeypatch, "3.5.0")
    assert triton_available() and resolve_impl("auto", cuda) == "triton"
    assert not kernels._too_old("3.10.1+git1234") and not kernels._too_old("unknown")


def test_the_oldest_checked_triton_is_the_one_the_extra_asks_for():
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    lower = re.search(r'"triton>=(\d+)\.(\d+)', pyproject)
    assert lower is not None and (int(lower[1]), int(lower[2])) == MIN_TRITON


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_interpreter_runs_triton_on_cpu_only_when_forced(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(IMPL_ENV_VAR, raising=False)
    assert resolve_impl("triton", torch.zeros(1)) == "triton"
    assert resolve_impl("auto", torch.zeros(1)) == "ref"


def test_environment_override_and_bad_names(monkeypatch):
    monkeypatch.setenv(IMPL_ENV_VAR, "ref")
    assert resolve_impl("auto", torch.zeros(1)) == "ref"
    monkeypatch.setenv(IMPL_ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_impl("auto", torch.zeros(1)) == "triton"
    monkeypatch.setenv(IMPL_ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="MEMZOO_KERNEL_IMPL"):
        resolve_impl("auto", torch.zeros(1))
    with pytest.raises(ValueError, match="impl"):
        resolve_impl("fast", torch.zeros(1))


def test_check_chunk_options():
    from memzoo.kernels import check_chunk_options

    check_chunk_options(16, "auto")
    check_chunk_options(256, "ref", max_chunk=256)
    for bad, kw in ((8, {}), (48, {}), (512, {"max_chunk": 256})):
        with pytest.raises(ValueError, match="chunk_size must be a power of two"):
            check_chunk_options(bad, "auto", **kw)
    with pytest.raises(ValueError, match="impl must be one of"):
        check_chunk_options(64, "cuda")


# Every op goes through memzoo.kernels.dispatch: the same env override, log line, T = 0 and chunk-option rules.


@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_every_op_honours_the_environment_override(op, monkeypatch):
    monkeypatch.setenv(IMPL_ENV_VAR, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="impl='triton' needs"):
        op.run("auto", *op.inputs(5))
    monkeypatch.setenv(IMPL_ENV_VAR, "fast")
    with pytest.raises(ValueError, match="MEMZOO_KERNEL_IMPL"):
        op.run("auto", *op.inputs(5))


@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_every_op_logs_its_path_at_debug_level(op, monkeypatch, caplog):
    import memzoo.kernels as kernels

    monkeypatch.delenv(IMPL_ENV_VAR, raising=False)
    monkeypatch.setattr(kernels, "_logged", set())
    with caplog.at_level(logging.DEBUG, logger="memzoo.kernels"):
        op.run("auto", *op.inputs(5))
        op.run("auto", *op.inputs(0))
        op.run("auto", *op.inputs(5))
    lines = [r.getMessage() for r in caplog.records if r.name == "memzoo.kernels" and r.levelno == logging.DEBUG]
    # Once per (op, path): the reference on CPU, and the empty path for T = 0.
    assert [line.split(" (")[0] for line in lines if line.startswith(op.name + ":")] == [
        f"{op.name}: the ref path", f"{op.name}: the empty path"]


@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_every_op_takes_zero_tokens(op):
    inputs = [t.requires_grad_() if op.differentiable and t.is_floating_point() else t for t in op.inputs(0)]
    three, five = op.run("ref", *op.inputs(3)), op.run("ref", *op.inputs(5))
    outs = op.run("auto", *inputs)
    assert len(outs) == len(three)
    for got, a, b in zip(outs, three, five):
        # The axes that grow with T are empty, every other size and the dtype are those of a call with tokens.
        assert got.shape == tuple(0 if m != n else m for m, n in zip(a.shape, b.shape))
        assert got.dtype == a.dtype
    for i, s in zip(op.states, outs[len(outs) - len(op.states):]):
        assert torch.equal(s, inputs[i].detach()), f"state {i} must pass through"
    if op.differentiable:
        loss = sum(o.float().sum() for o in outs)
        leaves = [(i, t) for i, t in enumerate(inputs) if t.requires_grad]
        grads = torch.autograd.grad(loss, [t for _, t in leaves])
        for (i, t), gr in zip(leaves, grads):
            assert gr.shape == t.shape
            assert torch.equal(gr, torch.ones_like(t) if i in op.states else torch.zeros_like(t)), i


@pytest.mark.parametrize("op,chunk_size,match", [
    (chunk_gated_delta_rule, 48, "power of two"), (chunk_gated_delta_rule, 8, "power of two"),
    (chunk_gla, 512, "<= 256"), (chunk_simple_gla, 24, "power of two"), (fused_recurrent_gla, 8, "power of two"),
])
def test_chunk_options_are_checked_on_every_path(op, chunk_size, match):
    q = torch.randn(1, 4, 2, 8)
    gates = (-torch.rand(1, 4, 2), torch.rand(1, 4, 2)) if op is chunk_gated_delta_rule else (
        -torch.rand(1, 4, 2) if op is chunk_simple_gla else -torch.rand(1, 4, 2, 8),)
    with pytest.raises(ValueError, match=match):
        op(q, q, q, *gates, impl="ref", chunk_size=chunk_size)
