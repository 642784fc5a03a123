"""Titans neural long-term memory in plain PyTorch: the per-token specification and the exact chunked form.

Paper: "Titans: Learning to Memorize at Test Time" (Behrouz, Zhong, Mirrokni; arXiv 2501.00663), eqs 12-18.
Per head, with chunk size b and t' = the start of the chunk holding token t (mini-batch gradient descent):

    u_t = grad_W 1/2 ||M_{W_t'}(k_t) - v_t||^2      S_t = eta_t S_{t-1} - theta_t u_t
    W_t = (1 - alpha_t) W_{t-1} + S_t               y_t = M_{W_t}(q_t)           (read after the write)

Linear memory: M_W(x) = x W with W [K, V] (the state layout of every memzoo op, M^T of the paper), so
u_t = k_t^T (k_t W_t' - v_t).  MLP memory (depth 2): M(x) = x + LN(gelu(x A2) A1), A2 [D, E], A1 [E, D], LN
without affine, both matrices updated with their own theta and shared eta, alpha.

Gates arrive as theta >= 0, log_eta = log(eta) <= 0 and log_gamma = log(1 - alpha) <= 0 (``[B, T, H]``, or
``[B, T, H, K]`` for a per-key-channel decay of the linear memory).  States are tuples of fp32 tensors:
linear (W_base, W, S) each ``[N, H, K, V]``; MLP (A1_base, A1, S1, A2_base, A2, S2).  ``start_pos`` ``[N]`` is the
position of each sequence's first token inside its current chunk (0 for fresh sequences), so a sequence split
anywhere and carried through the state gives exactly the outputs of one pass.

Miras variants ("It's All Connected", arXiv 2504.13173; titans.md §5), passed as ``miras=Miras(...)``: an error map
psi replaces the residual r = M(k) - v before the backward through the memory (still at the chunk-start weights,
so the chunk form stays exact), and a non-linear retention acts on the weights only when a chunk ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils import seq_boundaries

__all__ = [
    "titans_linear_step_ref", "titans_linear_chunk_ref", "titans_mlp_step_ref",
    "layer_norm", "layer_norm_backward", "Miras", "MIRAS_L2",
]

LN_EPS = 1e-5


ERROR_MAPS = ("l2", "lp", "huber")
RETENTIONS = ("l2", "lq", "kl")


@dataclass(frozen=True)
class Miras:
    """Attentional bias (error map) and retention of the inner loop (titans.md §5).

    error_map, applied to each residual row r = M_{W_t'}(k) - v:
        "l2":    psi(r) = r (the Titans loss 1/2 ||r||^2);
        "lp":    psi(r) = p r (r^2 + lp_eps)^((p - 2) / 2), coordinate-wise: the gradient of ||r||_p^p,
                 p sign(r) |r|^(p-1), with |r| smoothed to sqrt(r^2 + lp_eps) (sign(r) = r / |r|).  p = 2 gives
                 exactly 2r; p = 1 is the smooth sign ("value-less");
        "huber": psi(r) = clamp(r, -huber_delta, huber_delta), coordinate-wise Huber (r where |r| <= delta, else
                 delta sign(r)); delta = inf is "l2".
    retention, applied to the weights (and so to the next gradient base) when a chunk ends; inside a chunk the
    Titans decay alpha and momentum act as usual:
        "l2":    nothing more (the Titans decay alone);
        "lq":    W <- W / (||W||_q^q + lq_eps)^((q - 2) / q) per head and weight matrix (Moneta's A / ||A||_q^(q-2));
                 q = 2 leaves W unchanged;
        "kl":    W <- kl_scale softmax((1 - kl_lambda) log max(W, kl_eps)) over each row of the linear memory
                 (the values stored for one key channel): Memora's c Softmax((1 - lambda) log W - eta' grad) with the
                 chunk's linear update in place of the gradient step.  Entries below kl_eps get no gradient.
    """

    error_map: str = "l2"
    p: float = 3.0
    lp_eps: float = 1e-6
    huber_delta: float = 1.0
    retention: str = "l2"
    q: float = 4.0
    lq_eps: float = 1e-6
    kl_scale: float = 1.0
    kl_lambda: float = 0.0
    kl_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.error_map not in ERROR_MAPS:
            raise ValueError(f"error_map must be one of {ERROR_MAPS}, got {self.error_map!r}")
        if self.retention not in RETENTIONS:
            raise ValueError(f"retention must be one of {RETENTIONS}, got {self.retention!r}")
        if not self.p >= 1 or math.isinf(self.p) or not self.lp_eps > 0:
            raise ValueError(f"lp needs a finite p >= 1 and lp_eps > 0, got p={self.p}, lp_eps={self.lp_eps}")
        if not self.huber_delta > 0:
            raise ValueError(f"huber_delta must be positive (inf for l2), got {self.huber_delta}")
        if not self.q > 1 or math.isinf(self.q) or not self.lq_eps > 0:
            raise ValueError(f"lq needs a finite q > 1 and lq_eps > 0, got q={self.q}, lq_eps={self.lq_eps}")
        if not self.kl_scale > 0 or not 0 <= self.kl_lambda < 1 or not self.kl_eps > 0:
            raise ValueError(f"kl needs kl_scale > 0, 0 <= kl_lambda < 1, kl_eps > 0, got {self.kl_scale}, "
                             f"{self.kl_lambda}, {self.kl_eps}")

    @property
    def is_titans(self) -> bool:
        """True when nothing differs from plain Titans (the l2 error and the l2 retention)."""
        return self.error_map == "l2" and self.retention == "l2"

    def error(self, r: Tensor) -> Tensor:
        """psi(r), coordinate-wise."""
        if self.error_map == "lp":
            return self.p * r * (r * r + self.lp_eps).pow((self.p - 2) / 2)
        if self.error_map == "huber":
            return r.clamp(-self.huber_delta, self.huber_delta)
        return r

    def error_grad(self, r: Tensor) -> Tensor:
        """psi'(r), coordinate-wise (the chunked form's hand-written backward needs it)."""
        if self.error_map == "lp":
            r2 = r * r
            return self.p * (r2 + self.lp_eps).pow((self.p - 4) / 2) * ((self.p - 1) * r2 + self.lp_eps)
        if self.error_map == "huber":
            return (r.abs() <= self.huber_delta).to(r.dtype)
        return torch.ones_like(r)

    def retain_vjp(self, w: Tensor, g: Tensor) -> Tensor:
        """The gradient of ``<g, retain(w)>`` with respect to ``w`` (lq and l2; the chunked MLP form's backward).

        lq: with n = sum |w|^q + lq_eps and c = n^(-(q - 2)/q), retain(w) = c w, so the gradient is
        c g - (q - 2) <g, w> n^(-(2q - 2)/q) |w|^(q - 2) w.
        """
        if self.retention == "kl":
            raise ValueError("retain_vjp covers the l2 and lq retentions")
        if self.retention == "lq":
            norm_q = w.abs().pow(self.q).sum((-2, -1), keepdim=True) + self.lq_eps
            gw = (g * w).sum((-2, -1), keepdim=True)
            return (norm_q.pow(-(self.q - 2) / self.q) * g
                    - (self.q - 2) * gw * norm_q.pow(-(2 * self.q - 2) / self.q) * w.abs().pow(self.q - 2) * w)
        return g

    def retain(self, w: Tensor) -> Tensor:
        """The chunk-boundary retention of one weight matrix ``[..., rows, cols]``."""
        if self.retention == "lq":
            norm_q = w.abs().pow(self.q).sum((-2, -1), keepdim=True) + self.lq_eps
            return w * norm_q.pow(-(self.q - 2) / self.q)
        if self.retention == "kl":
            logits = (1 - self.kl_lambda) * w.clamp_min(self.kl_eps).log()
            return self.kl_scale * torch.softmax(logits, dim=-1)
        return w


MIRAS_L2 = Miras()


def layer_norm(z: Tensor) -> Tensor:
    """Affine-free LayerNorm over the last dimension (eps 1e-5)."""
    mu = z.mean(-1, keepdim=True)
    return (z - mu) * torch.rsqrt((z - mu).pow(2).mean(-1, keepdim=True) + LN_EPS)


def layer_norm_backward(z: Tensor, g: Tensor) -> Tensor:
    """The gradient of ``<g, layer_norm(z)>`` with respect to ``z``, in closed form."""
    mu = z.mean(-1, keepdim=True)
    rstd = torch.rsqrt((z - mu).pow(2).mean(-1, keepdim=True) + LN_EPS)
    zhat = (z - mu) * rstd
    return rstd * (g - g.mean(-1, keepdim=True) - zhat * (g * zhat).mean(-1, keepdim=True))


def _gelu_grad(h: Tensor) -> Tensor:
    cdf = 0.5 * (1.0 + torch.erf(h * 0.7071067811865476))
    return cdf + h * torch.exp(-0.5 * h * h) * 0.3989422804014327


def mlp_inner_grads(k: Tensor, v: Tensor, a1: Tensor, a2: Tensor,
                    miras: Miras = MIRAS_L2) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token backward of 1/2 ||k + LN(gelu(k A2) A1) - v||^2 at (A1, A2), rows batched: ``k, v [..., n, D]``;
    with a Miras error map the residual r is replaced by psi(r) before the backward.

    Returns ``a = gelu(k A2)`` ``[..., n, E]``, ``g_z`` ``[..., n, D]`` and ``g_h`` ``[..., n, E]``; the per-token
    weight gradients are the outer products ``a^T g_z`` (for A1) and ``k^T g_h`` (for A2).
    """
    h = k @ a2
    a = F.gelu(h)
    z = a @ a1
    g_z = layer_norm_backward(z, miras.error(k + layer_norm(z) - v))
    g_h = (g_z @ a1.transpose(-1, -2)) * _gelu_grad(h)
    return a, g_z, g_h


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _sequences(cu_seqlens: Tensor | None, B: int, T: int) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of every sequence."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    cu = cu_seqlens.tolist()
    return [(0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]


def _step_loop(step_fn, xs: tuple[Tensor, ...], out_dim: int, state: tuple[Tensor, ...], start_pos: Tensor,
               chunk_size: int, cu_seqlens: Tensor | None) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Run ``step_fn`` token by token over every sequence; the state tuple is (bases..., weights..., momenta...)."""
    B, T, H = xs[0].shape[:3]
    out = xs[0].new_zeros(B, T, H, out_dim)
    finals = [[] for _ in state]
    for n, (row, a, b) in enumerate(_sequences(cu_seqlens, B, T)):
        st = [s[n] for s in state]
        pos = int(start_pos[n])
        for t in range(a, b):
            y, st = step_fn([x[row, t] for x in xs], st)
            out[row, t] = y
            pos += 1
            if pos == chunk_size:
                pos = 0
                st = step_fn(None, st)
        for f, s in zip(finals, st):
            f.append(s)
    return out, tuple(torch.stack(f) for f in finals)


def titans_linear_step_ref(q: Tensor, k: Tensor, v: Tensor, theta: Tensor, log_eta: Tensor, log_gamma: Tensor,
                           initial_state: tuple[Tensor, Tensor, Tensor], start_pos: Tensor, chunk_size: int,
                           cu_seqlens: Tensor | None = None, *,
                           miras: Miras = MIRAS_L2) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Eqs 13-15 token by token for the linear memory: the specification.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; theta, log_eta: ``[B, T, H]``;
        log_gamma: ``[B, T, H]`` or ``[B, T, H, K]``.
        initial_state: (W_base, W, S), each ``[N, H, K, V]``; start_pos: ``[N]`` int.
        chunk_size: b, the span over which gradients share the base W_t'.
        cu_seqlens: optional ``[N + 1]`` offsets (B == 1).
        miras: error map psi (u_t = k_t^T psi(k_t W_t' - v_t)) and the retention applied when a chunk ends.

    Returns:
        y ``[B, T, H, V]`` in the accumulation dtype (fp64 for fp64 inputs, else fp32) and the final state.
    """
    acc = _acc(q)
    lg = log_gamma if log_gamma.dim() == 4 else log_gamma[..., None]

    def step(x, st):
        base, w, s = st
        if x is None:
            # A chunk ended: retention, then the next gradients are taken at the current weights.
            w = miras.retain(w)
            return w, w, s
        q_t, k_t, v_t, th, le, g = x  # [H, K], [H, K], [H, V], [H], [H], [H, K or 1]
        err = miras.error(torch.einsum("hk,hkv->hv", k_t, base) - v_t)
        grad = k_t[:, :, None] * err[:, None, :]  # [H, K, V]
        s = le.exp()[:, None, None] * s - th[:, None, None] * grad
        w = g.exp()[:, :, None] * w + s
        return torch.einsum("hk,hkv->hv", q_t, w), (base, w, s)

    xs = tuple(x.to(acc) for x in (q, k, v, theta, log_eta, lg))
    state = tuple(s.to(acc) for s in initial_state)
    return _step_loop(step, xs, v.shape[-1], state, start_pos, chunk_size, cu_seqlens)


def titans_mlp_step_ref(q: Tensor, k: Tensor, v: Tensor, theta1: Tensor, theta2: Tensor, log_eta: Tensor,
                        log_gamma: Tensor, initial_state: tuple[Tensor, ...], start_pos: Tensor, chunk_size: int,
                        cu_seqlens: Tensor | None = None, *,
                        miras: Miras = MIRAS_L2) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Eqs 13-15 token by token for the 2-layer MLP memory ``x + LN(gelu(x A2) A1)``.

    Args as ``titans_linear_step_ref`` with v ``[B, T, H, D]`` (D = K), one theta per matrix and
    initial_state (A1_base, A1, S1, A2_base, A2, S2): A1 ``[N, H, E, D]``, A2 ``[N, H, D, E]``.  The KL
    retention needs a linear memory (it keeps rows on a simplex) and is rejected here.
    """
    if miras.retention == "kl":
        raise ValueError("retention='kl' is defined for the linear memory only")
    acc = _acc(q)

    def step(x, st):
        b1, a1, s1, b2, a2, s2 = st
        if x is None:
            a1, a2 = miras.retain(a1), miras.retain(a2)
            return a1, a1, s1, a2, a2, s2
        q_t, k_t, v_t, th1, th2, le, g = x
        act, g_z, g_h = mlp_inner_grads(k_t[:, None], v_t[:, None], b1, b2, miras)  # [H, 1, E], [H, 1, D], [H, 1, E]
        eta, gamma = le.exp()[:, None, None], g.exp()[:, None, None]
        s1 = eta * s1 - th1[:, None, None] * act.transpose(-1, -2) @ g_z
        s2 = eta * s2 - th2[:, None, None] * k_t[:, :, None] @ g_h
        a1, a2 = gamma * a1 + s1, gamma * a2 + s2
        y = q_t + layer_norm((F.gelu(q_t[:, None] @ a2) @ a1)[:, 0])
        return y, (b1, a1, s1, b2, a2, s2)

    xs = tuple(x.to(acc) for x in (q, k, v, theta1, theta2, log_eta, log_gamma))
    state = tuple(s.to(acc) for s in initial_state)
    return _step_loop(step, xs, v.shape[-1], state, start_pos, chunk_size, cu_seqlens)


def _to_grid(xs: tuple[Tensor, ...], start_pos: Tensor, chunk_size: int, cu_seqlens: Tensor | None):
    """Scatter ``[B, T, H, ...]`` inputs into chunks ``[N, H, NC, b, ...]``: row n's tokens start at offset
    ``start_pos[n]`` of its first chunk.  Unfilled slots are zeros and ``valid`` marks the real tokens.

    Returns the gridded tensors, ``valid [N, 1, NC, b]``, the chunk index of each row's next token ``[N]`` and the
    (sequence, slot) of every input token for gathering outputs back.
    """
    B, T = xs[0].shape[:2]
    dev = xs[0].device
    if cu_seqlens is None:
        seq = torch.arange(B, device=dev).repeat_interleave(T)
        pos = torch.arange(T, device=dev).repeat(B)
        lengths = torch.full((B,), T, device=dev, dtype=torch.int64)
    else:
        cu = cu_seqlens.to(torch.int64)
        seq, pos = seq_boundaries(cu, T)
        lengths = cu[1:] - cu[:-1]
    n_seq = lengths.numel()
    ends = start_pos.to(torch.int64) + lengths  # [N]
    # On an accelerator, and under torch.compile, a static bound (a row starts before offset b and holds at most T
    # tokens), so no host sync or data-dependent shape: surplus chunks hold only padding, an exact identity.  Eager
    # on the CPU the exact count costs nothing, and the surplus chunk would be a fifth of the work at T = 4b.
    if dev.type == "cpu" and not torch.compiler.is_compiling():
        n_chunks = max(1, -(-int(ends.max()) // chunk_size)) if n_seq else 1
    else:
        n_chunks = max(1, (T + 2 * (chunk_size - 1)) // chunk_size)
    slot = start_pos.to(dev, torch.int64)[seq] + pos
    grids = []
    for x in xs:
        flat = x.reshape(B * T, *x.shape[2:])
        g = flat.new_zeros(n_seq, n_chunks * chunk_size, *x.shape[2:])
        g[seq, slot] = flat
        # [N, NC*b, H, ...] -> [N, H, NC, b, ...]
        g = g.reshape(n_seq, n_chunks, chunk_size, *x.shape[2:]).movedim(3, 1)
        grids.append(g)
    valid = torch.zeros(n_seq, n_chunks * chunk_size, dtype=torch.bool, device=dev)
    valid[seq, slot] = True
    return grids, valid.view(n_seq, 1, n_chunks, chunk_size), ends // chunk_size, (seq, slot)


def _from_grid(y: Tensor, where: tuple[Tensor, Tensor], B: int, T: int) -> Tensor:
    seq, slot = where
    y = y.movedim(1, 3).flatten(1, 2)  # [N, NC*b, H, V]
    return y[seq, slot].reshape(B, T, *y.shape[2:])


def _coefficients(log_eta: Tensor, log_gamma: Tensor, valid: Tensor):
    """The in-chunk coefficients of titans.md §2 from log-cumsums (every exponent is <= 0).

    log_eta ``[..., b]``; log_gamma ``[..., b, C]`` (C = 1 for a per-head decay). Returns
    Lam ``[..., t, i, C]`` = beta_t / beta_i (i <= t, i a real token), P ``[..., t, j]`` = prod_{j<l<=t} eta_l
    (so N_tj = P_tj theta_j), m ``[..., t]`` = prod_{l<=t} eta_l, beta ``[..., t, C]`` = prod_{l<=t} gamma_l.
    """
    b = log_eta.shape[-1]
    causal = torch.ones(b, b, dtype=torch.bool, device=log_eta.device).tril()
    lg = log_gamma.cumsum(-2)  # [..., b, C]
    le = log_eta.cumsum(-1)  # [..., b]
    # Mask the exponents, not the exponentials: exp of an upper-triangle difference may overflow.
    lam_mask = (causal & valid[..., None, :])[..., None]  # [..., t, i, 1]
    lam = (lg[..., :, None, :] - lg[..., None, :, :]).masked_fill(~lam_mask, float("-inf")).exp()
    eta_prod = (le[..., :, None] - le[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    return lam, eta_prod, le.exp(), lg.exp()


def titans_linear_chunk_ref(q: Tensor, k: Tensor, v: Tensor, theta: Tensor, log_eta: Tensor, log_gamma: Tensor,
                            initial_state: tuple[Tensor, Tensor, Tensor], start_pos: Tensor, chunk_size: int,
                            cu_seqlens: Tensor | None = None, *,
                            miras: Miras = MIRAS_L2) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """The closed chunk form (titans.md §2), all chunk coefficients at once, one short loop over chunks.

    Same arguments and returns as ``titans_linear_step_ref``.  Per chunk with start state (W_0, S_0), gradient
    base W_g and error rows E = K W_g - V:

        Y      = (beta * Q) W_0 + (f * Q) S_0 - C E,     C_tj = sum_{j<=i<=t} N_ij <q_t * beta_t / beta_i, k_j>
        W_end  = beta_b W_0 + f_b S_0 - (K * g)^T E,     g_j = sum_{i>=j} N_ij beta_b / beta_i
        S_end  = m_b S_0 - (N_b * K)^T E

    With a Miras error map E = psi(K W_g - V) (still linear in the rows, so the form stays exact); a retention
    maps W_end (and the next base) of every chunk a sequence completes.
    """
    acc = _acc(q)
    B, T = q.shape[:2]
    per_head = log_gamma.dim() == 3
    lg = log_gamma[..., None] if per_head else log_gamma
    xs = tuple(x.to(acc) for x in (q, k, v, theta, log_eta, lg))
    (q, k, v, theta, log_eta, lg), valid, next_chunk, where = _to_grid(xs, start_pos, chunk_size, cu_seqlens)
    lam, eta_prod, m, beta = _coefficients(log_eta, lg, valid)
    nm = eta_prod * theta[..., None, :]  # [N, H, NC, b, b]
    f = torch.einsum("...tic,...i->...tc", lam, m)  # [N, H, NC, b, C]
    if per_head:
        g_mat = torch.einsum("...tic,...ij->...tjc", lam, nm)[..., 0]  # [N, H, NC, b, b]
        coef = g_mat * (q @ k.transpose(-1, -2))
        k_end = k * g_mat[..., -1, :, None]
    else:
        # C_tj = sum_i N_ij <q_t * Lam_ti, k_j>: one [b, b, K] x [K, b] product per chunk, then a sum over i.
        qk_i = (q[..., :, None, :] * lam) @ k[..., None, :, :].transpose(-1, -2)  # [N, H, NC, t, i, j]
        coef = (qk_i * nm[..., None, :, :]).sum(-2)
        k_end = k * torch.einsum("...ic,...ij->...jc", lam[..., -1, :, :], nm)
    q_beta, q_f = q * beta, q * f
    k_s = k * nm[..., -1, :, None]
    w_base, w, s = (x.to(acc) for x in initial_state)
    next_base = w_base
    ys = []
    chunks = zip(*(x.unbind(2) for x in (k, v, coef, q_beta, q_f, k_end, k_s, beta[..., -1, :], f[..., -1, :],
                                         m[..., -1])))
    for c, (k_c, v_c, c_c, qb_c, qf_c, ke_c, ks_c, bb_c, fb_c, mb_c) in enumerate(chunks):
        err = miras.error(k_c @ w_base - v_c)  # [N, H, b, V]
        ys.append(qb_c @ w + qf_c @ s - c_c @ err)
        w, s = (bb_c[..., None] * w + fb_c[..., None] * s - ke_c.transpose(-1, -2) @ err,
                mb_c[..., None, None] * s - ks_c.transpose(-1, -2) @ err)
        if miras.retention != "l2":
            w = _retain_completed(miras, w, next_chunk, c)
        w_base = w
        next_base = torch.where((next_chunk == c + 1).view(-1, 1, 1, 1), w, next_base)
    y = _from_grid(torch.stack(ys, 2), where, B, T)
    return y, (next_base, w, s)


def _retain_completed(miras: Miras, w: Tensor, next_chunk: Tensor, c: int) -> Tensor:
    """Retention for the rows whose chunk ``c`` ended (their next token lies in a later chunk); a row that stops
    inside chunk c (or before it) crossed no boundary and keeps its weights."""
    return torch.where((next_chunk > c).view(-1, 1, 1, 1), miras.retain(w), w)
