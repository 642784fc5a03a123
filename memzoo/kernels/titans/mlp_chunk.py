"""The chunked dual form of the 2-layer MLP Titans memory: the PyTorch path of ``titans_mlp`` (README, "MLP memory").

Paper: "Titans: Learning to Memorize at Test Time" (arXiv 2501.00663), eqs 13-18, with TTT's dual form
(arXiv 2407.04620) for the reads.  Per chunk of b tokens with start weights (A1, A2), momenta (S1, S2) and gradient
base (B1, B2), one MLP backward over the chunk's keys at the base gives the error rows G_z, G_h (and the key
activations A = gelu(K B2)); every read and the chunk-end state are then matmuls against them:

    H_q = beta Q A2 + f Q S2 - (G^(2) * QK^T) G_h,    A_q = gelu(H_q)
    Z_q = beta A_q A1 + f A_q S1 - (G^(1) * A_q A^T) G_z,    y = q + LN(Z_q)
    A1' = beta_b A1 + f_b S1 - A^T diag(G^(1)_b) G_z,  S1' = m_b S1 - A^T diag(N^(1)_b) G_z   (A2: K, G_h)

Only the chunk-to-chunk state walk is sequential.  ``_MLPChunks`` runs it without autograd, keeping each chunk's
start state (the only per-chunk state stored), then reads every chunk at once with batched matmuls; its backward
does the reads' backward batched, then walks the chunks in reverse carrying the state gradient through the linear
update, the reads' state gradients and the base backward's own (second-order) gradient, all by hand.  Internally
both matrices are kept as ``[E, D]`` (A1 and A2^T) with the momentum beside the weights, ``X = [W | S]``
``[2, ..., E, 2D]`` (matrix first), so one batched product updates weights and momenta.  The Triton path
(``impl="triton"``) runs the walk and reads in ``triton_mlp.py`` and, in its backward, the reverse walk in
``triton_mlp_bwd.py`` (the reads' backward stays batched here, ``_reads_backward``); the PyTorch walk is its reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import (
    LN_EPS,
    MIRAS_L2,
    Miras,
    _acc,
    _coefficients,
    _from_grid,
    _gelu_grad,
    _retain_completed,
    _to_grid,
    layer_norm,
    layer_norm_backward,
)

__all__ = ["titans_mlp_chunk_ref", "mlp_chunked", "triton_walk"]


def _base_pass(k: Tensor, v: Tensor, b1: Tensor, b2t: Tensor, miras: Miras):
    """One chunk's backward of 1/2 ||M(k) - v||^2 (psi on the residual) at the base (B1 ``[N, H, E, D]``, B2^T).

    Returns the outputs act = gelu(h), g_z, g_h = u * gelu'(h) and the intermediates h = k B2, z = act B1,
    u = g_z B1^T that ``_base_pass_vjp`` reads.
    """
    h = k @ b2t.mT  # [N, H, b, E]
    act = F.gelu(h)
    z = act @ b1  # [N, H, b, D]
    g_z = layer_norm_backward(z, miras.error(k + layer_norm(z) - v))
    u = g_z @ b1.mT
    return act, g_z, u * _gelu_grad(h), h, z, u


def _base_factors(k: Tensor, v: Tensor, h: Tensor, z: Tensor, u: Tensor, miras: Miras):
    """The parts of ``_base_pass_vjp`` that need no cotangent, for every chunk at once: gelu'(h), u gelu''(h),
    rstd and y = LN(z), e = psi(r), psi'(r) and mean(e y) (r = k + y - v)."""
    mu = z.mean(-1, keepdim=True)
    rstd = torch.rsqrt((z - mu).pow(2).mean(-1, keepdim=True) + LN_EPS)
    y = (z - mu) * rstd
    r = k + y - v
    e = miras.error(r)
    u2 = u * torch.exp(-0.5 * h * h) * (0.3989422804014327 * (2 - h * h))
    return _gelu_grad(h), u2, rstd, y, e, miras.error_grad(r), (e * y).mean(-1, keepdim=True)


def _base_pass_vjp(k, b1, b2t, act, g_z, factors, d_act, d_gz, d_gh):
    """The vector-Jacobian product of ``_base_pass`` (second order in the MLP), by hand; ``factors`` from
    ``_base_factors``.

    With g_z = LN_bwd(z, e) = rstd (e - mean(e) - y m), y = LN(z), m = mean(e y), e = psi(r), r = k + y - v, and
    LN's Jacobian J = rstd (I - 11^T/D - y y^T/D) (symmetric): a cotangent G of g_z gives e-bar = J G and
    z-bar = J (r-bar - rstd (m G + mean(G y) e)) - rstd mean(G g_z) y, r-bar = psi'(r) e-bar.
    Returns the gradients of k (without its share through g_h's product with B2, added here), v, B1, B2^T.
    """
    s, u2, rstd, y, e, dpsi, m = factors
    d_u = d_gh * s
    d_gz = d_gz + d_u @ b1  # [N, H, b, D]
    gy = (d_gz * y).mean(-1, keepdim=True)
    d_r = dpsi * (rstd * (d_gz - d_gz.mean(-1, keepdim=True) - y * gy))
    inner = d_r - rstd * (m * d_gz + gy * e)
    d_z = rstd * (inner - inner.mean(-1, keepdim=True) - y * ((inner * y).mean(-1, keepdim=True)
                                                             + (d_gz * g_z).mean(-1, keepdim=True)))
    d_h = (d_act + d_z @ b1.mT) * s + d_gh * u2
    d_b1 = d_u.mT @ g_z + act.mT @ d_z
    return d_r + d_h @ b2t, -d_r, d_b1, d_h.mT @ k


def _update_operands(act: Tensor, g_z: Tensor, g_h: Tensor, k: Tensor, g_end: Tensor, n_end: Tensor):
    """The rank-b update of one chunk, ``X' = scale X + shift - lhs^T rhs``.

    act, g_h ``[N, H, b, E]``; g_z, k ``[N, H, b, D]``; g_end, n_end ``[2, N, H, b]`` (the chunk-end rows of
    G = Lam N and N per matrix).  Returns lhs ``[2, N, H, b, E]``, rows ``[2, N, H, b, D]`` and
    rhs = [g_end * rows | n_end * rows] ``[2, N, H, b, 2D]``.
    """
    lhs = torch.stack((act, g_h))
    rows = torch.stack((g_z, k))
    rhs = torch.cat((rows * g_end[..., None], rows * n_end[..., None]), -1)
    return lhs, rows, rhs


def _weights_after(x: Tensor, lhs: Tensor, rhs: Tensor, scale: Tensor, f_end: Tensor, out: Tensor) -> Tensor:
    """Write ``X' = [beta_b W + f_b S | m_b S] - lhs^T rhs`` into ``out`` ``[2, N, H, E, 2D]``."""
    D = x.shape[-1] // 2
    torch.mul(x, scale, out=out)
    for i in range(2):
        out[i].flatten(0, 1).baddbmm_(lhs[i].mT.flatten(0, 1), rhs[i].flatten(0, 1), alpha=-1)
    out[..., :D].addcmul_(f_end, x[..., D:])
    return out


def _chunks_forward(qq, m2, g1, k, v, x0, base0, ends, g_end, n_end, next_chunk, miras):
    """The walk over chunks and the reads.

    Inputs (chunk first, ``[NC, N, H, b, ...]``): qq = [beta Q | f Q] ``[.., 2D]``, m2 = G^(2) * QK^T and
    g1 = G^(1) ``[.., b]``, k, v ``[.., D]``; x0 ``[2, N, H, E, 2D]``; base0 ``[2, N, H, E, D]``; ends
    ``[NC, N, H, 3]`` = (beta_b, f_b, m_b); g_end, n_end ``[NC, 2, N, H, b]``; next_chunk ``[N]``; miras.
    Returns p = A_q [A1 | S1] ``[NC, N, H, b, 2D]`` and corr = (G^(1) * A_q A^T) G_z ``[NC, N, H, b, D]`` (so
    Z_q = beta p_W + f p_S - corr), the final state ``[2, N, H, E, 2D]``, the gradient base of the next token
    ``[2, N, H, E, D]`` (the start of the chunk holding it), then what the backward reads: every chunk's start
    state ``[2, NC + 1, N, H, E, 2D]``, act, g_z, g_h, h, z, u (base pass) and h_q, a_q (reads).
    """
    NC, N, H, b, D = k.shape
    E = x0.shape[-2]
    xs = x0.new_empty(2, NC + 1, N, H, E, 2 * D)
    act, g_h = k.new_empty(NC, N, H, b, E), k.new_empty(NC, N, H, b, E)
    g_z, z = k.new_empty(NC, N, H, b, D), k.new_empty(NC, N, H, b, D)
    h, u = k.new_empty(NC, N, H, b, E), k.new_empty(NC, N, H, b, E)
    scale = _scale(ends, D)
    xs[:, 0] = x0
    base = base0
    for c in range(NC):
        act[c], g_z[c], g_h[c], h[c], z[c], u[c] = _base_pass(k[c], v[c], base[0], base[1], miras)
        lhs, _, rhs = _update_operands(act[c], g_z[c], g_h[c], k[c], g_end[c], n_end[c])
        x = _weights_after(xs[:, c], lhs, rhs, scale[c], ends[c, ..., 1, None, None], xs[:, c + 1])
        if miras.retention != "l2":
            x[..., :D] = _retain_completed(miras, x[..., :D], next_chunk, c)
        base = x[..., :D]
    n = torch.arange(N, device=k.device)
    base_end = torch.where((next_chunk == 0).view(-1, 1, 1, 1), base0, xs[:, next_chunk, n, ..., :D])
    # The reads of every chunk at once, against its start state.
    h_q = qq @ xs[1, :NC].mT - m2 @ g_h  # [NC, N, H, b, E]
    a_q = F.gelu(h_q)
    p = a_q @ xs[0, :NC]  # [NC, N, H, b, 2D]
    corr = (g1 * (a_q @ act.mT)) @ g_z  # [NC, N, H, b, D]
    return p, corr, xs[:, NC].clone(), base_end, xs, act, g_z, g_h, h, z, u, h_q, a_q


def _reads_backward(qq, m2, g1, xs, act, g_z, g_h, h_q, a_q, d_p, d_corr):
    """The reads' backward, every chunk at once (only their state gradients wait for the reverse walk): d qq, d m2,
    d g1, and the cotangents d G_z, d H_q, d act, d G_h the walk takes."""
    NC = qq.shape[0]
    s1 = a_q @ act.mT  # [NC, N, H, b, b]
    d_mask = d_corr @ g_z.mT
    d_g1, d_s1 = d_mask * s1, d_mask * g1
    d_gz = (g1 * s1).mT @ d_corr
    d_hq = (d_p @ xs[0, :NC].mT + d_s1 @ act) * _gelu_grad(h_q)
    d_act = d_s1.mT @ a_q
    d_qq = d_hq @ xs[1, :NC]
    d_m2 = -(d_hq @ g_h.mT)
    d_gh = -(m2.mT @ d_hq)
    return d_qq, d_m2, d_g1, d_gz, d_hq, d_act, d_gh


def _chunks_backward(qq, m2, g1, k, v, base0, ends, g_end, n_end, next_chunk, xs, act, g_z, g_h, h, z, u, h_q, a_q,
                     d_p, d_corr, d_end, d_base_end, miras):
    """The gradients of ``_chunks_forward``'s inputs (qq, m2, g1, k, v, x0, base0, ends, g_end, n_end)."""
    NC, D = k.shape[0], k.shape[-1]
    d_qq, d_m2, d_g1, d_gz, d_hq, d_act, d_gh = _reads_backward(qq, m2, g1, xs, act, g_z, g_h, h_q, a_q, d_p, d_corr)
    factors = _base_factors(k, v, h, z, u, miras)
    scale = _scale(ends, D)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    d_ends, d_gend, d_nend = torch.empty_like(ends), torch.empty_like(g_end), torch.empty_like(n_end)

    # The returned base is the start of chunk next_chunk (the initial base where that is 0): rows by chunk.
    rows_at = [[] for _ in range(NC + 1)]
    for n, c in enumerate(next_chunk.tolist()):
        rows_at[c].append(n)
    carry = d_end.clone()  # d of the state after chunk c (= before chunk c + 1)
    carry[:, rows_at[NC], ..., :D] += d_base_end[:, rows_at[NC]]
    dx, prod = torch.empty_like(carry), torch.empty_like(carry)
    for c in reversed(range(NC)):
        x = xs[:, c]
        lhs, rows, rhs = _update_operands(act[c], g_z[c], g_h[c], k[c], g_end[c], n_end[c])
        f_end = ends[c, ..., 1, None, None]
        if miras.retention != "l2":
            w = _weights_after(x, lhs, rhs, scale[c], f_end, prod)[..., :D]
            done = (next_chunk > c).view(-1, 1, 1, 1)
            carry[..., :D] = torch.where(done, miras.retain_vjp(w, carry[..., :D]), carry[..., :D])
        d_lhs = -(rhs @ carry.mT)  # [2, N, H, b, E]
        d_rhs = -(lhs @ carry)  # [2, N, H, b, 2D]
        d_gend[c] = (d_rhs[..., :D] * rows).sum(-1)
        d_nend[c] = (d_rhs[..., D:] * rows).sum(-1)
        d_rows = d_rhs[..., :D] * g_end[c, ..., None] + d_rhs[..., D:] * n_end[c, ..., None]
        # d beta_b, d f_b, d m_b: <dW', W>, <dW', S>, <dS', S> summed over both matrices.
        torch.mul(carry, x, out=prod)
        d_ends[c, ..., 0::2] = prod.unflatten(-1, (2, D)).sum((0, -3, -1))
        torch.mul(carry[..., :D], x[..., D:], out=prod[..., :D])
        d_ends[c, ..., 1] = prod[..., :D].sum((0, -2, -1))
        torch.mul(carry, scale[c], out=dx)
        dx[0].flatten(0, 1).baddbmm_(a_q[c].mT.flatten(0, 1), d_p[c].flatten(0, 1))
        dx[1].flatten(0, 1).baddbmm_(d_hq[c].mT.flatten(0, 1), qq[c].flatten(0, 1))
        dx[..., D:].addcmul_(f_end, carry[..., :D])
        base = base0 if c == 0 else x[..., :D]
        dk_c, dv[c], d_b1, d_b2 = _base_pass_vjp(k[c], base[0], base[1], act[c], g_z[c], [x[c] for x in factors],
                                                 d_act[c] + d_lhs[0], d_gz[c] + d_rows[0], d_gh[c] + d_lhs[1])
        dk[c] = dk_c + d_rows[1]
        d_base = d_base0 = torch.stack((d_b1, d_b2)) if c == 0 else dx[..., :D]
        if c > 0:
            d_base[0] += d_b1
            d_base[1] += d_b2
        d_base[:, rows_at[c]] += d_base_end[:, rows_at[c]]
        carry, dx = dx, carry
    return [d_qq, d_m2, d_g1, dk, dv, carry, d_base0, d_ends, d_gend, d_nend]


def _miras_args(miras: Miras) -> tuple:
    return miras.error_map, miras.p, miras.lp_eps, miras.huber_delta, miras.retention, miras.q, miras.lq_eps


# Custom ops, so that torch.compile sees one opaque call (no graph break in the chunk walk) with its backward.
@torch.library.custom_op("memzoo::titans_mlp_chunks", mutates_args=())
def _chunks_op(qq: Tensor, m2: Tensor, g1: Tensor, k: Tensor, v: Tensor, x0: Tensor, base0: Tensor, ends: Tensor,
               g_end: Tensor, n_end: Tensor, next_chunk: Tensor, error_map: str, p: float, lp_eps: float,
               huber_delta: float, retention: str, q: float, lq_eps: float) -> list[Tensor]:
    miras = Miras(error_map, p, lp_eps, huber_delta, retention, q, lq_eps)
    return list(_chunks_forward(qq, m2, g1, k, v, x0, base0, ends, g_end, n_end, next_chunk, miras))


@_chunks_op.register_fake
def _(qq, m2, g1, k, v, x0, base0, ends, g_end, n_end, next_chunk, *miras):
    NC, N, H, b, D = k.shape
    E = x0.shape[-2]
    hidden = [k.new_empty(NC, N, H, b, E) for _ in range(6)]
    return [torch.empty_like(qq), torch.empty_like(k), torch.empty_like(x0), torch.empty_like(base0),
            x0.new_empty(2, NC + 1, N, H, E, 2 * D), hidden[0], torch.empty_like(k), hidden[1], hidden[2],
            torch.empty_like(k), hidden[3], hidden[4], hidden[5]]


@torch.library.custom_op("memzoo::titans_mlp_chunks_bwd", mutates_args=())
def _chunks_bwd_op(qq: Tensor, m2: Tensor, g1: Tensor, k: Tensor, v: Tensor, base0: Tensor, ends: Tensor,
                   g_end: Tensor, n_end: Tensor, next_chunk: Tensor, xs: Tensor, act: Tensor, g_z: Tensor,
                   g_h: Tensor, h: Tensor, z: Tensor, u: Tensor, h_q: Tensor, a_q: Tensor, d_p: Tensor,
                   d_corr: Tensor, d_end: Tensor, d_base_end: Tensor, error_map: str, p: float, lp_eps: float,
                   huber_delta: float, retention: str, q: float, lq_eps: float) -> list[Tensor]:
    miras = Miras(error_map, p, lp_eps, huber_delta, retention, q, lq_eps)
    return _chunks_backward(qq, m2, g1, k, v, base0, ends, g_end, n_end, next_chunk, xs, act, g_z, g_h, h, z, u,
                            h_q, a_q, d_p, d_corr, d_end, d_base_end, miras)


@_chunks_bwd_op.register_fake
def _(qq, m2, g1, k, v, base0, ends, g_end, n_end, next_chunk, xs, *rest):
    return [torch.empty_like(x) for x in (qq, m2, g1, k, v, xs[:, 0], base0, ends, g_end, n_end)]


def _setup_context(ctx, inputs, output):
    qq, m2, g1, k, v, x0, base0, ends, g_end, n_end, next_chunk = inputs[:11]
    ctx.save_for_backward(qq, m2, g1, k, v, base0, ends, g_end, n_end, next_chunk, *output[4:])
    ctx.miras = inputs[11:]
    # The outputs past the fourth are saved for the backward only: no zero gradients for them.
    ctx.set_materialize_grads(False)


def _backward(ctx, grads):
    saved = ctx.saved_tensors
    d_p, d_corr = (torch.zeros_like(x) if d is None else d for d, x in ((grads[0], saved[0]), (grads[1], saved[3])))
    d_end = torch.zeros_like(saved[10][:, 0]) if grads[2] is None else grads[2]
    d_base_end = torch.zeros_like(saved[5]) if grads[3] is None else grads[3]
    return (*_chunks_bwd_op(*saved, d_p, d_corr, d_end, d_base_end, *ctx.miras), None, *(None,) * 7)


_chunks_op.register_autograd(_backward, setup_context=_setup_context)


def _scale(ends: Tensor, D: int) -> Tensor:
    """``[NC, N, H, 1, 2D]``: beta_b on the weight columns of X, m_b on the momentum columns."""
    return ends[..., [0, 2]].repeat_interleave(D, -1)[..., None, :]


def _recompute_hidden(qq: Tensor, m2: Tensor, k: Tensor, v: Tensor, base0: Tensor, xs: Tensor, miras: Miras):
    """The base pass and hidden reads of every chunk at once from the stored chunk-start states ``xs`` (what
    ``_chunks_forward`` keeps for the backward): act, g_z, g_h, h, z, u, h_q, a_q."""
    NC, D = k.shape[0], k.shape[-1]
    bases = torch.cat((base0[:, None], xs[:, 1:NC, ..., :D]), 1)  # [2, NC, N, H, E, D]
    act, g_z, g_h, h, z, u = _base_pass(k, v, bases[0], bases[1], miras)
    h_q = qq @ xs[1, :NC].mT - m2 @ g_h
    return act, g_z, g_h, h, z, u, h_q, F.gelu(h_q)


# The Triton walk (``triton_mlp.py``): the same inputs and first outputs as ``_chunks_op`` and the same backward,
# which recomputes the base pass and hidden reads from the chunk-start states the kernel stored.
@torch.library.custom_op("memzoo::titans_mlp_chunks_triton", mutates_args=())
def _triton_chunks_op(qq: Tensor, m2: Tensor, g1: Tensor, k: Tensor, v: Tensor, x0: Tensor, base0: Tensor,
                      ends: Tensor, g_end: Tensor, n_end: Tensor, next_chunk: Tensor, n_real: Tensor, error_map: str,
                      p: float, lp_eps: float, huber_delta: float, retention: str, q: float, lq_eps: float,
                      dtype: torch.dtype, precision: str, store: bool) -> list[Tensor]:
    from .triton_mlp import titans_mlp_walk_triton

    miras = Miras(error_map, p, lp_eps, huber_delta, retention, q, lq_eps)
    return titans_mlp_walk_triton(qq, m2, g1, k, v, x0, base0, ends, g_end, n_end, next_chunk, n_real, miras, dtype,
                                  precision, store)


@_triton_chunks_op.register_fake
def _(qq, m2, g1, k, v, x0, base0, ends, g_end, n_end, next_chunk, n_real, *args):
    NC, N, H, b, D = k.shape
    slots = NC + 1 if args[-1] else 2
    return [torch.empty_like(qq), torch.empty_like(k), torch.empty_like(x0), torch.empty_like(base0),
            x0.new_empty(2, slots, N, H, x0.shape[-2], 2 * D)]


def _triton_setup_context(ctx, inputs, output):
    qq, m2, g1, k, v, x0, base0, ends, g_end, n_end, next_chunk = inputs[:11]
    ctx.save_for_backward(qq, m2, g1, k, v, base0, ends, g_end, n_end, next_chunk, output[4])
    ctx.miras = inputs[12:19]
    ctx.dots = inputs[19:21]
    ctx.stored = inputs[21]
    ctx.set_materialize_grads(False)


# The Triton backward: the base pass and hidden reads recomputed batched from the stored chunk-start states, the
# reads' backward batched (``_reads_backward``), the reverse walk on the kernel (``triton_mlp_bwd.py``).
@torch.library.custom_op("memzoo::titans_mlp_chunks_triton_bwd", mutates_args=())
def _triton_chunks_bwd_op(qq: Tensor, m2: Tensor, g1: Tensor, k: Tensor, v: Tensor, base0: Tensor, ends: Tensor,
                          g_end: Tensor, n_end: Tensor, next_chunk: Tensor, xs: Tensor, d_p: Tensor, d_corr: Tensor,
                          d_end: Tensor, d_base_end: Tensor, error_map: str, p: float, lp_eps: float,
                          huber_delta: float, retention: str, q: float, lq_eps: float, dtype: torch.dtype,
                          precision: str) -> list[Tensor]:
    from .triton_mlp_bwd import titans_mlp_walk_bwd_triton

    miras = Miras(error_map, p, lp_eps, huber_delta, retention, q, lq_eps)
    act, g_z, g_h, h, z, u, h_q, a_q = _recompute_hidden(qq, m2, k, v, base0, xs, miras)
    d_qq, d_m2, d_g1, d_gz, d_hq, d_act, d_gh = _reads_backward(qq, m2, g1, xs, act, g_z, g_h, h_q, a_q, d_p, d_corr)
    walk = titans_mlp_walk_bwd_triton(qq, k, xs, base0, ends, g_end, n_end, next_chunk, act, g_z, g_h, a_q, d_p,
                                      d_hq, d_act, d_gh, d_gz, _base_factors(k, v, h, z, u, miras), d_end,
                                      d_base_end, miras, dtype, precision)
    return [d_qq, d_m2, d_g1, *walk]


@_triton_chunks_bwd_op.register_fake
def _(qq, m2, g1, k, v, base0, ends, g_end, n_end, next_chunk, xs, *rest):
    return [torch.empty_like(x) for x in (qq, m2, g1, k, v, xs[:, 0], base0, ends, g_end, n_end)]


def _triton_backward(ctx, grads):
    if not ctx.stored:
        raise RuntimeError("titans_mlp: the Triton forward ran without storing chunk states (no input required "
                           "grad at the call); rerun it with grad enabled")
    qq, m2, g1, k, v, base0, ends, g_end, n_end, next_chunk, xs = ctx.saved_tensors
    d_p = torch.zeros_like(qq) if grads[0] is None else grads[0]
    d_corr = torch.zeros_like(k) if grads[1] is None else grads[1]
    d_end = torch.zeros_like(xs[:, 0]) if grads[2] is None else grads[2]
    d_base_end = torch.zeros_like(base0) if grads[3] is None else grads[3]
    d = _triton_chunks_bwd_op(qq, m2, g1, k, v, base0, ends, g_end, n_end, next_chunk, xs, d_p, d_corr, d_end,
                              d_base_end, *ctx.miras, *ctx.dots)
    return (*d, None, None, *(None,) * 10)


_triton_chunks_op.register_autograd(_triton_backward, setup_context=_triton_setup_context)


def _ref_walk(qq, m2, g1, k, v, x0, base0, ends, g_end, n_end, next_chunk, n_real, miras):
    return _chunks_op(qq, m2, g1, k, v, x0, base0, ends, g_end, n_end, next_chunk, *_miras_args(miras))[:4]


def triton_walk(dtype: torch.dtype, precision: str):
    """The walk of ``mlp_chunked`` on the Triton kernel, dots in ``dtype`` (the inputs' dtype) at ``precision``."""
    def walk(qq, m2, g1, k, v, x0, base0, ends, g_end, n_end, next_chunk, n_real, miras):
        inputs = (qq, m2, g1, k, v, x0, base0, ends, g_end, n_end)
        store = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
        return _triton_chunks_op(*(x.contiguous() for x in inputs), next_chunk, n_real, *_miras_args(miras),
                                 dtype, precision, store)[:4]
    return walk


def titans_mlp_chunk_ref(q: Tensor, k: Tensor, v: Tensor, theta1: Tensor, theta2: Tensor, log_eta: Tensor,
                         log_gamma: Tensor, initial_state: tuple[Tensor, ...], start_pos: Tensor, chunk_size: int,
                         cu_seqlens: Tensor | None = None, *,
                         miras: Miras = MIRAS_L2) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The chunked dual form of the MLP memory; arguments and returns as ``titans_mlp_step_ref``.

    A Miras error map replaces the residual in the base backward (G_z, G_h); an "lq" retention maps A1 and A2 at
    every completed chunk.
    """
    return mlp_chunked(q, k, v, theta1, theta2, log_eta, log_gamma, initial_state, start_pos, chunk_size, cu_seqlens,
                       miras, _ref_walk)


def mlp_chunked(q: Tensor, k: Tensor, v: Tensor, theta1: Tensor, theta2: Tensor, log_eta: Tensor, log_gamma: Tensor,
                initial_state: tuple[Tensor, ...], start_pos: Tensor, chunk_size: int, cu_seqlens: Tensor | None,
                miras: Miras, walk) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The chunked dual form around a chunk ``walk`` (``_ref_walk`` or ``triton_walk(...)``): the grid of chunks,
    the in-chunk coefficients and the output LayerNorm in PyTorch (autograd), the walk and reads in ``walk``."""
    if miras.retention == "kl":
        raise ValueError("retention='kl' is defined for the linear memory only")
    acc = _acc(q)
    B, T = q.shape[:2]
    xs = tuple(x.to(acc) for x in (q, k, v, theta1, theta2, log_eta, log_gamma[..., None]))
    grids, valid, next_chunk, where = _to_grid(xs, start_pos, chunk_size, cu_seqlens)
    lengths = (torch.full((B,), T, device=q.device) if cu_seqlens is None
               else cu_seqlens[1:].to(q.device) - cu_seqlens[:-1].to(q.device))
    n_real = (start_pos.to(q.device, torch.int64) + lengths + chunk_size - 1) // chunk_size
    # Chunk first: [NC, N, H, b, ...].
    q, k, v, th1, th2, log_eta, lg = (x.movedim(2, 0).contiguous() for x in grids)
    lam, eta_prod, m, beta = _coefficients(log_eta, lg, valid.movedim(2, 0))
    lam = lam[..., 0]  # [NC, N, H, b, b]
    nm1, nm2 = eta_prod * th1[..., None, :], eta_prod * th2[..., None, :]
    f = lam @ m[..., None]  # [NC, N, H, b, 1]
    g1, g2 = lam @ nm1, lam @ nm2
    ends = torch.stack((beta[..., -1, 0], f[..., -1, 0], m[..., -1]), -1)  # [NC, N, H, 3]
    g_end = torch.stack((g1[..., -1, :], g2[..., -1, :]), 1)  # [NC, 2, N, H, b]
    n_end = torch.stack((nm1[..., -1, :], nm2[..., -1, :]), 1)
    b1, a1, s1, b2, a2, s2 = (x.to(acc) for x in initial_state)
    x0 = torch.stack((torch.cat((a1, s1), -1), torch.cat((a2.mT, s2.mT), -1)))  # [2, N, H, E, 2D]
    base0 = torch.stack((b1, b2.mT))  # [2, N, H, E, D]
    D = q.shape[-1]
    qq = torch.cat((beta * q, f * q), -1)  # [NC, N, H, b, 2D]
    p, corr, x_end, base = walk(qq, g2 * (q @ k.mT), g1, k, v, x0, base0, ends, g_end, n_end, next_chunk, n_real,
                                miras)
    z_q = beta * p[..., :D] + f * p[..., D:] - corr
    y = _from_grid((q + layer_norm(z_q)).movedim(0, 2), where, B, T)
    state = (base[0], x_end[0, ..., :D], x_end[0, ..., D:], base[1].mT, x_end[1, ..., :D].mT, x_end[1, ..., D:].mT)
    return y, tuple(s.contiguous() for s in state)
