"""Gated delta rule ops: the step reference against a float64 oracle written from the equation, the chunked
reference and the Triton kernels (interpreter on CPU) against the step reference, varlen, and bad inputs."""

import pytest
import torch
import torch.nn.functional as F

from memzoo.kernels import triton_available
from memzoo.kernels.gated_delta import (
    chunk_gated_delta_rule,
    chunk_gated_delta_rule_ref,
    fused_recurrent_gated_delta_rule,
    gated_delta_rule_step_ref,
)
from memzoo.testing import assert_close, rel_rms

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not installed")

# Relative-RMS bounds against the float64 reference (issue 20): exact fp32 dots 1e-5, TF32 5e-3, fp16 fla's GDN
# bounds, bf16 2e-2.
_HALF = {"o": 5e-3, "ht": 5e-3, "dq": 8e-3, "dk": 8e-3, "dv": 8e-3, "dh0": 8e-3, "dg": 2e-2, "dbeta": 2e-2}
TOL = {
    "f32-ieee": dict.fromkeys(_HALF, 1e-5),
    "f32-tf32": dict.fromkeys(_HALF, 5e-3),
    "f16": _HALF,
    "bf16": dict.fromkeys(_HALF, 2e-2),
}
# (dtype, dot precision) of each tolerance row.
PRECISIONS = {"f32-ieee": (torch.float32, "ieee"), "f32-tf32": (torch.float32, "tf32"),
              "f16": (torch.float16, "tf32"), "bf16": (torch.bfloat16, "tf32")}
NAMES = ("o", "ht", "dq", "dk", "dv", "dg", "dbeta", "dh0")


def check(actual, expected, tol, what):
    """Spec section 10: relative RMS below ``tol``, waived when the largest absolute difference is <= 1e-6 (a
    gradient that is ~0 everywhere, e.g. under extreme decay, has no meaningful relative error)."""
    assert actual.shape == expected.shape and torch.isfinite(actual).all(), what
    if (actual.double() - expected.double()).abs().max() > 1e-6:
        assert_close(actual, expected, tol, what)


def make_inputs(B, T, H, K, V, *, gate="normal", dtype=torch.float32, device="cpu", h0=True, normalize_k=True):
    """Seeded inputs; ``gate`` is "normal" (logsigmoid, mostly near 0), "strong" (about -5), "zero" (exactly 0)."""
    gen = torch.Generator().manual_seed(1234 + 7 * T + H + K)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    if normalize_k:
        k = F.normalize(k, dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    if gate == "normal":
        g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + 2.0)
    elif gate == "strong":
        g = -5.0 + 0.5 * torch.randn(B, T, H, generator=gen).clamp(-2, 2)
    else:
        g = torch.zeros(B, T, H)
    beta = torch.rand(B, T, H, generator=gen) * 0.98 + 0.01
    state = torch.randn(B, H, K, V, generator=gen) if h0 else None
    ins = [x.to(device=device, dtype=dtype) for x in (q, k, v, g, beta)]
    return ins, (state.to(device) if h0 else None)


def run(fn, ins, h0, do, dht, **kw):
    """o, final state and the gradient of every input under sum(o * do) + sum(ht * dht)."""
    leaves = [x.detach().clone().requires_grad_() for x in ins]
    h0_leaf = h0.detach().clone().requires_grad_() if h0 is not None else None
    o, ht = fn(*leaves, initial_state=h0_leaf, output_final_state=True, **kw)
    loss = (o.float() * do.float()).sum() + (ht * dht).sum()
    # An empty sequence does not use its (empty) inputs: their gradients are empty zeros, not an error.
    grads = torch.autograd.grad(loss, leaves + ([h0_leaf] if h0_leaf is not None else []), allow_unused=True,
                                materialize_grads=True)
    out = [o.detach(), ht.detach(), *grads]
    return out if h0 is not None else out + [None]


def oracle(q, k, v, g, beta, scale, h0):
    """float64 loop over batch, head and time, straight from S_t = a S + b k (v - a S^T k)^T, o = scale S^T q."""
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    B, T, H, K = q.shape
    V = v.shape[-1]
    o = torch.zeros(B, T, H, V, dtype=torch.float64)
    hs = torch.zeros(B, H, K, V, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            S = h0[b, h].double().clone() if h0 is not None else torch.zeros(K, V, dtype=torch.float64)
            for t in range(T):
                a = torch.exp(g[b, t, h])
                S = a * S + beta[b, t, h] * torch.outer(k[b, t, h], v[b, t, h] - a * (S.T @ k[b, t, h]))
                o[b, t, h] = scale * (S.T @ q[b, t, h])
            hs[b, h] = S
    return o, hs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("use_h0", [False, True], ids=["no_h0", "h0"])
def test_step_reference_matches_float64_oracle(dtype, use_h0):
    ins, h0 = make_inputs(2, 7, 2, 5, 3, dtype=dtype, h0=use_h0, normalize_k=False)
    o, ht = gated_delta_rule_step_ref(*ins, scale=0.7, initial_state=h0, output_final_state=True)
    o_ref, h_ref = oracle(*ins, 0.7, h0)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert o.dtype == dtype and ht.dtype == torch.float32
    assert_close(o.double(), o_ref, tol, "o")
    assert_close(ht.double(), h_ref, max(tol, 1e-7), "ht")


def test_qk_l2norm_matches_normalising_first():
    ins, h0 = make_inputs(1, 9, 2, 8, 4, normalize_k=False)
    q, k = ins[0], ins[1]
    o, ht = gated_delta_rule_step_ref(*ins, initial_state=h0, output_final_state=True, use_qk_l2norm=True)
    qn, kn = (x / (x.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt() for x in (q, k))
    o_ref, h_ref = oracle(qn, kn, *ins[2:], 8 ** -0.5, h0)
    assert_close(o.double(), o_ref, 1e-6, "o")
    assert_close(ht.double(), h_ref, 1e-6, "ht")


# (T, H, chunk_size, gate, use_qk_l2norm, initial_state)
CHUNK_REF_CASES = [
    pytest.param(1, 1, 16, "normal", False, True, id="T1-H1-C16"),
    pytest.param(1, 2, 64, "strong", True, False, id="T1-H2-C64-strong-l2"),
    pytest.param(63, 1, 16, "normal", True, True, id="T63-H1-C16-l2"),
    pytest.param(63, 2, 64, "zero", False, True, id="T63-H2-C64-g0"),
    pytest.param(63, 2, 16, "strong", False, False, id="T63-H2-C16-strong"),
    pytest.param(100, 1, 64, "strong", True, True, id="T100-H1-C64-strong-l2"),
    pytest.param(100, 2, 16, "zero", True, False, id="T100-H2-C16-g0-l2"),
    pytest.param(100, 2, 64, "normal", False, False, id="T100-H2-C64"),
    pytest.param(100, 1, 16, "normal", False, True, id="T100-H1-C16"),
]


@pytest.mark.parametrize("T,H,chunk_size,gate,l2,use_h0", CHUNK_REF_CASES)
def test_chunk_reference_matches_step_reference(T, H, chunk_size, gate, l2, use_h0):
    ins, h0 = make_inputs(2, T, H, 16, 12, gate=gate, dtype=torch.float64, h0=use_h0, normalize_k=not l2)
    do, dht = torch.randn(2, T, H, 12, dtype=torch.float64), torch.randn(2, H, 16, 12)
    step = run(gated_delta_rule_step_ref, ins, h0, do, dht, use_qk_l2norm=l2)
    chunk = run(chunk_gated_delta_rule_ref, ins, h0, do, dht, use_qk_l2norm=l2, chunk_size=chunk_size)
    for name, a, b in zip(NAMES, chunk, step):
        if b is not None:
            assert_close(a, b, 1e-10, name)


def test_chunk_reference_survives_extreme_decay():
    # exp(G_i - G_j) for i < j would be exp(+1900) here: only masked exponents keep values and grads finite.
    ins, h0 = make_inputs(1, 64, 1, 16, 16, gate="zero")
    ins[3] = torch.full_like(ins[3], -30.0)
    do, dht = torch.randn(1, 64, 1, 16), torch.randn(1, 1, 16, 16)
    chunk = run(chunk_gated_delta_rule_ref, ins, h0, do, dht, chunk_size=64)
    step = run(gated_delta_rule_step_ref, ins, h0, do, dht)
    for name, a, b in zip(NAMES, chunk, step):
        check(a, b, 1e-5, name)


def test_dispatcher_returns_no_state_unless_asked_and_auto_is_the_reference_on_cpu():
    ins, h0 = make_inputs(1, 20, 2, 8, 8)
    o, ht = chunk_gated_delta_rule(*ins, initial_state=h0)
    assert ht is None and o.shape == (1, 20, 2, 8)
    o_ref, _ = chunk_gated_delta_rule_ref(*ins, initial_state=h0)
    assert torch.equal(o, o_ref)
    o2, ht2 = fused_recurrent_gated_delta_rule(*ins, initial_state=h0)
    assert ht2 is None
    assert_close(o2, o, 1e-5, "recurrent vs chunk")


# (B, T, K=V, chunk_size, gate, use_qk_l2norm, initial_state)
TRITON_CASES = [
    pytest.param(2, 1, 32, 16, "normal", False, True, id="B2-T1-D32"),
    pytest.param(1, 63, 32, 16, "strong", True, True, id="B1-T63-D32-C16-strong-l2"),
    pytest.param(2, 100, 32, 64, "normal", False, False, id="B2-T100-D32-C64"),
    pytest.param(1, 100, 48, 32, "zero", True, True, id="B1-T100-D48-C32-g0-l2"),
]


def _triton_vs_reference(B, T, D, chunk_size, gate, l2, use_h0, kind, device):
    """The Triton op against the float64 chunked reference (itself checked against the float64 oracle above)."""
    dtype, precision = PRECISIONS[kind]
    ins, h0 = make_inputs(B, T, 2, D, D, gate=gate, dtype=dtype, device=device, h0=use_h0, normalize_k=not l2)
    do = torch.randn(B, T, 2, D, device=device).to(dtype)
    dht = torch.randn(B, 2, D, D, device=device)
    tri = run(chunk_gated_delta_rule, ins, h0, do, dht, use_qk_l2norm=l2, chunk_size=chunk_size, impl="triton",
              precision=precision)
    ref_ins = [x.double() for x in ins]
    ref = run(chunk_gated_delta_rule, ref_ins, h0, do.double(), dht, use_qk_l2norm=l2, chunk_size=chunk_size,
              impl="ref")
    for name, a, b in zip(NAMES, tri, ref):
        if b is not None:
            assert a.dtype == (torch.float32 if name == "ht" or name == "dh0" else dtype), name
            assert_close(a.double(), b, TOL[kind][name], name)


@needs_triton
@pytest.mark.parametrize("kind", ["f32-ieee", "f16"])
@pytest.mark.parametrize("B,T,D,chunk_size,gate,l2,use_h0", TRITON_CASES)
def test_triton_chunk_matches_reference(B, T, D, chunk_size, gate, l2, use_h0, kind):
    _triton_vs_reference(B, T, D, chunk_size, gate, l2, use_h0, kind, "cpu")


@needs_triton
@pytest.mark.parametrize("kind", ["f32-tf32", "bf16"])
@pytest.mark.parametrize("B,T,D,chunk_size,gate,l2,use_h0", [TRITON_CASES[1], TRITON_CASES[2]])
def test_triton_chunk_tf32_and_bf16_bounds(gpu_like_dots, B, T, D, chunk_size, gate, l2, use_h0, kind):
    # gpu_like_dots: the interpreter rounds TF32 operands and multiplies bf16 ones as the GPU does.
    _triton_vs_reference(B, T, D, chunk_size, gate, l2, use_h0, kind, "cpu")


@needs_triton
@pytest.mark.slow
def test_triton_chunk_long_sequence_small_heads():
    _triton_vs_reference(1, 4097, 16, 64, "normal", False, True, "f32-ieee", "cpu")


@needs_triton
def test_triton_chunk_survives_extreme_decay(monkeypatch):
    # exp(G_i - G_j) with G_j = -30 j would overflow to inf wherever a kernel failed to mask the exponent (above the
    # diagonal, or on the padded rows of the last chunk: T = 50 leaves 14 of chunk 64); inf * 0 is NaN. The backward
    # is the fused kernels, no torch.func.
    monkeypatch.setattr(torch.func, "vjp", None)
    ins, h0 = make_inputs(1, 50, 2, 32, 32, gate="zero")
    ins[3] = torch.full_like(ins[3], -30.0)
    do, dht = torch.randn(1, 50, 2, 32), torch.randn(1, 2, 32, 32)
    tri = run(chunk_gated_delta_rule, ins, h0, do, dht, chunk_size=64, impl="triton", precision="ieee")
    step = run(gated_delta_rule_step_ref, [x.double() for x in ins], h0, do.double(), dht)
    for name, a, b in zip(NAMES, tri, step):
        check(a.double(), b, 1e-5, name)


@needs_triton
def test_triton_chunk_key_and_value_dims_differ():
    # K = 80: partial K tiles in every kernel (state tiles of 64, the backward's K tiles of 32); V = 16: one V tile.
    # Varlen with an empty sequence and per-sequence states, against the float64 chunked reference.
    ins, _ = make_inputs(1, 37, 2, 80, 16)
    cu = torch.tensor([0, 5, 5, 37])
    h0, dht = torch.randn(3, 2, 80, 16), torch.randn(3, 2, 80, 16)
    do = torch.randn(1, 37, 2, 16)
    tri = run(chunk_gated_delta_rule, ins, h0, do, dht, cu_seqlens=cu, chunk_size=32, impl="triton", precision="ieee")
    ref = run(chunk_gated_delta_rule, [x.double() for x in ins], h0, do.double(), dht, cu_seqlens=cu, chunk_size=32,
              impl="ref")
    for name, a, b in zip(NAMES, tri, ref):
        assert_close(a.double(), b, 1e-5, name)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["f32-ieee", "f32-tf32", "bf16"])
@pytest.mark.parametrize("B,T,D,chunk_size,gate,l2,use_h0", TRITON_CASES)
def test_triton_chunk_matches_reference_on_gpu(B, T, D, chunk_size, gate, l2, use_h0, kind):
    _triton_vs_reference(B, T, D, chunk_size, gate, l2, use_h0, kind, "cuda")


@needs_triton
def test_tf32_switch_reaches_the_triton_kernels(gpu_like_dots):
    # A switch that never reached a kernel would pass the error-bound tests above (exact fp32 is within them).
    ins, h0 = make_inputs(1, 40, 2, 32, 32, h0=True)
    outs = {p: chunk_gated_delta_rule(*ins, initial_state=h0, output_final_state=True, chunk_size=16,
                                      impl="triton", precision=p) for p in ("ieee", "tf32")}
    for a, b in zip(outs["ieee"], outs["tf32"]):
        assert rel_rms(b, a) > 1e-6


def test_dot_precision_argument_and_environment_override(monkeypatch):
    from memzoo.kernels.utils import DOT_PRECISION_ENV_VAR, resolve_dot_precision

    monkeypatch.delenv(DOT_PRECISION_ENV_VAR, raising=False)
    assert resolve_dot_precision(None) == "tf32"
    monkeypatch.setenv(DOT_PRECISION_ENV_VAR, "ieee")
    assert resolve_dot_precision(None) == "ieee" and resolve_dot_precision("tf32") == "tf32"
    ins, _ = make_inputs(1, 4, 1, 16, 16)
    with pytest.raises(ValueError, match="precision"):
        chunk_gated_delta_rule(*ins, precision="fp64")


VARLEN_IMPLS = [
    pytest.param("ref", id="ref"),
    pytest.param("triton", id="triton", marks=needs_triton),
]


@pytest.mark.parametrize("impl", VARLEN_IMPLS)
def test_varlen_equals_separate_sequences(impl):
    lengths = [17, 0, 40, 1, 22]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    N, total = len(lengths), sum(lengths)
    ins, _ = make_inputs(1, total, 2, 32, 32, gate="strong")
    ins[3] = ins[3] / 5  # moderate decays so the state carries information to the end of each sequence
    h0 = torch.randn(N, 2, 32, 32)
    do, dht = torch.randn(1, total, 2, 32), torch.randn(N, 2, 32, 32)
    packed = run(chunk_gated_delta_rule, ins, h0, do, dht, cu_seqlens=cu, chunk_size=16, impl=impl, precision="ieee")
    for n in range(N):
        s, e = cu[n].item(), cu[n + 1].item()
        part = [x[:, s:e] for x in ins]
        alone = run(chunk_gated_delta_rule, part, h0[n:n + 1], do[:, s:e], dht[n:n + 1], chunk_size=16, impl=impl,
                    precision="ieee")
        o, ht, dq, dk, dv, dg, dbeta, dh0 = packed
        for name, a, b in zip(NAMES, [o[:, s:e], ht[n:n + 1], dq[:, s:e], dk[:, s:e], dv[:, s:e], dg[:, s:e],
                                      dbeta[:, s:e], dh0[n:n + 1]], alone):
            assert_close(a, b, 1e-5, f"seq {n} {name}")
    # The empty sequence passes its state through untouched, and so does its gradient.
    assert torch.equal(packed[1][1], h0[1]) and torch.equal(packed[7][1], dht[1])


@needs_triton
def test_triton_batch_equals_packed_batch():
    ins, h0 = make_inputs(3, 30, 2, 32, 32)
    o, ht = chunk_gated_delta_rule(*ins, initial_state=h0, output_final_state=True, impl="triton", chunk_size=16,
                                   precision="ieee")
    cu = torch.arange(0, 91, 30)
    flat = [x.reshape(1, 90, *x.shape[2:]) for x in ins]
    o2, ht2 = chunk_gated_delta_rule(*flat, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                                     impl="triton", chunk_size=16, precision="ieee")
    assert_close(o2.reshape(o.shape), o, 1e-6, "o")
    assert_close(ht2, ht, 1e-6, "ht")


def _bad_inputs():
    ins, h0 = make_inputs(2, 10, 2, 8, 8)
    q, k, v, g, beta = ins
    one = [x[:1] for x in ins]
    cu = torch.tensor([0, 4, 10])
    return [
        pytest.param((q, k[:, :5], v, g, beta), {}, ValueError, "k must have the shape", id="k-shape"),
        pytest.param((q, k, v.half(), g, beta), {}, TypeError, "share one dtype", id="v-dtype"),
        pytest.param((q, k, v, g[..., :1], beta), {}, ValueError, "g must have shape", id="g-shape"),
        pytest.param((q, k, v, g, beta[:, :3]), {}, ValueError, "beta must have shape", id="beta-shape"),
        pytest.param((q, k, v, None, beta), {}, ValueError, "g is required", id="g-missing"),
        pytest.param((q, k, v, g, beta), {"cu_seqlens": cu}, ValueError, "B=1", id="batch-with-cu_seqlens"),
        pytest.param(tuple(one), {"cu_seqlens": torch.tensor([0, 6, 4, 10])}, ValueError, "non-decreasing",
                     id="unsorted-cu_seqlens"),
        pytest.param((q, k, v, g, beta), {"initial_state": h0.double()}, TypeError, "float32", id="h0-dtype"),
        pytest.param((q, k, v, g, beta), {"initial_state": h0[:1]}, ValueError, "initial_state must be",
                     id="h0-shape"),
        pytest.param(tuple(one), {"cu_seqlens": cu, "initial_state": h0[:1]}, ValueError, r"N=2", id="h0-varlen"),
    ]


@pytest.mark.parametrize("impl", VARLEN_IMPLS)
@pytest.mark.parametrize("op", [chunk_gated_delta_rule, fused_recurrent_gated_delta_rule], ids=["chunk", "recurrent"])
@pytest.mark.parametrize("args,kwargs,exc,match", _bad_inputs())
def test_bad_inputs_raise_before_any_launch(monkeypatch, impl, op, args, kwargs, exc, match):
    def launched(*a, **k):
        raise AssertionError("a kernel or reference ran on bad inputs")

    import memzoo.kernels.gated_delta as ops

    monkeypatch.setattr(ops, "chunk_gated_delta_rule_ref", launched)
    monkeypatch.setattr(ops, "gated_delta_rule_step_ref", launched)
    if impl == "triton":
        import memzoo.kernels.gated_delta.triton_chunk as tc
        import memzoo.kernels.gated_delta.triton_recurrent as tr

        monkeypatch.setattr(tc, "_forward_states", launched)
        monkeypatch.setattr(tr, "_recurrent_fwd_op", launched)
    with pytest.raises(exc, match=match):
        op(*args, impl=impl, **kwargs)


@needs_triton
@pytest.mark.parametrize("chunk_size", [8, 48, 128], ids=["too-small", "not-pow2", "above-64"])
def test_triton_chunk_size_must_be_a_power_of_two(chunk_size):
    ins, _ = make_inputs(1, 10, 1, 16, 16)
    with pytest.raises(ValueError, match="power of two"):
        chunk_gated_delta_rule(*ins, impl="triton", chunk_size=chunk_size)


# (T, K=V, dtype, use_qk_l2norm, cu_seqlens)
RECURRENT_CASES = [
    pytest.param(1, 32, torch.float32, False, None, id="T1-f32"),
    pytest.param(40, 48, torch.float32, True, None, id="T40-D48-f32-l2"),
    pytest.param(40, 32, torch.float16, False, None, id="T40-f16"),
    pytest.param(40, 32, torch.float32, False, [0, 9, 9, 40], id="T40-varlen-empty"),
]


@needs_triton
@pytest.mark.parametrize("T,D,dtype,l2,cu", RECURRENT_CASES)
def test_triton_recurrent_matches_step_reference(T, D, dtype, l2, cu):
    B = 2 if cu is None else 1
    ins, _ = make_inputs(B, T, 2, D, D, dtype=dtype, normalize_k=not l2)
    cu = None if cu is None else torch.tensor(cu)
    N = B if cu is None else len(cu) - 1
    h0 = torch.randn(N, 2, D, D)
    o, ht = fused_recurrent_gated_delta_rule(*ins, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                                             use_qk_l2norm=l2, impl="triton")
    o_ref, ht_ref = gated_delta_rule_step_ref(*[x.float() for x in ins], initial_state=h0, output_final_state=True,
                                              cu_seqlens=cu, use_qk_l2norm=l2)
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    assert o.dtype == dtype and ht.dtype == torch.float32
    assert_close(o.float(), o_ref, tol, "o")
    assert_close(ht, ht_ref, tol, "ht")
    if cu is not None:
        assert torch.equal(ht[1], h0[1])


@needs_triton
def test_triton_recurrent_refuses_grads_and_runs_under_no_grad():
    ins, h0 = make_inputs(1, 5, 1, 16, 16)
    ins[2].requires_grad_()
    with pytest.raises(RuntimeError, match="train with chunk_gated_delta_rule"):
        fused_recurrent_gated_delta_rule(*ins, initial_state=h0, impl="triton")
    with torch.no_grad():
        o, _ = fused_recurrent_gated_delta_rule(*ins, initial_state=h0, impl="triton")
    o_ref, _ = fused_recurrent_gated_delta_rule(*ins, initial_state=h0, impl="ref")
    assert_close(o, o_ref.detach(), 1e-5, "o")


@needs_triton
def test_triton_decode_steps_continue_a_chunked_prefill():
    ins, h0 = make_inputs(1, 40, 2, 32, 32)
    o_full, h_full = chunk_gated_delta_rule(*ins, initial_state=h0, output_final_state=True, impl="triton",
                                            chunk_size=16, precision="ieee")
    _, h = chunk_gated_delta_rule(*[x[:, :37] for x in ins], initial_state=h0, output_final_state=True,
                                  impl="triton", chunk_size=16, precision="ieee")
    outs = []
    for t in range(37, 40):
        o_t, h = fused_recurrent_gated_delta_rule(*[x[:, t:t + 1] for x in ins], initial_state=h,
                                                  output_final_state=True, impl="triton")
        outs.append(o_t)
    assert_close(torch.cat(outs, 1), o_full[:, 37:], 1e-5, "decoded o")
    assert_close(h, h_full, 1e-5, "ht")


@needs_triton
def test_triton_custom_ops_pass_opcheck():
    from memzoo.kernels.gated_delta import triton_chunk, triton_recurrent

    ins, h0 = make_inputs(1, 20, 1, 16, 16)
    cu = torch.tensor([0, 7, 20])
    q, k, v, g, beta = (x[0].requires_grad_() for x in ins)
    h0 = torch.randn(2, 1, 16, 16, requires_grad=True)
    torch.library.opcheck(triton_chunk._chunk_fwd_op, (q, k, v, g, beta, h0, cu, 0.25, 16, "ieee"))
    with torch.no_grad():
        args = (ins[0], ins[1], ins[2], ins[3], ins[4], h0.detach(), cu, 0.25, True, False)
        torch.library.opcheck(triton_recurrent._recurrent_fwd_op, args)


def test_rel_rms_metric_sanity():
    x = torch.randn(100)
    assert rel_rms(x, x) == 0.0 and rel_rms(2 * x, x) == pytest.approx(1.0)
