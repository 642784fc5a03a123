"""Miras variants of the Titans memory ops (titans.md §5, arXiv 2504.13173): chunked forms == the token-loop
specification for every error map and retention (fp64, outputs, states, every gradient), the spec's identities,
a float64 oracle written here from the equations, and the dispatcher's refusals."""

import pytest
import torch
import torch.nn.functional as F
from test_titans import compare_with_grads, linear_inputs, mlp_inputs

from memzoo.kernels.titans import (
    MIRAS_L2,
    Miras,
    titans_linear,
    titans_linear_chunk_ref,
    titans_linear_step_ref,
    titans_mlp,
    titans_mlp_chunk_ref,
    titans_mlp_step_ref,
)
from memzoo.testing import assert_close

LINEAR_VARIANTS = {
    "lp3": Miras(error_map="lp", p=3.0),
    "lp1": Miras(error_map="lp", p=1.0, lp_eps=1e-2),
    "huber": Miras(error_map="huber", huber_delta=0.3),
    "lq4": Miras(retention="lq", q=4.0),
    "lp3_lq3": Miras(error_map="lp", p=3.0, retention="lq", q=3.0),
    "kl": Miras(retention="kl", kl_scale=2.0, kl_lambda=0.3),
    "huber_kl": Miras(error_map="huber", huber_delta=0.2, retention="kl"),
}
MLP_VARIANTS = {k: m for k, m in LINEAR_VARIANTS.items() if m.retention != "kl"}


def with_miras(fn, miras):
    return lambda *args: fn(*args, miras=miras)


def positive_state(state):
    """KL retention reads log W: give it weights with some entries below kl_eps as well."""
    return tuple(s.abs() + 0.05 if i < 2 else s for i, s in enumerate(state))


@pytest.mark.parametrize("name", LINEAR_VARIANTS)
@pytest.mark.parametrize("channel", [False, True], ids=["head_alpha", "channel_alpha"])
@pytest.mark.parametrize("b,T", [(1, 5), (4, 19), (16, 7), (5, 23)], ids=lambda x: str(x))
def test_linear_chunk_equals_step(name, channel, b, T):
    miras = LINEAR_VARIANTS[name]
    xs, state = linear_inputs(T=T, channel=channel)
    if miras.retention == "kl":
        state = positive_state(state)
    start_pos = torch.tensor([0, min(3, b - 1)])
    compare_with_grads(with_miras(titans_linear_chunk_ref, miras), with_miras(titans_linear_step_ref, miras),
                       xs, state, 1e-10, start_pos, b)


@pytest.mark.parametrize("name", ["lp3", "huber_kl", "lp3_lq3"])
def test_linear_varlen_chunk_equals_step(name):
    miras = LINEAR_VARIANTS[name]
    xs, state = linear_inputs(B=1, T=23, n_seq=4)
    if miras.retention == "kl":
        state = positive_state(state)
    cu = torch.tensor([0, 3, 3, 15, 23])
    start_pos = torch.tensor([1, 0, 2, 3])
    compare_with_grads(with_miras(titans_linear_chunk_ref, miras), with_miras(titans_linear_step_ref, miras),
                       xs, state, 1e-10, start_pos, 4, cu)


@pytest.mark.parametrize("name", MLP_VARIANTS)
@pytest.mark.parametrize("b,T", [(1, 5), (4, 19), (16, 7)], ids=lambda x: str(x))
def test_mlp_chunk_equals_step(name, b, T):
    miras = MLP_VARIANTS[name]
    xs, state = mlp_inputs(T=T)
    start_pos = torch.tensor([0, min(2, b - 1)])
    compare_with_grads(with_miras(titans_mlp_chunk_ref, miras), with_miras(titans_mlp_step_ref, miras),
                       xs, state, 1e-12, start_pos, b)


@pytest.mark.parametrize("name", ["l2", "lp3_lq3", "huber"])
def test_mlp_varlen_chunk_equals_step(name):
    """Packed rows that stop inside their first chunk, are empty, end on a chunk boundary and run past several
    chunks: the returned gradient base differs per row, and every gradient flows through it."""
    miras = MLP_VARIANTS.get(name, MIRAS_L2)
    xs, state = mlp_inputs(B=1, T=19)
    state = tuple(torch.cat((s, 0.5 * s, s.flip(-1), -s)) for s in state)
    cu = torch.tensor([0, 2, 2, 8, 19])
    start_pos = torch.tensor([1, 0, 2, 3])
    compare_with_grads(with_miras(titans_mlp_chunk_ref, miras), with_miras(titans_mlp_step_ref, miras),
                       xs, state, 1e-12, start_pos, 4, cu)


def run_linear(xs, state, b=4, miras=MIRAS_L2):
    return titans_linear_step_ref(*xs, state, torch.zeros(len(state[0]), dtype=torch.int64), b, miras=miras)


def test_variants_change_the_result():
    """Every variant is exercised on inputs where it differs from plain Titans (else the tests above prove little)."""
    xs, state = linear_inputs(T=13)
    state = positive_state(state)
    y_l2, _ = run_linear(xs, state)
    for name, miras in LINEAR_VARIANTS.items():
        y, _ = run_linear(xs, state, miras=miras)
        assert (y - y_l2).abs().max() > 1e-3, name


def test_lp2_is_twice_the_l2_update():
    xs, state = linear_inputs(T=1)
    w0 = state[1]
    zero_s = (state[0], w0, torch.zeros_like(w0))
    _, (_, w_l2, _) = run_linear(xs, zero_s)
    _, (_, w_lp, _) = run_linear(xs, zero_s, miras=Miras(error_map="lp", p=2.0, lp_eps=0.5))
    gamma = xs[5].exp()[:, 0, :, None, None]
    assert_close(w_lp - gamma * w0, 2 * (w_l2 - gamma * w0), 1e-14, "one update")
    # Over a whole sequence lp with p=2 is l2 with a doubled learning rate (theta only scales the update).
    xs, state = linear_inputs(T=19)
    y_lp, s_lp = run_linear(xs, state, miras=Miras(error_map="lp", p=2.0))
    y_l2, s_l2 = run_linear([*xs[:3], 2 * xs[3], *xs[4:]], state)
    assert_close(y_lp, y_l2, 1e-13, "lp p=2 vs 2 theta l2")
    for a, b in zip(s_lp, s_l2):
        assert_close(a, b, 1e-13, "state")


@pytest.mark.parametrize("delta", [float("inf"), 1e9])
def test_huber_with_infinite_delta_is_l2(delta):
    xs, state = linear_inputs(T=19)
    y_h, s_h = run_linear(xs, state, miras=Miras(error_map="huber", huber_delta=delta))
    y_l2, s_l2 = run_linear(xs, state)
    assert torch.equal(y_h, y_l2) and all(torch.equal(a, b) for a, b in zip(s_h, s_l2))


def test_l2_retention_is_the_titans_decay():
    """retention='l2' (and lq with q=2) is exactly the op without Miras options; the Titans decay itself is
    checked against the equations in test_titans.py and the layer's oracle."""
    xs, state = linear_inputs(T=19, channel=True)
    start_pos = torch.tensor([0, 2])
    y, s = titans_linear(*xs, state, start_pos, 4)
    y_l2, s_l2 = titans_linear(*xs, state, start_pos, 4, miras=Miras(retention="l2"))
    assert torch.equal(y, y_l2) and all(torch.equal(a, b) for a, b in zip(s, s_l2))
    y_q2, s_q2 = titans_linear(*xs, state, start_pos, 4, miras=Miras(retention="lq", q=2.0))
    assert torch.equal(y, y_q2) and all(torch.equal(a, b) for a, b in zip(s, s_q2))


def oracle_linear(xs, state, b, err_fn, retain_fn):
    """Eqs 13-15 with a Miras error map and a chunk-boundary retention, written from the equations per head."""
    q, k, v, theta, log_eta, log_gamma = xs
    B, T, H = theta.shape
    ys = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    finals = []
    for n in range(B):
        base, w, s = (x[n].clone() for x in state)
        for t in range(T):
            for h in range(H):
                r = k[n, t, h] @ base[h] - v[n, t, h]
                u = torch.outer(k[n, t, h], err_fn(r))
                s[h] = log_eta[n, t, h].exp() * s[h] - theta[n, t, h] * u
                w[h] = log_gamma[n, t, h].exp() * w[h] + s[h]
                ys[n, t, h] = q[n, t, h] @ w[h]
            if (t + 1) % b == 0:
                w = torch.stack([retain_fn(w[h]) for h in range(H)])
                base = w.clone()
        finals.append((base, w, s))
    return ys, tuple(torch.stack(f) for f in zip(*finals))


def smooth_lp(p, eps):
    # p sign(r) |r|^(p-1), sign(r) = r / |r| and |r| = sqrt(r^2 + eps).
    return lambda r: p * (r / (r * r + eps).sqrt()) * (r * r + eps).sqrt() ** (p - 1)


def huber(delta):
    return lambda r: torch.where(r.abs() <= delta, r, delta * torch.sign(r))


def lq_norm(q, eps):
    return lambda w: w / ((w.abs() ** q).sum() + eps) ** ((q - 2) / q)


def kl_softmax(c, lam, eps):
    return lambda w: c * torch.softmax((1 - lam) * torch.log(torch.where(w > eps, w, torch.full_like(w, eps))), -1)


@pytest.mark.parametrize("miras,err_fn,retain_fn", [
    (Miras(error_map="lp", p=3.0, lp_eps=1e-4), smooth_lp(3.0, 1e-4), lambda w: w),
    (Miras(error_map="lp", p=1.5, retention="lq", q=4.0), smooth_lp(1.5, 1e-6), lq_norm(4.0, 1e-6)),
    (Miras(error_map="huber", huber_delta=0.25), huber(0.25), lambda w: w),
    (Miras(error_map="huber", huber_delta=0.25, retention="kl", kl_scale=1.5, kl_lambda=0.2), huber(0.25),
     kl_softmax(1.5, 0.2, 1e-6)),
], ids=["lp3", "lp1.5_lq4", "huber", "huber_kl"])
def test_linear_equals_fp64_oracle(miras, err_fn, retain_fn):
    xs, state = linear_inputs(T=11)
    state = (state[1], state[1], state[2])
    if miras.retention == "kl":
        state = positive_state(state)
    y_ref, s_ref = oracle_linear(xs, state, 4, err_fn, retain_fn)
    y, s = titans_linear(*xs, state, torch.zeros(2, dtype=torch.int64), 4, miras=miras)
    assert_close(y, y_ref, 1e-12, "output")
    for a, b in zip(s, s_ref):
        assert_close(a, b, 1e-12, "state")


def test_mlp_huber_equals_autograd_oracle():
    """MLP memory: the inner gradient of the Huber loss by autograd (not the closed-form backward of the ops)."""
    xs, state = mlp_inputs(T=9)
    q, k, v, th1, th2, log_eta, log_gamma = xs
    delta, b = 0.2, 4
    b1, a1, s1, b2, a2, s2 = (x.clone() for x in state)
    b1, b2 = a1.clone(), a2.clone()
    ys = torch.zeros_like(v)
    for t in range(v.shape[1]):
        leaves = [b1.clone().requires_grad_(), b2.clone().requires_grad_()]
        z = F.gelu(k[:, t, :, None] @ leaves[1]) @ leaves[0]
        r = k[:, t, :, None] + F.layer_norm(z, (z.shape[-1],), eps=1e-5) - v[:, t, :, None]
        loss = torch.where(r.abs() <= delta, 0.5 * r * r, delta * (r.abs() - 0.5 * delta)).sum()
        g1, g2 = torch.autograd.grad(loss, leaves)
        eta, gamma = log_eta[:, t, :, None, None].exp(), log_gamma[:, t, :, None, None].exp()
        s1 = eta * s1 - th1[:, t, :, None, None] * g1
        s2 = eta * s2 - th2[:, t, :, None, None] * g2
        a1, a2 = gamma * a1 + s1, gamma * a2 + s2
        zq = F.gelu(q[:, t, :, None] @ a2) @ a1
        ys[:, t] = (q[:, t, :, None] + F.layer_norm(zq, (zq.shape[-1],), eps=1e-5))[:, :, 0]
        if (t + 1) % b == 0:
            b1, b2 = a1.clone(), a2.clone()
    start = (state[1], state[1], state[2], state[4], state[4], state[5])
    y, s = titans_mlp(*xs, start, torch.zeros(2, dtype=torch.int64), b, miras=Miras(error_map="huber",
                                                                                       huber_delta=delta))
    assert_close(y, ys, 1e-12, "output")
    for got, want in zip(s, (b1, a1, s1, b2, a2, s2)):
        assert_close(got, want, 1e-12, "state")


def test_dispatcher_refusals():
    xs, state = linear_inputs(T=5)
    start_pos = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="Triton kernel implements the l2"):
        titans_linear(*xs, state, start_pos, 4, impl="triton", miras=Miras(error_map="huber"))
    mxs, mstate = mlp_inputs(T=5)
    with pytest.raises(ValueError, match="linear memory only"):
        titans_mlp(*mxs, mstate, start_pos, 4, miras=Miras(retention="kl"))
    with pytest.raises(ValueError, match="error_map"):
        Miras(error_map="l3")
    with pytest.raises(TypeError, match="Miras"):
        titans_linear(*xs, state, start_pos, 4, miras="lp")


def test_auto_passes_variants_to_the_reference():
    """Under impl='auto' a variant must give the reference's result (never the kernel's plain Titans)."""
    xs, state = linear_inputs(T=9, dtype=torch.float32)
    miras = Miras(error_map="lp", retention="lq")
    start_pos = torch.zeros(2, dtype=torch.int64)
    y, _ = titans_linear(*xs, state, start_pos, 4, impl="auto", miras=miras)
    y_ref, _ = titans_linear_chunk_ref(*xs, state, start_pos, 4, miras=miras)
    assert torch.equal(y, y_ref.to(y.dtype))
