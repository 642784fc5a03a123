"""Titans memory ops: chunked forms == the token-loop specification (fp64, outputs, states, every gradient),
the gated-delta-rule special case, degenerate gates, varlen, and the Triton kernel (interpreter) == reference."""

import pytest
import torch
import torch.nn.functional as F

from memzoo.kernels.gated_delta.reference import chunk_gated_delta_rule_ref
from memzoo.kernels.titans import (
    titans_linear,
    titans_linear_chunk_ref,
    titans_linear_step_ref,
    titans_mlp,
    titans_mlp_chunk_ref,
    titans_mlp_step_ref,
)
from memzoo.testing import assert_close, rel_rms


def gen(seed):
    return torch.Generator().manual_seed(seed)


def linear_inputs(B=2, T=19, H=2, K=4, V=3, channel=False, dtype=torch.float64, seed=0, n_seq=None):
    g = gen(seed)
    n_seq = B if n_seq is None else n_seq
    q = F.normalize(torch.randn(B, T, H, K, generator=g, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    theta = torch.rand(B, T, H, generator=g, dtype=dtype)
    log_eta = torch.rand(B, T, H, generator=g, dtype=dtype).log()
    shape = (B, T, H, K) if channel else (B, T, H)
    log_gamma = (0.5 + 0.5 * torch.rand(*shape, generator=g, dtype=dtype)).log()
    state = tuple(0.3 * torch.randn(n_seq, H, K, V, generator=g, dtype=dtype) for _ in range(3))
    return [q, k, v, theta, log_eta, log_gamma], state


def mlp_inputs(B=2, T=19, H=2, D=4, E=8, seed=0):
    g = gen(seed)
    q = F.normalize(torch.randn(B, T, H, D, generator=g, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(B, T, H, D, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    th1, th2 = (0.5 * torch.rand(B, T, H, generator=g, dtype=torch.float64) for _ in range(2))
    log_eta = torch.rand(B, T, H, generator=g, dtype=torch.float64).log()
    log_gamma = (0.5 + 0.5 * torch.rand(B, T, H, generator=g, dtype=torch.float64)).log()
    a1 = torch.randn(B, H, E, D, generator=g, dtype=torch.float64) * E ** -0.5
    a2 = torch.randn(B, H, D, E, generator=g, dtype=torch.float64) * D ** -0.5
    s1, s2 = 0.1 * torch.randn_like(a1), 0.1 * torch.randn_like(a2)
    # A gradient base different from the weights, as mid-chunk.
    state = (a1 + 0.1 * torch.randn_like(a1), a1, s1, a2 + 0.1 * torch.randn_like(a2), a2, s2)
    return [q, k, v, th1, th2, log_eta, log_gamma], state


def objective(y, state, seed=1):
    g = gen(seed)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
    return loss + sum((s * torch.randn(s.shape, generator=g, dtype=s.dtype)).sum() for s in state)


def compare_with_grads(fn_a, fn_b, xs, state, tol, start_pos, b, cu=None):
    leaves_a = [x.clone().requires_grad_() for x in [*xs, *state]]
    leaves_b = [x.clone().requires_grad_() for x in [*xs, *state]]
    n = len(xs)
    ya, sa = fn_a(*leaves_a[:n], tuple(leaves_a[n:]), start_pos, b, cu)
    yb, sb = fn_b(*leaves_b[:n], tuple(leaves_b[n:]), start_pos, b, cu)
    assert_close(ya, yb.to(ya.dtype), tol, "output")
    for i, (x, y) in enumerate(zip(sa, sb)):
        assert_close(x, y.to(x.dtype), tol, f"state {i}")
    ga = torch.autograd.grad(objective(ya.double(), [s.double() for s in sa]), leaves_a, allow_unused=True)
    gb = torch.autograd.grad(objective(yb.double(), [s.double() for s in sb]), leaves_b, allow_unused=True)
    for i, (x, y) in enumerate(zip(ga, gb)):
        assert x is not None and y is not None, f"gradient {i} missing"
        assert_close(x, y.to(x.dtype), tol, f"gradient {i}")


@pytest.mark.parametrize("channel", [False, True], ids=["head_alpha", "channel_alpha"])
@pytest.mark.parametrize("b,T", [(1, 7), (4, 19), (16, 5), (16, 37)], ids=lambda x: str(x))
def test_linear_chunk_equals_step_fp64(channel, b, T):
    xs, state = linear_inputs(T=T, channel=channel)
    start_pos = torch.tensor([0, min(3, b - 1)])
    compare_with_grads(titans_linear_step_ref, titans_linear_chunk_ref, xs, state, 1e-10, start_pos, b)


@pytest.mark.parametrize("b,T", [(1, 6), (4, 11), (16, 21)], ids=lambda x: str(x))
def test_mlp_chunk_equals_step_fp64(b, T):
    xs, state = mlp_inputs(T=T)
    start_pos = torch.tensor([0, min(2, b - 1)])
    compare_with_grads(titans_mlp_step_ref, titans_mlp_chunk_ref, xs, state, 1e-12, start_pos, b)


def _mlp_in_two_calls(split):
    """The chunked MLP form over [0, split) then [split, T), the state (and chunk position) carried across."""

    def run(*args):
        *xs, state, start_pos, b, cu = args
        y1, mid = titans_mlp_chunk_ref(*(x[:, :split] for x in xs), state, start_pos, b, cu)
        y2, end = titans_mlp_chunk_ref(*(x[:, split:] for x in xs), mid, (start_pos + split) % b, b, cu)
        return torch.cat((y1, y2), 1), end

    return run


@pytest.mark.parametrize("split", range(1, 11))
def test_mlp_split_anywhere_equals_token_loop(split):
    """Every split point of T = 11 tokens (chunk 4, rows starting at offsets 0 and 3): outputs, final states and
    every gradient through the carried state equal the token loop over the whole sequence."""
    xs, state = mlp_inputs(T=11)
    compare_with_grads(_mlp_in_two_calls(split), titans_mlp_step_ref, xs, state, 1e-12, torch.tensor([0, 3]), 4)


def test_linear_gradcheck_tiny():
    xs, state = linear_inputs(B=1, T=6, H=1, K=3, V=2, channel=True, n_seq=1)
    start_pos = torch.tensor([1])

    def fn(*args):
        y, st = titans_linear_chunk_ref(*args[:6], tuple(args[6:]), start_pos, 4)
        return y, *st

    assert torch.autograd.gradcheck(fn, [x.clone().requires_grad_() for x in [*xs, *state]])


def test_mlp_gradcheck_tiny():
    xs, state = mlp_inputs(B=1, T=5, H=1, D=3, E=4)
    start_pos = torch.tensor([0])

    def fn(*args):
        y, st = titans_mlp_chunk_ref(*args[:7], tuple(args[7:]), start_pos, 2)
        return y, *st

    assert torch.autograd.gradcheck(fn, [x.clone().requires_grad_() for x in [*xs, *state]])


def test_eta0_b1_is_the_gated_delta_rule():
    """titans.md §2: with eta = 0 and b = 1, g = log(1 - alpha), beta = theta / (1 - alpha), v_gdn = (1 - alpha) v."""
    (q, k, v, theta, _, log_gamma), _ = linear_inputs(T=23, K=4, V=4)
    zeros = tuple(torch.zeros(2, 2, 4, 4, dtype=torch.float64) for _ in range(3))
    log_eta = torch.full_like(theta, -1e3)
    y, (_, w, _) = titans_linear_chunk_ref(q, k, v, theta, log_eta, log_gamma, zeros, torch.zeros(2, dtype=int), 1)
    gamma = log_gamma.exp()
    y_gdn, h = chunk_gated_delta_rule_ref(q, k, v * gamma[..., None], log_gamma, theta / gamma, scale=1.0,
                                          output_final_state=True, chunk_size=8)
    assert_close(y, y_gdn, 1e-10, "output")
    assert_close(w, h.double(), 1e-6, "state")


def test_degenerate_gates():
    (q, k, v, theta, log_eta, log_gamma), (wb, w, s) = linear_inputs(T=21)
    sp = torch.zeros(2, dtype=torch.int64)
    # theta = 0, alpha = 0, S_0 = 0: the memory never moves.
    y, (_, w1, s1) = titans_linear_chunk_ref(q, k, v, 0 * theta, log_eta, 0 * log_gamma, (wb, w, 0 * s), sp, 4)
    assert torch.allclose(w1, w, atol=1e-14) and torch.count_nonzero(s1) == 0
    assert_close(y, torch.einsum("bthk,bhkv->bthv", q, w), 1e-12, "frozen read")
    # alpha = 1 (log_gamma -> -inf): W_t = S_t.
    _, (_, w2, s2) = titans_linear_chunk_ref(q, k, v, theta, log_eta, torch.full_like(log_gamma, -1e3),
                                             (wb, w, s), sp, 4)
    assert_close(w2, s2, 1e-12, "alpha = 1")
    # eta = 0: the momentum after the last token is that token's own step only.
    xs = [q[:, :1], k[:, :1], v[:, :1], theta[:, :1], torch.full_like(log_eta[:, :1], -1e3), log_gamma[:, :1]]
    _, (_, _, s3) = titans_linear_chunk_ref(*xs, (wb, w, s), sp, 4)
    grad = torch.einsum("bhk,bhv->bhkv", k[:, 0], torch.einsum("bhk,bhkv->bhv", k[:, 0], wb) - v[:, 0])
    assert_close(s3, -theta[:, 0, :, None, None] * grad, 1e-12, "eta = 0")


@pytest.mark.parametrize("mlp", [False, True], ids=["linear", "mlp"])
def test_varlen_with_empty_sequence_equals_separate(mlp):
    lengths = [7, 0, 20, 1]
    cu = torch.tensor([0, 7, 7, 27, 28])
    if mlp:
        xs, state0 = mlp_inputs(B=1, T=28)
        state = tuple(s.expand(4, *s.shape[1:]).clone() for s in state0)
        op = titans_mlp_chunk_ref
    else:
        xs, state = linear_inputs(B=1, T=28, channel=True, n_seq=4)
        op = titans_linear_chunk_ref
    sp = torch.tensor([0, 2, 3, 1])
    y, st = op(*xs, state, sp, 4, cu)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        y_i, st_i = op(*(x[:, a:b] if b > a else x[:, :1] for x in xs), tuple(s[i:i + 1] for s in state),
                       sp[i:i + 1], 4) if b > a else (None, tuple(s[i:i + 1] for s in state))
        if y_i is not None:
            assert_close(y[:, a:b], y_i, 1e-12, f"sequence {i} of lengths {lengths}")
        for j, (x, z) in enumerate(zip(st, st_i)):
            assert_close(x[i:i + 1], z, 1e-12, f"sequence {i} state {j}")


def test_split_anywhere_equals_one_pass():
    xs, state = linear_inputs(T=29, channel=True)
    sp = torch.zeros(2, dtype=torch.int64)
    y, st = titans_linear_chunk_ref(*xs, state, sp, 8)
    ys, carried, pos = [], state, sp
    for a, b in [(0, 3), (3, 12), (12, 13), (13, 29)]:
        y_p, carried = titans_linear_chunk_ref(*(x[:, a:b] for x in xs), carried, pos, 8)
        pos = (pos + b - a) % 8
        ys.append(y_p)
    assert_close(torch.cat(ys, 1), y, 1e-12, "output")
    for i, (x, z) in enumerate(zip(carried, st)):
        assert_close(x, z, 1e-12, f"state {i}")


def test_bad_inputs_raise():
    xs, state = linear_inputs(dtype=torch.float32)
    xs32 = [x.float() for x in xs]
    st32 = tuple(s.float() for s in state)
    sp = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="theta"):
        titans_linear(xs32[0], xs32[1], xs32[2], xs32[3][:, :, :1], *xs32[4:], st32, sp)
    with pytest.raises(ValueError, match="start_pos"):
        titans_linear(*xs32, st32, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="chunk_size"):
        titans_linear(*xs32, st32, sp, 0)
    with pytest.raises(ValueError, match="initial_state"):
        titans_linear(*xs32, st32[:2], sp)
    with pytest.raises(TypeError, match="initial_state"):
        titans_linear(*xs32, tuple(s.half() for s in st32), sp)
    with pytest.raises(ValueError, match="v must be"):
        titans_mlp(xs32[0], xs32[1], xs32[2], xs32[3], xs32[3], xs32[4], xs32[5], st32 * 2, sp)


def test_triton_refuses_what_it_cannot_run():
    pytest.importorskip("triton")
    xs, state = linear_inputs(B=1, T=5, K=16, V=16, dtype=torch.float32, n_seq=1)
    with pytest.raises(ValueError, match="power of two"):
        titans_linear(*xs, state, torch.zeros(1, dtype=torch.int64), 12, impl="triton")


def _triton_linear(*args, precision="ieee"):
    return titans_linear(*args[:-1], cu_seqlens=args[-1], impl="triton", precision=precision)


def _ref_linear(*args):
    return titans_linear_chunk_ref(*args)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 5e-3)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T,V,starts", [(1, 32, (0, 0)), (37, 32, (0, 5)), (50, 20, (15, 1))], ids=str)
def test_triton_equals_reference(dtype, tol, T, V, starts):
    pytest.importorskip("triton")
    xs, state = linear_inputs(T=T, K=32, V=V, dtype=torch.float32, seed=3)
    xs = [x.to(dtype) if i < 3 else x for i, x in enumerate(xs)]
    compare_with_grads(_triton_linear, _ref_linear, xs, state, tol, torch.tensor(starts), 16)


# The long sequence runs at the strictest (ieee) and the loosest (bf16) bound only: ~25 s each in the interpreter.
def _against_fp64(xs64, state64, start_pos, cu, dtype, precision, tol):
    """The Triton path on q, k, v in ``dtype`` (gates and states fp32) == the chunked reference in float64: output,
    final states and every gradient (rel-RMS <= tol). Returns the kernel's output and its detached inputs."""
    xs = [x.to(dtype) if i < 3 else x.float() for i, x in enumerate(xs64)]
    leaves = [x.clone().requires_grad_() for x in [*xs, *(s.float() for s in state64)]]
    leaves64 = [x.clone().requires_grad_() for x in [*xs64, *state64]]
    y, st = _triton_linear(*leaves[:6], tuple(leaves[6:]), start_pos, 16, cu, precision=precision)
    y64, st64 = _ref_linear(*leaves64[:6], tuple(leaves64[6:]), start_pos, 16, cu)
    assert_close(y.double(), y64, tol, "output")
    for i, (a, b) in enumerate(zip(st, st64)):
        assert_close(a.double(), b, tol, f"state {i}")
    ga = torch.autograd.grad(objective(y.double(), [s.double() for s in st]), leaves)
    gb = torch.autograd.grad(objective(y64, st64), leaves64)
    for i, (a, b) in enumerate(zip(ga, gb)):
        assert_close(a.double(), b, tol, f"gradient {i}")
    return y.detach(), [x.detach() for x in leaves]


# The long sequence runs at the strictest (ieee) and the loosest (bf16) bound only: ~25 s each in the interpreter;
# the per-key-channel decay (an in-chunk loop per row, slower in the interpreter) at T = 1 and 63.
_BOUNDS = {"ieee": (torch.float32, "ieee", 1e-5), "tf32": (torch.float32, "tf32", 5e-3),
           "bf16": (torch.bfloat16, "tf32", 2e-2)}


@pytest.mark.slow
@pytest.mark.parametrize("dtype,precision,tol,T,channel", [
    pytest.param(*bound, T, channel, id=f"{name}-{T}{'-channel' if channel else ''}")
    for name, bound in _BOUNDS.items() for T in (1, 37, 63, 100, 4097) for channel in (False, True)
    if (T < 1000 or name != "tf32") and (not channel or T in (1, 63))])
def test_triton_bounds_against_fp64(gpu_like_dots, dtype, precision, tol, T, channel):
    # gpu_like_dots: the interpreter rounds TF32 operands and multiplies bf16 ones as the GPU does; the reference
    # runs in float64. Small heads (K = V = 16, one of them at T = 4097: 257 chunks) keep it short.
    pytest.importorskip("triton")
    n = 1 if T > 1000 else 2
    xs64, state64 = linear_inputs(B=n, T=T, H=n, K=16, V=16, channel=channel, dtype=torch.float64, seed=3)
    start_pos = torch.tensor([0, 5][:n])
    y, leaves = _against_fp64(xs64, state64, start_pos, None, dtype, precision, tol)
    if precision == "tf32" and dtype == torch.float32:
        # The switch reaches the kernels: TF32 rounding moves the output off the exact fp32 one.
        y_ieee, _ = _triton_linear(*leaves[:6], tuple(leaves[6:]), start_pos, 16, None, precision="ieee")
        assert rel_rms(y, y_ieee) > 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("case", ["varlen", "split_keys"])
def test_triton_channel_decay_against_fp64(monkeypatch, case):
    """The per-key-channel decay (the layer's default) on the kernel == float64 reference, dlog_gamma per channel
    included: varlen with an empty and a length-1 sequence, start_pos > 0, lengths not a multiple of the chunk; and
    keys in two register tiles (the second half masked)."""
    pytest.importorskip("triton")
    if case == "varlen":
        cu, starts = torch.tensor([0, 9, 9, 10, 40]), torch.tensor([0, 4, 15, 7])
        xs64, state64 = linear_inputs(B=1, T=40, K=16, V=16, channel=True, dtype=torch.float64, n_seq=4, seed=7)
    else:
        import memzoo.kernels.titans.triton_chunk as triton_chunk

        monkeypatch.setattr(triton_chunk, "_BK_MAX", 16)
        cu, starts = None, torch.tensor([3, 0])
        xs64, state64 = linear_inputs(T=21, K=24, V=16, channel=True, dtype=torch.float64, seed=8)
    _against_fp64(xs64, state64, starts, cu, torch.float32, "ieee", 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("K", [32, 24], ids=["K32", "K24"])
def test_triton_split_key_tiles(monkeypatch, K):
    """Keys wider than one register tile (two tiles; at K = 24 the second is half masked) == reference."""
    pytest.importorskip("triton")
    import memzoo.kernels.titans.triton_chunk as triton_chunk

    monkeypatch.setattr(triton_chunk, "_BK_MAX", 16)
    assert triton_chunk._blocks(K, 20)[:2] == (16, 2)
    xs, state = linear_inputs(T=50, K=K, V=20, dtype=torch.float32, seed=4)
    compare_with_grads(_triton_linear, _ref_linear, xs, state, 2e-5, torch.tensor([15, 1]), 16)


@pytest.mark.slow
def test_triton_varlen_with_empty_sequence():
    pytest.importorskip("triton")
    cu = torch.tensor([0, 9, 9, 40])
    xs, state = linear_inputs(B=1, T=40, K=16, V=16, dtype=torch.float32, n_seq=3, seed=5)
    compare_with_grads(_triton_linear, _ref_linear, xs, state, 2e-5, torch.tensor([0, 4, 7]), 16, cu)


def test_mlp_chunk_op_passes_opcheck(monkeypatch):
    """The MLP walk's custom op: schema, fake tensors, autograd registration and AOT dispatch."""
    import memzoo.kernels.titans.mlp_chunk as mlp_chunk

    calls = []
    op = mlp_chunk._chunks_op
    monkeypatch.setattr(mlp_chunk, "_chunks_op", lambda *args: calls.append(args) or op(*args))
    xs, state = mlp_inputs(T=9)
    titans_mlp_chunk_ref(*xs, state, torch.tensor([0, 2]), 4)
    args = tuple(a.detach().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
                 for a in calls[0])
    result = torch.library.opcheck(torch.ops.memzoo.titans_mlp_chunks.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result
