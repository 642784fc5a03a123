"""GLA ops: step reference vs a float64 oracle, chunked reference vs step reference, Triton (interpreter on CPU)
vs reference on outputs, final states and every gradient, varlen, input checks."""

import pytest
import torch
import torch.nn.functional as F

from memzoo.kernels import triton_available
from memzoo.kernels.gla import chunk_gla, chunk_gla_ref, chunk_simple_gla, fused_recurrent_gla, gla_step_ref
from memzoo.testing import assert_close

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not installed")
NAMES = ("o", "final_state", "dq", "dk", "dv", "dg", "dh0")


def oracle(q, k, v, g, scale, h0):
    """Float64 loop straight from S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = scale S_t^T q_t."""
    q, k, v, g = (x.double() for x in (q, k, v, g))
    B, T, H, K = q.shape
    o = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    S = h0.double().clone()
    for b in range(B):
        for h in range(H):
            for t in range(T):
                S[b, h] = torch.diag(g[b, t, h].exp()) @ S[b, h] + torch.outer(k[b, t, h], v[b, t, h])
                o[b, t, h] = scale * S[b, h].T @ q[b, t, h]
    return o, S


def make(B, T, H, K, V, gate="normal", dtype=torch.float32, device="cpu", h0=True):
    q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
    v = torch.randn(B, T, H, V)
    if gate == "normal":
        g = F.logsigmoid(torch.randn(B, T, H, K))
    elif gate == "strong":
        # -5 to -10 per step: exp(-cumsum) over one chunk would overflow fp32 many times over
        g = -5 - 5 * torch.rand(B, T, H, K)
    else:
        g = torch.zeros(B, T, H, K)
    state = torch.randn(B, H, K, V) if h0 else None
    ins = [x.to(device=device, dtype=dtype) for x in (q, k, v)] + [g.to(device)]
    return ins, None if state is None else state.to(device)


def run(fn, ins, h0, do, dht, **kw):
    """Outputs and gradients of (o * do).sum() + (ht * dht).sum(); h0's gradient is None when h0 is None."""
    leaves = [x.detach().clone().requires_grad_(True) for x in ins]
    h = None if h0 is None else h0.detach().clone().requires_grad_(True)
    o, ht = fn(*leaves, initial_state=h, output_final_state=True, **kw)
    ((o * do).sum() + (ht * dht).sum()).backward()
    return [o.detach(), ht.detach()] + [x.grad for x in leaves] + [None if h is None else h.grad]


def compare(actual, expected, tols):
    for name, a, e, tol in zip(NAMES, actual, expected, tols):
        if e is None:
            assert a is None, name
            continue
        if e.abs().max() == 0:
            # e.g. dg at T=1 without an initial state: exactly zero, while q*dq - k*dk leaves fp32 rounding
            assert a.abs().max() <= 1e-5, f"{name}: reference is zero, got max |{name}| = {a.abs().max():.2e}"
            continue
        assert_close(a.float().cpu(), e.float().cpu(), tol, name)


def test_step_reference_matches_float64_oracle():
    ins, h0 = make(2, 7, 2, 5, 3)
    o_ref, s_ref = oracle(*ins, 0.7, h0)
    o, s = gla_step_ref(*ins, scale=0.7, initial_state=h0, output_final_state=True)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    assert_close(o, o_ref.float(), 1e-6, "o")
    assert_close(s, s_ref.float(), 1e-6, "final_state")
    o64, s64 = gla_step_ref(*(x.double() for x in ins), scale=0.7, initial_state=h0, output_final_state=True)
    assert (o64 - o_ref).abs().max() < 1e-12 and (s64.double() - s_ref).abs().max() < 1e-6


# dg is a reverse cumsum over the chunk of q*dq - k*dk; with decays of -5..-10 per step the fp32 chunk-local cumsums
# (|b| up to ~600) leave ~1e-4 relative error in dg, in the reference and the kernels alike (float64: 1e-13).
STRONG_DG_TOL = 5e-4

CHUNK_REF_CASES = [
    pytest.param(1, 1, 1, 16, "normal", True, id="T1-H1-bt16-h0"),
    pytest.param(2, 63, 2, 16, "normal", True, id="T63-H2-bt16-h0"),
    pytest.param(1, 63, 1, 64, "strong", False, id="T63-H1-bt64-strong"),
    pytest.param(2, 100, 2, 64, "normal", False, id="T100-H2-bt64"),
    pytest.param(1, 100, 2, 16, "strong", True, id="T100-H2-bt16-strong-h0"),
    pytest.param(2, 100, 1, 64, "zero", True, id="T100-H1-bt64-g0-h0"),
    pytest.param(1, 100, 2, 64, "zero", False, id="T100-H2-bt64-g0"),
]


@pytest.mark.parametrize("B,T,H,chunk_size,gate,h0", CHUNK_REF_CASES)
def test_chunk_reference_matches_step_reference(B, T, H, chunk_size, gate, h0):
    K, V = 12, 10
    ins, state = make(B, T, H, K, V, gate, h0=h0)
    do, dht = torch.randn(B, T, H, V), torch.randn(B, H, K, V)
    # the chunked form runs in fp32; the step reference in float64 is the yardstick
    got = run(chunk_gla_ref, ins, state, do, dht, chunk_size=chunk_size)
    want = run(gla_step_ref, [x.double() for x in ins], state, do.double(), dht.double())
    compare(got, want, [1e-5] * 5 + [STRONG_DG_TOL if gate == "strong" else 1e-5, 1e-5])


def test_simple_gla_is_gla_with_broadcast_gate():
    ins, h0 = make(1, 40, 2, 16, 16)
    g = F.logsigmoid(torch.randn(1, 40, 2))
    do, dht = torch.randn(1, 40, 2, 16), torch.randn(1, 2, 16, 16)
    def expanded(q, k, v, g, **kw):
        return chunk_gla_ref(q, k, v, g.unsqueeze(-1).expand(*g.shape, q.shape[-1]), **kw)

    simple = run(chunk_simple_gla, ins[:3] + [g], h0, do, dht, chunk_size=16)
    full = run(expanded, ins[:3] + [g], h0, do, dht, chunk_size=16)
    assert simple[5].shape == g.shape
    compare(simple, full, [1e-6] * 7)


def test_chunk_gla_auto_on_cpu_is_the_reference(monkeypatch):
    monkeypatch.delenv("MEMZOO_KERNEL_IMPL", raising=False)
    ins, h0 = make(2, 30, 2, 8, 8)
    a = chunk_gla(*ins, initial_state=h0, output_final_state=True, chunk_size=16)
    b = chunk_gla_ref(*ins, initial_state=h0, output_final_state=True, chunk_size=16)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_recurrent_reference_is_autograd_able_at_both_lengths():
    for T in (5, 90):
        ins, h0 = make(1, T, 1, 8, 8)
        do, dht = torch.randn(1, T, 1, 8), torch.randn(1, 1, 8, 8)
        got = run(fused_recurrent_gla, ins, h0, do, dht, impl="ref", chunk_size=16)
        want = run(gla_step_ref, [x.double() for x in ins], h0, do.double(), dht.double())
        compare(got, want, [1e-5] * 7)


# dg sums differences of products (q dq - k dk), so its relative error runs a little above the others'
FP32_TOLS = [1e-5, 1e-5, 1e-5, 1e-5, 1e-5, 3e-5, 1e-5]
FP16_TOLS = [5e-3] * 7
# TF32 keeps 10 mantissa bits (2^-11 relative per operand), like fp16
TF32_TOL = 5e-3
BF16_TOLS = [1.5e-2] * 7

TRITON_CASES = [
    pytest.param(2, 1, 2, 32, "normal", True, torch.float32, "cpu", id="fp32-T1-B2-h0"),
    pytest.param(1, 63, 2, 32, "strong", True, torch.float32, "cpu", id="fp32-T63-strong-h0"),
    pytest.param(2, 100, 2, 32, "normal", True, torch.float32, "cpu", id="fp32-T100-B2-h0"),
    pytest.param(1, 100, 1, 48, "normal", False, torch.float32, "cpu", id="fp32-T100-H1-K48"),
    pytest.param(1, 100, 2, 32, "zero", True, torch.float32, "cpu", id="fp32-T100-g0-h0"),
    pytest.param(1, 1, 2, 32, "normal", False, torch.float16, "cpu", id="fp16-T1"),
    pytest.param(1, 63, 2, 32, "strong", True, torch.float16, "cpu", id="fp16-T63-strong-h0"),
    pytest.param(2, 100, 2, 32, "normal", True, torch.float16, "cpu", id="fp16-T100-B2-h0"),
    pytest.param(2, 300, 4, 64, "normal", True, torch.bfloat16, "cuda", id="bf16-cuda-T300", marks=pytest.mark.gpu),
    pytest.param(1, 1000, 2, 100, "strong", True, torch.bfloat16, "cuda", id="bf16-cuda-T1000-K100-strong",
                 marks=pytest.mark.gpu),
]


@needs_triton
@pytest.mark.parametrize("B,T,H,K,gate,h0,dtype,device", TRITON_CASES)
def test_triton_chunk_matches_reference(B, T, H, K, gate, h0, dtype, device):
    ins, state = make(B, T, H, K, K, gate, dtype, device, h0)
    do = torch.randn(B, T, H, K, device=device).to(dtype)
    dht = torch.randn(B, H, K, K, device=device)
    got = run(chunk_gla, ins, state, do, dht, impl="triton")
    # the reference sees the same (rounded) inputs, in float64
    want = run(chunk_gla_ref, [x.double() for x in ins], state, do.double(), dht.double())
    tols = list({torch.float32: FP32_TOLS, torch.float16: FP16_TOLS, torch.bfloat16: BF16_TOLS}[dtype])
    if gate == "strong":
        tols[5] = max(tols[5], STRONG_DG_TOL)
    compare(got, want, tols)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32 and got[5].dtype == torch.float32


@needs_triton
def test_triton_chunk_tf32_dots_within_bound(gpu_like_dots):
    # On a GPU, fp32 inputs run their dots as TF32 (the default; MEMZOO_DOT_PRECISION=ieee is exact): with
    # gpu_like_dots the interpreter rounds the dot operands to TF32 as the tensor cores do.
    ins, state = make(1, 100, 2, 32, 32, "normal", torch.float32, "cpu", True)
    do, dht = torch.randn(1, 100, 2, 32), torch.randn(1, 2, 32, 32)
    got = run(chunk_gla, ins, state, do, dht, impl="triton")
    want = run(chunk_gla_ref, [x.double() for x in ins], state, do.double(), dht.double())
    compare(got, want, [TF32_TOL] * 7)


@needs_triton
def test_triton_simple_gla_matches_reference():
    ins, h0 = make(1, 40, 2, 32, 32)
    g = F.logsigmoid(torch.randn(1, 40, 2))
    do, dht = torch.randn(1, 40, 2, 32), torch.randn(1, 2, 32, 32)
    got = run(chunk_simple_gla, ins[:3] + [g], h0, do, dht, impl="triton")
    want = run(chunk_simple_gla, [x.double() for x in ins[:3]] + [g.double()], h0, do.double(), dht.double(),
               impl="ref")
    compare(got, want, FP32_TOLS)


VARLEN_CASES = [
    pytest.param("ref", [0, 17, 17, 60, 100], 16, id="ref-empty-middle"),
    pytest.param("ref", [0, 0, 45, 45], 64, id="ref-empty-ends"),
    pytest.param("triton", [0, 17, 17, 50], 16, id="triton-empty-middle", marks=needs_triton),
]


@pytest.mark.parametrize("impl,bounds,chunk_size", VARLEN_CASES)
def test_varlen_equals_separate_sequences(impl, bounds, chunk_size):
    T, H, K, V = bounds[-1], 2, 32, 32
    N = len(bounds) - 1
    ins, _ = make(1, T, H, K, V)
    h0 = torch.randn(N, H, K, V)
    do, dht = torch.randn(1, T, H, V), torch.randn(N, H, K, V)
    cu = torch.tensor(bounds)
    got = run(chunk_gla, ins, h0, do, dht, cu_seqlens=cu, impl=impl, chunk_size=chunk_size)
    for n in range(N):
        s, e = bounds[n], bounds[n + 1]
        if s == e:
            # an empty sequence hands its initial state through, and the state gradient back
            assert torch.equal(got[1][n], h0[n]) and torch.equal(got[6][n], dht[n])
            continue
        part = run(chunk_gla, [x[:, s:e] for x in ins], h0[n : n + 1], do[:, s:e], dht[n : n + 1], impl=impl,
                   chunk_size=chunk_size)
        sliced = [got[0][:, s:e], got[1][n : n + 1]] + [x[:, s:e] for x in got[2:6]] + [got[6][n : n + 1]]
        compare(sliced, part, [1e-5] * 7)


RECURRENT_CASES = [
    pytest.param(torch.float32, None, 32, id="fp32"),
    pytest.param(torch.float16, None, 32, id="fp16"),
    pytest.param(torch.float32, [0, 5, 5, 30], 48, id="fp32-varlen-empty-K48"),
]


@needs_triton
@pytest.mark.parametrize("dtype,bounds,K", RECURRENT_CASES)
def test_triton_recurrent_matches_step_reference(dtype, bounds, K):
    B, T = (2, 20) if bounds is None else (1, bounds[-1])
    N = B if bounds is None else len(bounds) - 1
    cu = None if bounds is None else torch.tensor(bounds)
    ins, _ = make(B, T, 2, K, 40, dtype=dtype, h0=False)
    h0 = torch.randn(N, 2, K, 40)
    o, ht = fused_recurrent_gla(*ins, initial_state=h0, output_final_state=True, cu_seqlens=cu, impl="triton")
    o_ref, ht_ref = gla_step_ref(*(x.double() for x in ins), initial_state=h0, output_final_state=True,
                                 cu_seqlens=cu)
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    assert o.dtype == dtype
    assert_close(o.float(), o_ref.float(), tol, "o")
    assert_close(ht, ht_ref, tol, "final_state")


@needs_triton
def test_triton_recurrent_refuses_to_train():
    ins, _ = make(1, 4, 1, 16, 16, h0=False)
    ins[0].requires_grad_(True)
    with pytest.raises(RuntimeError, match="use chunk_gla for training"):
        fused_recurrent_gla(*ins, impl="triton")
    with torch.no_grad():
        fused_recurrent_gla(*ins, impl="triton")


def _bad_inputs():
    q, k, v, g = torch.randn(2, 8, 2, 4), torch.randn(2, 8, 2, 4), torch.randn(2, 8, 2, 3), -torch.rand(2, 8, 2, 4)
    h0 = torch.zeros(2, 2, 4, 3)
    return [
        pytest.param(dict(q=q, k=k[:, :7], v=v, g=g), ValueError, "k must have the shape", id="k-shape"),
        pytest.param(dict(q=q, k=k, v=v[:, :, :1], g=g), ValueError, "v must be", id="v-heads"),
        pytest.param(dict(q=q, k=k.half(), v=v, g=g), TypeError, "share one dtype", id="dtype-mismatch"),
        pytest.param(dict(q=q, k=k, v=v, g=g[..., 0]), ValueError, "g must have shape", id="g-layout"),
        pytest.param(dict(q=q, k=k, v=v, g=None), ValueError, "g .*required", id="g-missing"),
        pytest.param(dict(q=q, k=k, v=v, g=g, initial_state=h0.double()), TypeError, "float32", id="h0-dtype"),
        pytest.param(dict(q=q, k=k, v=v, g=g, initial_state=h0[:1]), ValueError, "initial_state must be",
                     id="h0-shape"),
        pytest.param(dict(q=q, k=k, v=v, g=g, cu_seqlens=torch.tensor([0, 8])), ValueError, "B=1", id="varlen-B2"),
        pytest.param(dict(q=q[:1], k=k[:1], v=v[:1], g=g[:1], cu_seqlens=torch.tensor([0, 6, 3, 8])), ValueError,
                     "non-decreasing", id="varlen-unsorted"),
        pytest.param(dict(q=q[:1], k=k[:1], v=v[:1], g=g[:1], cu_seqlens=torch.tensor([0, 6])), ValueError,
                     "end at the sequence length", id="varlen-short"),
        pytest.param(dict(q=q, k=k, v=v, g=g, chunk_size=48), ValueError, "chunk_size", id="chunk-size"),
    ]


@pytest.mark.parametrize("op", [chunk_gla, fused_recurrent_gla], ids=["chunk", "recurrent"])
@pytest.mark.parametrize("kwargs,error,match", _bad_inputs())
def test_bad_inputs_raise_before_any_launch(op, kwargs, error, match, monkeypatch):
    import memzoo.kernels.gla as gla

    def no_launch(*args, **kw):
        raise AssertionError("a kernel path ran on invalid input")

    monkeypatch.setattr(gla, "chunk_gla_ref", no_launch)
    monkeypatch.setattr(gla, "gla_step_ref", no_launch)
    kwargs = dict(kwargs)
    with pytest.raises(error, match=match):
        op(kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"), kwargs.pop("g"), impl="ref", **kwargs)


def test_simple_gla_rejects_a_per_key_gate():
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="g must have shape"):
        chunk_simple_gla(q, q, q, -torch.rand(1, 8, 2, 4))


@needs_triton
def test_triton_chunk_op_registration_passes_opcheck():
    import memzoo.kernels.gla.triton_chunk  # noqa: F401  (registers memzoo::gla_chunk_fwd)

    ins, _ = make(1, 20, 2, 32, 32)
    leaves = [x.requires_grad_(True) for x in ins]
    h0 = torch.randn(2, 2, 32, 32, requires_grad=True)
    result = torch.library.opcheck(torch.ops.memzoo.gla_chunk_fwd.default,
                                   (*leaves, 0.5, h0, torch.tensor([0, 7, 20]), 32, True))
    assert all(v == "SUCCESS" for v in result.values()), result


@needs_triton
def test_triton_chunk_compiles_without_graph_breaks():
    ins, _ = make(1, 20, 2, 32, 32)
    h0 = torch.randn(2, 2, 32, 32)
    cu = torch.tensor([0, 7, 20])
    do, dht = torch.randn(1, 20, 2, 32), torch.randn(2, 2, 32, 32)

    def fn(q, k, v, g, initial_state, output_final_state):
        return chunk_gla(q, k, v, g, None, initial_state, output_final_state, cu, impl="triton")

    compiled = torch.compile(fn, fullgraph=True)
    compare(run(compiled, ins, h0, do, dht), run(fn, ins, h0, do, dht), [1e-6] * 7)


@needs_triton
def test_triton_recurrent_op_registration_passes_opcheck():
    import memzoo.kernels.gla.triton_recurrent  # noqa: F401  (registers memzoo::gla_recurrent_fwd)

    ins, _ = make(1, 20, 2, 32, 32)
    h0 = torch.randn(2, 2, 32, 32)
    for want_final in (True, False):
        result = torch.library.opcheck(torch.ops.memzoo.gla_recurrent_fwd.default,
                                       (*ins, h0, torch.tensor([0, 7, 20]), 0.5, want_final))
        assert all(v == "SUCCESS" for v in result.values()), result
