"""ShortConvolution against a naive per-token loop: outputs, tails, chaining, packing, step, gradients."""

import pytest
import torch
import torch.nn.functional as F

from memzoo.models.layers.conv import ShortConvolution
from memzoo.testing import assert_close

C = 6
TOL = 1e-6


def naive(x, weight, bias, activation, tail=None):
    """One sequence ``x`` ``[L, C]``, token by token: y_t = act(sum_j w[:, j] x_{t-W+1+j} + b); float64.

    Returns the outputs ``[L, C]`` and the last W - 1 inputs (the tail, zero/incoming-tail filled).
    """
    W = weight.shape[1]
    past = list(tail.double().unbind(0)) if tail is not None else [torch.zeros(C, dtype=torch.float64)] * (W - 1)
    ys = []
    for t in range(x.shape[0]):
        past.append(x[t].double())
        acc = torch.zeros(C, dtype=torch.float64)
        for j in range(W):
            acc = acc + weight[:, j].double() * past[len(past) - W + j]
        if bias is not None:
            acc = acc + bias.double()
        ys.append(F.silu(acc) if activation == "silu" else acc)
    y = torch.stack(ys) if ys else torch.zeros(0, C, dtype=torch.float64)
    new_tail = torch.stack(past[len(past) - (W - 1):]) if W > 1 else torch.zeros(0, C, dtype=torch.float64)
    return y, new_tail


def make(W=4, activation="silu", bias=False):
    torch.manual_seed(0)
    conv = ShortConvolution(C, W, activation=activation, bias=bias)
    if bias:
        # A non-trivial bias (the init could leave it anywhere; make sure it matters).
        torch.nn.init.normal_(conv.bias)
    return conv


def rand(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


CONFIGS = [
    pytest.param(4, "silu", False, id="W4-silu"),
    pytest.param(4, None, True, id="W4-linear-bias"),
    pytest.param(2, "silu", True, id="W2-silu-bias"),
    pytest.param(3, None, False, id="W3-linear"),
    pytest.param(1, "silu", False, id="W1"),
]


@pytest.mark.parametrize("W,activation,bias", CONFIGS)
def test_forward_matches_naive_with_and_without_tail(W, activation, bias):
    conv = make(W, activation, bias)
    x = rand(3, 9, C)
    y, tail = conv(x)
    assert tail.shape == (3, W - 1, C)
    tails0 = rand(3, W - 1, C, seed=2)
    y2, tail2 = conv(x, tails0)
    for b in range(3):
        y_ref, t_ref = naive(x[b], conv.weight, conv.bias, activation)
        assert_close(y[b], y_ref.float(), TOL, f"fresh output row {b}")
        if W > 1:
            assert_close(tail[b], t_ref.float(), TOL, f"fresh tail row {b}")
        y_ref, t_ref = naive(x[b], conv.weight, conv.bias, activation, tails0[b])
        assert_close(y2[b], y_ref.float(), TOL, f"continued output row {b}")
        if W > 1:
            assert_close(tail2[b], t_ref.float(), TOL, f"continued tail row {b}")


@pytest.mark.parametrize("W,activation,bias", CONFIGS)
@pytest.mark.parametrize("cuts", [(1,), (1, 2), (1, 2, 3, 4, 5), (2, 3, 9), (7,)], ids=str)
def test_chained_equals_full_for_any_split(W, activation, bias, cuts):
    """Pieces shorter than W - 1 must carry the older part of the incoming tail forward."""
    conv, x = make(W, activation, bias), rand(2, 10, C)
    y_full, tail_full = conv(x)
    bounds, ys, tail = [0, *cuts, 10], [], None
    for a, b in zip(bounds[:-1], bounds[1:]):
        y, tail = conv(x[:, a:b], tail)
        ys.append(y)
    assert_close(torch.cat(ys, 1), y_full, TOL, "chained outputs")
    assert torch.equal(tail, tail_full)


@pytest.mark.parametrize("W,activation,bias", CONFIGS)
def test_step_equals_forward(W, activation, bias):
    conv, x = make(W, activation, bias), rand(2, 7, C)
    y_full, tail_full = conv(x)
    tail, ys = None, []
    for t in range(7):
        y_t, tail = conv.step(x[:, t], tail)
        ys.append(y_t)
    assert_close(torch.stack(ys, 1), y_full, TOL, "step outputs")
    assert torch.equal(tail, tail_full)


LENGTHS = [5, 0, 1, 2, 8, 3]


def packed(lengths, seed=3):
    x = rand(1, sum(lengths), C, seed=seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return x, cu


@pytest.mark.parametrize("with_tail", [False, True], ids=["fresh", "tail"])
@pytest.mark.parametrize("W,activation,bias", CONFIGS)
def test_packed_matches_naive_per_sequence(W, activation, bias, with_tail):
    """Windows stop at boundaries; short and empty sequences get right-aligned, filled tails."""
    conv = make(W, activation, bias)
    x, cu = packed(LENGTHS)
    tails0 = rand(len(LENGTHS), W - 1, C, seed=4) if with_tail else None
    y, tail = conv(x, tails0, cu_seqlens=cu)
    assert y.shape == x.shape and tail.shape == (len(LENGTHS), W - 1, C)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        y_ref, t_ref = naive(x[0, a:b], conv.weight, conv.bias, activation, None if tails0 is None else tails0[i])
        if b > a:
            assert_close(y[0, a:b], y_ref.float(), TOL, f"sequence {i} output")
        if W > 1:
            assert_close(tail[i], t_ref.float(), TOL, f"sequence {i} tail")


def _naive_loss(conv, x, cu, tails0, activation):
    out, tails = [], []
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        y, t = naive(x[0, a:b], conv.weight, conv.bias, activation, None if tails0 is None else tails0[i])
        out.append(y)
        tails.append(t)
    return _loss(torch.cat(out)[None], torch.stack(tails))


def _loss(y, tail):
    # Weight every element differently so that swapped or dropped gradient rows cannot cancel.
    wy = torch.linspace(-1, 2, y.numel(), dtype=torch.float64).view_as(y)
    wt = torch.linspace(0.5, -1.5, tail.numel(), dtype=torch.float64).view_as(tail)
    return (y.double() * wy).sum() + (tail.double() * wt).sum() + y.double().square().sum()


def _grads(params):
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("W,activation,bias", CONFIGS[:3])
def test_packed_gradients_match_naive(W, activation, bias):
    """Weight, bias, input and incoming-tail gradients with cu_seqlens (upstream bugs #955, #1140)."""
    conv = make(W, activation, bias)
    x, cu = packed(LENGTHS)
    x.requires_grad_()
    tails0 = rand(len(LENGTHS), W - 1, C, seed=4).requires_grad_()
    params = [x, tails0, *conv.parameters()]
    _loss(*conv(x, tails0, cu_seqlens=cu)).backward()
    got = _grads(params)
    for p in params:
        p.grad = None
    _naive_loss(conv, x, cu, tails0, activation).backward()
    for i, (g, p) in enumerate(zip(got, params)):
        assert_close(g, p.grad, 1e-5, f"gradient {i}")
        assert p.grad.abs().sum() > 0


@pytest.mark.parametrize("W,activation,bias", CONFIGS[:3])
def test_batched_chunked_gradients_match_naive(W, activation, bias):
    """B > 1 in pieces shorter than W - 1, the tail carried: gradients equal the one-pass oracle."""
    conv = make(W, activation, bias)
    x = rand(3, 7, C).requires_grad_()
    params = [x, *conv.parameters()]
    ys, tail = [], None
    for a, b in ((0, 1), (1, 3), (3, 4), (4, 7)):
        y, tail = conv(x[:, a:b], tail)
        ys.append(y)
    _loss(torch.cat(ys, 1), tail).backward()
    got = _grads(params)
    for p in params:
        p.grad = None
    refs = [naive(x[b], conv.weight, conv.bias, activation) for b in range(3)]
    _loss(torch.stack([r[0] for r in refs]), torch.stack([r[1] for r in refs])).backward()
    for i, (g, p) in enumerate(zip(got, params)):
        assert_close(g, p.grad, 1e-5, f"gradient {i}")


def test_packed_equals_separate():
    conv = make()
    x, cu = packed(LENGTHS)
    y, _ = conv(x, cu_seqlens=cu)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if b > a:
            assert_close(y[:, a:b], conv(x[:, a:b])[0], TOL, "packed sequence")


def test_dtype_follows_input():
    conv = make().to(torch.bfloat16)
    y, tail = conv(rand(2, 5, C).bfloat16(), torch.zeros(2, 3, C))
    assert y.dtype == tail.dtype == torch.bfloat16


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="kernel_size"):
        ShortConvolution(C, 0)
    with pytest.raises(ValueError, match="activation"):
        ShortConvolution(C, activation="relu")
    conv = make()
    with pytest.raises(ValueError, match="C=6"):
        conv(rand(1, 4, C + 1))
    with pytest.raises(ValueError, match="tail"):
        conv(rand(2, 4, C), torch.zeros(2, 4, C))
    x, cu = packed([2, 2])
    with pytest.raises(ValueError, match="tail"):
        conv(x, torch.zeros(1, 3, C), cu_seqlens=cu)
