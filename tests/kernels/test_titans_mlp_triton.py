"""The Triton forward and backward of the MLP Titans memory (interpreter) against the chunked dual form and the token
loop: outputs, all six final states and every gradient (the backward's reverse walk on its kernel, fed with the
forward kernel's stored chunk states; also compared alone with the PyTorch walk).  The kernels' algebra in float64
(the interpreter runs it at the input dtype) to 1e-12 for split chunks, varlen with empty and length-1 sequences and
every Miras variant; fp32 / TF32 / bf16 within rounding bounds; the no-grad path (two alternating state slots);
refusals."""

import pytest
import torch
from test_titans import mlp_inputs, objective

from memzoo.kernels.titans import Miras, titans_mlp, titans_mlp_chunk_ref, titans_mlp_step_ref
from memzoo.kernels.titans.mlp_chunk import mlp_chunked, triton_walk
from memzoo.testing import assert_close, rel_rms

pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def _seeded():
    # mlp_inputs draws part of the state from the global generator.
    torch.manual_seed(0)


def inputs(a1_scale=4.0, a2_scale=2.0, **kw):
    """``mlp_inputs`` with larger memory weights (the LayerNorm input near unit scale) and smaller learning rates:
    the recurrence amplifies rounding chunk by chunk, and the fp32 bounds are meant to see the kernel's error."""
    xs, state = mlp_inputs(**kw)
    xs[3], xs[4] = 0.3 * xs[3], 0.3 * xs[4]
    scales = (a1_scale,) * 3 + (a2_scale,) * 3
    return xs, tuple(c * s for c, s in zip(scales, state))


def _run(fn, leaves, start_pos, b, cu, grads, **kw):
    y, st = fn(*leaves[:7], tuple(leaves[7:]), start_pos, b, cu, **kw)
    g = torch.autograd.grad(objective(y.double(), [s.double() for s in st]), leaves) if grads else ()
    return [y, *st, *g]


def _round_tf32(x):
    bits = x.float().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).double()


def run_both(xs, state, start_pos, b, cu=None, *, dtype=torch.float32, precision="ieee", miras=None, grads=True):
    """Outputs, the six states and every gradient of: the kernel on ``dtype`` inputs (gates and states fp32), the
    chunked reference in float64 on the same values, and a rounding floor: the fp32 reference for exact fp32 dots,
    else the float64 reference with q, k, v and the initial states rounded to the dots' operand precision (bf16 /
    TF32), i.e. what rounding only the operands that enter the first dots does."""
    miras = miras or Miras()
    leaves = [x.to(dtype) if i < 3 else x.float() for i, x in enumerate(xs)] + [s.float() for s in state]
    tri = _run(titans_mlp, [x.detach().requires_grad_(grads) for x in leaves], start_pos, b, cu, grads,
               impl="triton", precision=precision, miras=miras)
    want = _run(titans_mlp_chunk_ref, [x.detach().double().requires_grad_(grads) for x in leaves], start_pos, b, cu,
                grads, miras=miras)
    if dtype == torch.float32 and precision == "ieee":
        rounded = [x.detach() for x in leaves]
    else:
        rnd = _round_tf32 if dtype == torch.float32 else (lambda x: x.to(dtype).double())
        rounded = [rnd(x) if i < 3 or i >= 7 else x.double() for i, x in enumerate(leaves)]
    floor = _run(titans_mlp_chunk_ref, [x.requires_grad_(grads) for x in rounded], start_pos, b, cu, grads,
                 miras=miras)
    return tri, want, floor


def check(got, want, floor, tol, factor=3.0, grad_tol=None):
    """Each tensor within ``tol`` (gradients: ``grad_tol``, default ``tol``) of float64 (relative RMS), or within
    ``factor`` x the floor's error where that is larger: the MLP recurrence (LayerNorm, second-order inner backward)
    amplifies rounding, so that some gradients move by more than ``tol`` when only the inputs are rounded."""
    names = ["output"] + [f"state {i}" for i in range(6)] + [f"gradient {i}" for i in range(len(got) - 7)]
    for i, (name, a, b) in enumerate(zip(names, got, want, strict=True)):
        bound = max(tol if i < 7 or grad_tol is None else grad_tol, factor * rel_rms(floor[i].double(), b))
        assert_close(a.double(), b, bound, name)


def _float64_case(name):
    """(inputs, state, start_pos, cu_seqlens) of the float64 exactness cases."""
    if name == "varlen":
        xs, state = inputs(B=1, T=40, D=16, E=32, seed=5)
        state = tuple(torch.cat([s] * 4) for s in state)
        return xs, state, torch.tensor([0, 4, 15, 7]), torch.tensor([0, 9, 9, 10, 40])
    T, E, starts = {"T1": (1, 32, (0, 0)), "T37": (37, 32, (0, 5)), "T50_E64": (50, 64, (15, 1))}[name]
    xs, state = inputs(T=T, D=16, E=E, seed=3)
    return xs, state, torch.tensor(starts), None


_MIRAS = {"l2": Miras(), "lp": Miras(error_map="lp", p=3.0), "huber": Miras(error_map="huber", huber_delta=0.5),
          "lq": Miras(retention="lq", q=3.0), "lp+lq": Miras(error_map="lp", p=2.5, retention="lq")}


@pytest.mark.parametrize("case,miras", [("T1", "l2"), ("T37", "l2"), ("T50_E64", "l2"), ("varlen", "l2"),
                                        *(("T37", m) for m in ("lp", "huber", "lq", "lp+lq"))], ids=str)
def test_triton_float64_equals_reference(case, miras):
    """The kernel run in float64 (interpreter): outputs, states and every gradient equal the chunked reference, which
    equals the token loop to 1e-12."""
    xs, state, start_pos, cu = _float64_case(case)
    miras = _MIRAS[miras]
    results = []
    for walk in (triton_walk(torch.float64, "ieee"), None):
        leaves = [x.clone().requires_grad_() for x in [*xs, *state]]
        if walk is None:
            y, st = titans_mlp_chunk_ref(*leaves[:7], tuple(leaves[7:]), start_pos, 16, cu, miras=miras)
        else:
            y, st = mlp_chunked(*leaves[:7], tuple(leaves[7:]), start_pos, 16, cu, miras, walk)
        results.append([y, *st, *torch.autograd.grad(objective(y, st), leaves)])
    names = ["output"] + [f"state {i}" for i in range(6)] + [f"gradient {i}" for i in range(len(leaves))]
    for name, a, b in zip(names, *results, strict=True):
        assert_close(a, b, 1e-12, name)


@pytest.mark.parametrize("T,E,starts", [(37, 32, (0, 5)), (50, 64, (15, 1))], ids=str)
def test_triton_equals_reference_fp32(T, E, starts):
    # Gradients: 1e-4 (the fp32 reference leaves up to 6e-6 of float64 here, the kernel up to 4e-5: its tile order
    # rounds differently and the recurrence amplifies it; the float64 test above holds the algebra to 1e-12).
    xs, state = inputs(T=T, D=16, E=E, seed=3)
    check(*run_both(xs, state, torch.tensor(starts), 16), 1e-5, grad_tol=1e-4)


def test_triton_equals_token_loop():
    xs, state = inputs(T=23, D=16, E=32, seed=4)
    sp = torch.tensor([0, 9])
    y, st = titans_mlp(*[x.float() for x in xs], tuple(s.float() for s in state), sp, 16, impl="triton",
                       precision="ieee")
    y64, st64 = titans_mlp_step_ref(*xs, state, sp, 16)
    assert_close(y.double(), y64, 1e-5, "output")
    for i, (a, b) in enumerate(zip(st, st64)):
        assert_close(a.double(), b, 1e-5, f"state {i}")


def test_triton_without_grad_equals_reference():
    """No input requires grad: the kernel keeps two alternating state slots instead of every chunk's."""
    xs, state = inputs(T=70, D=16, E=32, seed=6)
    check(*run_both(xs, state, torch.tensor([3, 0]), 16, grads=False), 1e-5)


def test_triton_varlen_fp32():
    xs, state, start_pos, cu = _float64_case("varlen")
    check(*run_both(xs, state, start_pos, 16, cu, miras=_MIRAS["lp+lq"]), 1e-5, grad_tol=1e-4)


@pytest.mark.parametrize("dtype,precision,tol,factor", [(torch.float32, "tf32", 5e-3, 4.0),
                                                         (torch.bfloat16, "tf32", 2e-2, 12.0)], ids=["tf32", "bf16"])
def test_triton_tf32_and_bf16_bounds(gpu_like_dots, dtype, precision, tol, factor):
    """gpu_like_dots: the interpreter rounds TF32 operands and multiplies bf16 ones as the GPU does.  The floor rounds
    q, k, v and the initial states only; the kernel rounds about ten operands per chunk (states, G_z, A, G_h, A_q,
    the coefficient masks) at that precision, hence the larger factor for bf16 (measured: up to ~9x)."""
    xs, state = inputs(T=37, D=32, E=64, seed=8)
    got, want, floor = run_both(xs, state, torch.tensor([0, 5]), 16, dtype=dtype, precision=precision)
    check(got, want, floor, tol, factor)
    if dtype == torch.float32:
        # The switch reaches the kernel: TF32 rounding moves the output off the exact fp32 one.
        y_ieee = run_both(xs, state, torch.tensor([0, 5]), 16, grads=False)[0][0]
        assert rel_rms(got[0].detach(), y_ieee) > 1e-6


def test_triton_refusals():
    xs, state = inputs(T=5, D=16, E=32)
    xs32, st32 = [x.float() for x in xs], tuple(s.float() for s in state)
    sp = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="chunk_size must be a power of two"):
        titans_mlp(*xs32, st32, sp, 8, impl="triton")
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        titans_mlp(*xs, state, sp, 16, impl="triton")
    with pytest.raises(ValueError, match="kl"):
        titans_mlp(*xs32, st32, sp, 16, impl="triton", miras=Miras(retention="kl"))
    xs, state = inputs(T=5, D=12, E=32)
    with pytest.raises(ValueError, match="head dim K"):
        titans_mlp(*[x.float() for x in xs], tuple(s.float() for s in state), sp, 16, impl="triton")
    xs, state = inputs(T=5, D=16, E=24)
    with pytest.raises(ValueError, match="hidden width E"):
        titans_mlp(*[x.float() for x in xs], tuple(s.float() for s in state), sp, 16, impl="triton")


def test_triton_walk_op_passes_opcheck(monkeypatch):
    """The Triton walk's custom op: schema, fake tensors, autograd registration and AOT dispatch."""
    import memzoo.kernels.titans.mlp_chunk as mlp_chunk

    calls = []
    op = mlp_chunk._triton_chunks_op
    monkeypatch.setattr(mlp_chunk, "_triton_chunks_op", lambda *args: calls.append(args) or op(*args))
    xs, state = inputs(T=20, D=16, E=32)
    leaves = [x.float().requires_grad_() for x in [*xs, *state]]
    titans_mlp(*leaves[:7], tuple(leaves[7:]), torch.tensor([0, 2]), 16, impl="triton")
    args = tuple(a.detach().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
                 for a in calls[0])
    result = torch.library.opcheck(torch.ops.memzoo.titans_mlp_chunks_triton.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("opts", [{}, {"error_map": "lp", "retention": "lq"}], ids=["titans", "lp_lq"])
def test_layer_on_the_kernel_equals_reference(opts):
    """The deep-memory layer with impl="triton" (the path "auto" takes on CUDA): outputs, memory and parameter
    gradients equal impl="ref"."""
    from memzoo.models import build_mixer

    layers = []
    for impl in ("triton", "ref"):
        torch.manual_seed(0)
        layers.append(build_mixer("titans", 32, {"n_heads": 2, "mem_depth": 2, "impl": impl, **opts}))
    x = torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(1))
    outs = [layer(x) for layer in layers]
    assert_close(outs[0][0], outs[1][0], 1e-5, "output")
    for a, b in zip(outs[0][1].memory, outs[1][1].memory):
        assert_close(a, b, 1e-5, "memory")
    grads = [torch.autograd.grad(objective(y, list(st.memory)), list(layer.parameters()))
             for layer, (y, st) in zip(layers, outs)]
    for (name, _), a, b in zip(layers[0].named_parameters(), *grads):
        assert_close(a, b, 1e-4, name)


def _walk_inputs(case, miras):
    """The inputs of the chunk walk (``mlp_chunked``'s call of its walk) for a float64 case, with the states the
    reference walk stores and the hidden quantities it keeps for its backward."""
    from memzoo.kernels.titans.mlp_chunk import _chunks_op, _miras_args, _ref_walk

    xs, state, start_pos, cu = _float64_case(case)
    args = []
    mlp_chunked(*xs, state, start_pos, 16, cu, miras, lambda *a: args.append(a) or _ref_walk(*a))
    qq, m2, g1, k, v, x0, base0, ends, g_end, n_end, next_chunk = args[0][:11]
    fwd = _chunks_op(qq, m2, g1, k, v, x0, base0, ends, g_end, n_end, next_chunk, *_miras_args(miras))
    return (qq, m2, g1, k, v, base0, ends, g_end, n_end, next_chunk), fwd[4:], _miras_args(miras)


@pytest.mark.parametrize("case,miras", [("T37", "l2"), ("T50_E64", "huber"), ("varlen", "lp+lq"), ("T37", "lq")],
                         ids=str)
def test_triton_reverse_walk_equals_pytorch_walk(monkeypatch, case, miras):
    """The backward op on the kernel's reverse walk against the PyTorch walk, float64, random cotangents (padding
    rows included): the gradients of all ten walk inputs (qq, m2, g1, k, v, initial state, initial base, chunk-end
    coefficients, chunk-end rows of G and N) to 1e-12; every output the kernel writes starts as NaN."""
    from memzoo.kernels.titans.mlp_chunk import _chunks_bwd_op, _triton_chunks_bwd_op

    inputs_, stored, margs = _walk_inputs(case, _MIRAS[miras])
    qq, k, base0, xs = inputs_[0], inputs_[3], inputs_[5], stored[0]
    gen = torch.Generator().manual_seed(2)
    cot = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in (qq, k, xs[:, 0], base0)]
    want = _chunks_bwd_op(*inputs_, *stored, *cot, *margs)
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda x, **kw: empty_like(x, **kw).fill_(float("nan")))
    got = _triton_chunks_bwd_op(*inputs_, xs, *cot, *margs, torch.float64, "ieee")
    monkeypatch.undo()
    names = ["qq", "m2", "g1", "k", "v", "x0", "base0", "ends", "g_end", "n_end"]
    for name, a, b in zip(names, got, want, strict=True):
        assert_close(a, b, 1e-12, name)


def test_triton_reverse_walk_op_passes_opcheck():
    """The backward's custom op: schema (inputs not mutated: the kernel overwrites only its own buffers), fake
    tensors and dispatch."""
    inputs_, stored, margs = _walk_inputs("T37", _MIRAS["lq"])
    gen = torch.Generator().manual_seed(3)
    qq, k, base0, xs = inputs_[0], inputs_[3], inputs_[5], stored[0]
    cot = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in (qq, k, xs[:, 0], base0)]
    args = (*inputs_, xs, *cot, *margs, torch.float64, "ieee")
    result = torch.library.opcheck(torch.ops.memzoo.titans_mlp_chunks_triton_bwd.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result
