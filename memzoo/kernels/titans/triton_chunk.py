"""Triton kernels of the linear Titans memory (momentum, decay per head or per key channel), closed chunk form of
titans.md §2.

Paper: "Titans: Learning to Memorize at Test Time" (arXiv 2501.00663).  Per head, state W, S [K, V] in fp32:

    S_t = eta_t S_{t-1} - theta_t k_t^T (k_t W_t' - v_t),    W_t = gamma_t W_{t-1} + S_t,    y_t = q_t W_t

One program per (V tile, sequence, head) walks the chunks of its sequence with W, S resident in registers as one or
two key tiles [BK, BV].
Per chunk (b = BT tokens, a partial first chunk when the sequence starts at ``start_pos`` > 0, padded rows are
exact identities): E = K W_base - V; Lam = beta_t/beta_i, N = theta_j prod eta, G = Lam N and f = Lam m from
log-cumsums (only exponents <= 0 are taken); Y = beta (Q W) + f (Q S) - (G * QK^T) E; the chunk end updates
W, S with rank-b products.  No triangular solve: the gradients are frozen at the chunk start.  A per-key-channel
decay (``CHANNEL``) scales Q and the end-state rows per channel and replaces G * QK^T by C (one dot per chunk row,
README "Per-key-channel decay").

Backward: the forward kernel re-runs once storing only the chunk-start W, S; a reverse chunk pass
(``_titans_linear_bwd_kernel``) carries dW, dS (gradients w.r.t. the chunk-end states) back through the chunks, giving
dk, dv, the initial-state gradients and every chunk's dW, dS; ``_titans_linear_dgate_kernel`` then gives dq and,
through the in-chunk log-cumsums, dtheta, dlog_eta, dlog_gamma. dq, dk and the gate gradients are per-V-tile partial
sums added up by the launcher. Dots take input-dtype operands (TF32 for fp32 unless ``precision="ieee"``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..utils import flatten_batch, resolve_dot_precision

__all__ = ["titans_linear_triton"]


@triton.jit
def _tok(p, t0, i_h, o_t, m_t, i_k, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr):
    """Key channels ``[i_k BK, (i_k + 1) BK)`` of a ``[T, H, K]`` tensor at the chunk's tokens ``t0 + o_t``."""
    o_k = i_k * BK + tl.arange(0, BK)
    return tl.load(p + (t0 * H + i_h) * K + o_t[:, None] * (H * K) + o_k[None, :],
                   mask=m_t[:, None] & (o_k < K)[None, :], other=0.0)  # [BT, BK]


@triton.jit
def _tok_store(p, x, t0, i_h, o_t, m_t, i_k, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr):
    o_k = i_k * BK + tl.arange(0, BK)
    tl.store(p + (t0 * H + i_h) * K + o_t[:, None] * (H * K) + o_k[None, :], x.to(p.dtype.element_ty),
             mask=m_t[:, None] & (o_k < K)[None, :])


@triton.jit
def _st(p, i_k, o_v, m_v, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr):
    """Rows ``[i_k BK, (i_k + 1) BK)`` of a ``[K, V]`` state at ``p``, columns ``o_v``."""
    o_k = i_k * BK + tl.arange(0, BK)
    return tl.load(p + o_k[:, None] * V + o_v[None, :], mask=(o_k < K)[:, None] & m_v[None, :], other=0.0)


@triton.jit
def _st_if(p, m_if, i_k, o_v, m_v, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr):
    """``_st`` where the [BK, BV] mask ``m_if`` holds, zero elsewhere."""
    o_k = i_k * BK + tl.arange(0, BK)
    return tl.load(p + o_k[:, None] * V + o_v[None, :], mask=(o_k < K)[:, None] & m_v[None, :] & m_if, other=0.0)


@triton.jit
def _st_store(p, x, i_k, o_v, m_v, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr):
    o_k = i_k * BK + tl.arange(0, BK)
    tl.store(p + o_k[:, None] * V + o_v[None, :], x, mask=(o_k < K)[:, None] & m_v[None, :])


@triton.jit
def _st_store_pair(p_a, p_b, a1, b1, a2, b2, o_v, m_v, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                   NK: tl.constexpr):
    """Store a pair of states (W and S, or their gradients) held as NK key tiles: tiles 1 (a1, b1), 2 (a2, b2)."""
    _st_store(p_a, a1, 0, o_v, m_v, K, V, BK)
    _st_store(p_b, b1, 0, o_v, m_v, K, V, BK)
    if NK > 1:
        _st_store(p_a, a2, 1, o_v, m_v, K, V, BK)
        _st_store(p_b, b2, 1, o_v, m_v, K, V, BK)


@triton.jit
def _fwd_reads(q, k, wb0, b_w, b_s, i_c, b_qk, b_e, b_qw, b_qs, t0, i_h, o_t, m_t, o_v, m_v, i_k,
               H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """One K tile's share of QK^T, E = K W_base - V, Q W and Q S (the base is W except in the first chunk)."""
    b_q = _tok(q, t0, i_h, o_t, m_t, i_k, H, K, BK)  # [BT, BK]
    b_k = _tok(k, t0, i_h, o_t, m_t, i_k, H, K, BK)  # [BT, BK]
    dt = b_k.dtype
    b_qk = tl.dot(b_q, tl.trans(b_k), b_qk, input_precision=DOT_PRECISION)
    if i_c == 0:
        b_e = tl.dot(b_k, _st(wb0, i_k, o_v, m_v, K, V, BK).to(dt), b_e, input_precision=DOT_PRECISION)
    else:
        b_e = tl.dot(b_k, b_w.to(dt), b_e, input_precision=DOT_PRECISION)
    b_qw = tl.dot(b_q, b_w.to(dt), b_qw, input_precision=DOT_PRECISION)
    b_qs = tl.dot(b_q, b_s.to(dt), b_qs, input_precision=DOT_PRECISION)
    return b_qk, b_e, b_qw, b_qs


@triton.jit
def _fwd_update(k, b_w, b_s, b_ge, b_ne, b_beta_end, b_f_end, b_m_end, t0, i_h, o_t, m_t, i_k,
                H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Chunk-end rank-b update of one K tile: W' = beta_b W + f_b S + K^T (-g E), S' = m_b S + K^T (-n E)."""
    b_kt = tl.trans(_tok(k, t0, i_h, o_t, m_t, i_k, H, K, BK))  # [BK, BT]
    dt = b_kt.dtype
    b_w_new = tl.dot(b_kt, b_ge.to(dt), b_beta_end * b_w + b_f_end * b_s, input_precision=DOT_PRECISION)
    b_s = tl.dot(b_kt, b_ne.to(dt), b_m_end * b_s, input_precision=DOT_PRECISION)
    return b_w_new, b_s


@triton.jit
def _chan_cumsum(log_gamma, t0, i_h, o_t, m_t, i_k, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr):
    """In-chunk log-cumsum of a per-key-channel log_gamma for one K tile (padded rows add 0)."""
    return tl.cumsum(_tok(log_gamma, t0, i_h, o_t, m_t, i_k, H, K, BK).to(tl.float32), axis=0)  # [BT, BK]


@triton.jit
def _chan_tiles(q, k, log_gamma, t0, i_h, o_t, m_t, i_k, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr):
    """One K tile of q, k ([BT, BK], input dtype) and of the in-chunk log-cumsum of the per-channel log_gamma."""
    return (_tok(q, t0, i_h, o_t, m_t, i_k, H, K, BK), _tok(k, t0, i_h, o_t, m_t, i_k, H, K, BK),
            _chan_cumsum(log_gamma, t0, i_h, o_t, m_t, i_k, H, K, BK))


@triton.jit
def _chan_x(b_lgc, b_nm, b_m, m_t, o_t, i):
    """X_i [BT, BK] = beta_t / beta_i for t >= i (0 above, or when row i is padding), row i of N and m_i."""
    m_i = o_t == i
    b_lgi = tl.sum(tl.where(m_i[:, None], b_lgc, 0.0), axis=0)  # [BK]
    valid_i = tl.sum(tl.where(m_i & m_t, 1, 0)) > 0
    b_x = tl.exp(tl.where((o_t >= i)[:, None] & valid_i, b_lgc - b_lgi[None, :], float("-inf")))  # [BT, BK]
    return b_x, tl.sum(tl.where(m_i[:, None], b_nm, 0.0), axis=0), tl.sum(tl.where(m_i, b_m, 0.0))


@triton.jit
def _chan_c(b_q, b_k, b_lgc, b_nm, b_m, b_c, m_t, o_t, BT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """This K tile's share of C (C_tj = sum_{j<=i<=t} N_ij <q_t * beta_t / beta_i, k_j>), one [BT, BK] x [BK, BT]
    dot per row i, and its f (f_t = sum_{i<=t} m_i beta_t / beta_i) [BT, BK]."""
    b_f = tl.zeros_like(b_lgc)
    for i in range(0, BT):
        b_x, b_nmi, b_mi = _chan_x(b_lgc, b_nm, b_m, m_t, o_t, i)
        b_qk = tl.dot((b_q * b_x).to(b_k.dtype), tl.trans(b_k), input_precision=DOT_PRECISION)  # [BT, BT]
        b_c += b_qk * b_nmi[None, :]
        b_f += b_x * b_mi
    return b_c, b_f


@triton.jit
def _chan_end(b_lgc, b_nm, b_m, m_t, last, DOT_PRECISION: tl.constexpr):
    """beta_b, f_b [BK], Xb = beta_b / beta_i and Gam (Gam_j = sum_{i>=j} N_ij Xb_i) [BT, BK] of one K tile."""
    b_lgb = tl.sum(tl.where(last[:, None], b_lgc, 0.0), axis=0)  # [BK]
    b_xb = tl.exp(tl.where(m_t[:, None], b_lgb[None, :] - b_lgc, float("-inf")))  # [BT, BK]
    b_gam = tl.dot(tl.trans(b_nm), b_xb, input_precision=DOT_PRECISION)  # [BT, BK]
    return tl.exp(b_lgb), tl.sum(b_xb * b_m[:, None], axis=0), b_xb, b_gam


@triton.jit
def _fwd_reads_chan(q, k, log_gamma, wb0, b_w, b_s, i_c, b_c, b_e, b_y, b_nm, b_m, t0, i_h, o_t, m_t, o_v, m_v, i_k,
                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """One K tile's share of C, E = K W_base - V and (q * beta) W + (q * f) S under a per-channel decay."""
    b_q, b_k, b_lgc = _chan_tiles(q, k, log_gamma, t0, i_h, o_t, m_t, i_k, H, K, BK)  # [BT, BK] each
    dt = b_k.dtype
    b_c, b_f = _chan_c(b_q, b_k, b_lgc, b_nm, b_m, b_c, m_t, o_t, BT, DOT_PRECISION)
    if i_c == 0:
        b_e = tl.dot(b_k, _st(wb0, i_k, o_v, m_v, K, V, BK).to(dt), b_e, input_precision=DOT_PRECISION)
    else:
        b_e = tl.dot(b_k, b_w.to(dt), b_e, input_precision=DOT_PRECISION)
    b_y = tl.dot((b_q * tl.exp(b_lgc)).to(dt), b_w.to(dt), b_y, input_precision=DOT_PRECISION)
    b_y = tl.dot((b_q * b_f).to(dt), b_s.to(dt), b_y, input_precision=DOT_PRECISION)
    return b_c, b_e, b_y


@triton.jit
def _fwd_update_chan(k, log_gamma, b_w, b_s, b_e, b_ne, b_nm, b_m, b_m_end, t0, i_h, o_t, m_t, last, i_k,
                     H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Chunk-end update of one K tile: W' = beta_b W + f_b S - (K * Gam)^T E, S' = m_b S + K^T (-n E)."""
    b_k = _tok(k, t0, i_h, o_t, m_t, i_k, H, K, BK)  # [BT, BK]
    dt = b_k.dtype
    b_lgc = _chan_cumsum(log_gamma, t0, i_h, o_t, m_t, i_k, H, K, BK)
    b_beta_b, b_f_b, _, b_gam = _chan_end(b_lgc, b_nm, b_m, m_t, last, DOT_PRECISION)
    b_w_new = tl.dot(tl.trans((b_k * b_gam).to(dt)), (-b_e).to(dt), b_beta_b[:, None] * b_w + b_f_b[:, None] * b_s,
                     input_precision=DOT_PRECISION)
    b_s = tl.dot(tl.trans(b_k), b_ne, b_m_end * b_s, input_precision=DOT_PRECISION)
    return b_w_new, b_s


@triton.jit
def _bwd_reads_chan(k, log_gamma, p_wg, b_dw, b_ds, b_e, b_kgdw, b_kds, b_nm, b_m, t0, i_h, o_t, m_t, last, o_v, m_v,
                    i_k, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """One K tile's share of E, (K * Gam) dW and K dS."""
    b_k = _tok(k, t0, i_h, o_t, m_t, i_k, H, K, BK)  # [BT, BK]
    dt = b_k.dtype
    b_lgc = _chan_cumsum(log_gamma, t0, i_h, o_t, m_t, i_k, H, K, BK)
    _, _, _, b_gam = _chan_end(b_lgc, b_nm, b_m, m_t, last, DOT_PRECISION)
    b_e = tl.dot(b_k, _st(p_wg, i_k, o_v, m_v, K, V, BK).to(dt), b_e, input_precision=DOT_PRECISION)
    b_kgdw = tl.dot((b_k * b_gam).to(dt), b_dw.to(dt), b_kgdw, input_precision=DOT_PRECISION)
    b_kds = tl.dot(b_k, b_ds.to(dt), b_kds, input_precision=DOT_PRECISION)
    return b_e, b_kgdw, b_kds


@triton.jit
def _bwd_tile_chan(q, k, log_gamma, p_wg, dk, dwb0, dwb_out, b_dw, b_ds, b_de, b_e, b_ne, b_do, b_nm, b_m,
                   b_m_end, i_c, next_chunk, t0, i_h, o_t, m_t, last, o_v, m_v, i_k, H: tl.constexpr,
                   K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """dk of one K tile (but C's share, added by the dq launch, and Gam's, added by the gate launch) and the gradients
    of its rows of the chunk-start states, per-channel decay."""
    b_q, b_k, b_lgc = _chan_tiles(q, k, log_gamma, t0, i_h, o_t, m_t, i_k, H, K, BK)  # [BT, BK] each
    dt = b_k.dtype
    b_beta_b, b_f_b, _, _ = _chan_end(b_lgc, b_nm, b_m, m_t, last, DOT_PRECISION)
    b_f = tl.zeros([BT, BK], dtype=tl.float32)
    for i in range(0, BT):
        b_x, b_nmi, b_mi = _chan_x(b_lgc, b_nm, b_m, m_t, o_t, i)
        b_f += b_x * b_mi
    b_wg = _st(p_wg, i_k, o_v, m_v, K, V, BK)  # [BK, BV]
    b_dk = tl.dot(b_de.to(dt), tl.trans(b_wg.to(dt)), input_precision=DOT_PRECISION)
    b_dk = tl.dot(b_ne, tl.trans(b_ds.to(dt)), b_dk, input_precision=DOT_PRECISION)  # [BT, BK]
    _tok_store(dk, b_dk, t0, i_h, o_t, m_t, i_k, H, K, BK)
    b_dwg = tl.dot(tl.trans(b_k), b_de.to(dt), input_precision=DOT_PRECISION)  # [BK, BV]
    b_dw_start = tl.dot(tl.trans((b_q * tl.exp(b_lgc)).to(dt)), b_do, b_beta_b[:, None] * b_dw,
                        input_precision=DOT_PRECISION)
    b_ds = tl.dot(tl.trans((b_q * b_f).to(dt)), b_do, b_f_b[:, None] * b_dw + b_m_end * b_ds,
                  input_precision=DOT_PRECISION)
    if i_c == 0:
        m_ends = (tl.zeros([BK, BV], dtype=tl.int64) + next_chunk) == 0  # [BK, BV] splat
        _st_store(dwb0, b_dwg + _st_if(dwb_out, m_ends, i_k, o_v, m_v, K, V, BK), i_k, o_v, m_v, K, V, BK)
    return b_dw_start + tl.where(i_c == 0, 0.0, b_dwg), b_ds


@triton.jit
def _dq_tile_chan(q, k, log_gamma, dq, dk, p_w, p_s, b_do, b_dc, b_nm, b_m, b_dn, t0, i_h, o_t, m_t, o_v, m_v, i_k,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """dq of one K tile: beta * (dY W^T) + f * (dY S^T) + sum_i X_i * ((dC * N_i,:) K); C's share of dk,
    sum_i (dC * N_i,:)^T (q * X_i), added to the reverse pass's dk, and of dN (row i: colsum(dC * (q * X_i) K^T)),
    returned; both from one dot dC^T (q * X_i) per row (kept out of the reverse pass and the gate kernel: they spilled
    there)."""
    b_q, b_k, b_lgc = _chan_tiles(q, k, log_gamma, t0, i_h, o_t, m_t, i_k, H, K, BK)  # [BT, BK] each
    dt = b_k.dtype
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_f = tl.zeros([BT, BK], dtype=tl.float32)
    for i in range(0, BT):
        b_x, b_nmi, b_mi = _chan_x(b_lgc, b_nm, b_m, m_t, o_t, i)
        b_dq += b_x * tl.dot((b_dc * b_nmi[None, :]).to(dt), b_k, input_precision=DOT_PRECISION)
        # dC^T (q * X_i) gives both: dk_j += N_ij (...)_j and dN_ij = <k_j, (...)_j>
        b_pq = tl.dot(tl.trans(b_dc.to(dt)), (b_q * b_x).to(dt), input_precision=DOT_PRECISION)  # [BT, BK]
        b_dk += b_nmi[:, None] * b_pq
        b_dn += tl.where((o_t == i)[:, None], tl.sum(b_k.to(tl.float32) * b_pq, axis=1)[None, :], 0.0)
        b_f += b_x * b_mi
    _tok_store(dk, _tok(dk, t0, i_h, o_t, m_t, i_k, H, K, BK) + b_dk, t0, i_h, o_t, m_t, i_k, H, K, BK)
    b_w = _st(p_w, i_k, o_v, m_v, K, V, BK)  # [BK, BV] chunk-start W
    b_s = _st(p_s, i_k, o_v, m_v, K, V, BK)  # [BK, BV] chunk-start S
    b_dq += tl.exp(b_lgc) * tl.dot(b_do, tl.trans(b_w.to(dt)), input_precision=DOT_PRECISION)
    b_dq += b_f * tl.dot(b_do, tl.trans(b_s.to(dt)), input_precision=DOT_PRECISION)
    _tok_store(dq, b_dq, t0, i_h, o_t, m_t, i_k, H, K, BK)
    return b_dn


@triton.jit
def _dgate_tile_chan(q, k, log_gamma, dlg, dk, p_w, p_s, p_dw, b_do, b_e, b_dc, b_nm, b_m, b_dn, b_dm, t0, i_h, o_t,
                     m_t, last, o_v, m_v, i_k, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                     BK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dlog_gamma of one K tile (this V tile's share, stored), its shares of dN and dm (but C's share of dN, from
    the dq launch) and Gam's share of dk, Gam * d(K * Gam), added to dk (out of the reverse pass: it spilled there).

    Through beta (Q W and the end weights), f (Q S and the end weights, also giving dm), Gam (the end weights, also
    giving dN) and the X_i of C; each exponent difference lgc_t - lgc_i sends +z to t and -z to i, and the
    log-cumsum's backward is a reverse cumsum over the chunk.
    """
    b_q, b_k, b_lgc = _chan_tiles(q, k, log_gamma, t0, i_h, o_t, m_t, i_k, H, K, BK)  # [BT, BK] each
    dt = b_k.dtype
    b_w = _st(p_w, i_k, o_v, m_v, K, V, BK)  # [BK, BV] chunk-start W
    b_s = _st(p_s, i_k, o_v, m_v, K, V, BK)  # [BK, BV] chunk-start S
    b_dw = _st(p_dw, i_k, o_v, m_v, K, V, BK)  # [BK, BV] gradient w.r.t. the chunk-end W
    b_dbeta = b_q.to(tl.float32) * tl.dot(b_do, tl.trans(b_w.to(dt)), input_precision=DOT_PRECISION)  # [BT, BK]
    b_dbeta += tl.where(last[:, None], tl.sum(b_dw * b_w, axis=1)[None, :], 0.0)
    b_df = b_q.to(tl.float32) * tl.dot(b_do, tl.trans(b_s.to(dt)), input_precision=DOT_PRECISION)  # [BT, BK]
    b_df += tl.where(last[:, None], tl.sum(b_dw * b_s, axis=1)[None, :], 0.0)
    b_dlgc = b_dbeta * tl.exp(b_lgc)
    # Gam_j = sum_i N_ij Xb_i with Xb_i = beta_b / beta_i.
    _, _, b_xb, b_gam = _chan_end(b_lgc, b_nm, b_m, m_t, last, DOT_PRECISION)
    b_dkg = -tl.dot(b_e.to(dt), tl.trans(b_dw.to(dt)), input_precision=DOT_PRECISION)  # [BT, BK] d(K * Gam)
    _tok_store(dk, _tok(dk, t0, i_h, o_t, m_t, i_k, H, K, BK) + b_gam * b_dkg, t0, i_h, o_t, m_t, i_k, H, K, BK)
    b_dgam = b_k.to(tl.float32) * b_dkg
    b_dn = tl.dot(b_xb, tl.trans(b_dgam), b_dn, input_precision=DOT_PRECISION)
    b_z = tl.dot(b_nm, b_dgam, input_precision=DOT_PRECISION) * b_xb  # [BT, BK]
    b_dlgc += tl.where(last[:, None], tl.sum(b_z, axis=0)[None, :], 0.0) - b_z
    for i in range(0, BT):
        b_x, b_nmi, b_mi = _chan_x(b_lgc, b_nm, b_m, m_t, o_t, i)
        m_i = o_t == i
        b_qx = b_q * b_x  # [BT, BK]
        b_z = b_qx * tl.dot((b_dc * b_nmi[None, :]).to(dt), b_k, input_precision=DOT_PRECISION) + b_df * b_x * b_mi
        b_dlgc += b_z - tl.where(m_i[:, None], tl.sum(b_z, axis=0)[None, :], 0.0)
        b_dm += tl.where(m_i, tl.sum(b_df * b_x), 0.0)
    b_dlg = tl.sum(b_dlgc, axis=0)[None, :] - tl.cumsum(b_dlgc, axis=0) + b_dlgc
    _tok_store(dlg, b_dlg, t0, i_h, o_t, m_t, i_k, H, K, BK)
    return b_dn, b_dm


@triton.jit(do_not_specialize=["T"])
def _titans_linear_fwd_kernel(
    q, k, v, theta, log_eta, log_gamma, wb0, w0, s0, start_pos, cu, y, wb_out, w_out, s_out, h_w, h_s, chunk_off,
    dy, h_cdy, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, NK: tl.constexpr, CHANNEL: tl.constexpr, STORE_STATES: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Forward walk of one (V tile, sequence, head); W and S are held as NK (1 or 2) register tiles [BK, BV]. With
    STORE_STATES (the backward's re-run) it stores every chunk's start states (h_w, h_s) and, under a per-channel
    decay, C^T dY (h_cdy, [T, H, V] fp32) for the reverse pass."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu + i_n).to(tl.int64)
    n_tok = tl.load(cu + i_n + 1).to(tl.int64) - bos
    pos0 = tl.load(start_pos + i_n).to(tl.int64)
    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    # int64 only in scalar bases; tile offsets are int32.
    p_state = tl.cast(i_nh, tl.int64) * K * V
    b_w1 = _st(w0 + p_state, 0, o_v, m_v, K, V, BK)  # [BK, BV]
    b_s1 = _st(s0 + p_state, 0, o_v, m_v, K, V, BK)  # [BK, BV]
    b_w2 = tl.zeros([BK, BV], dtype=tl.float32)
    b_s2 = tl.zeros([BK, BV], dtype=tl.float32)
    if NK > 1:
        b_w2 = _st(w0 + p_state, 1, o_v, m_v, K, V, BK)
        b_s2 = _st(s0 + p_state, 1, o_v, m_v, K, V, BK)
    n_chunks = (pos0 + n_tok + BT - 1) // BT
    next_chunk = (pos0 + n_tok) // BT
    m_causal = o_t[:, None] >= o_t[None, :]  # [BT, BT]
    last = o_t == BT - 1
    # The returned gradient base is the weights at the end of chunk next_chunk - 1 (stored there), or the initial
    # base when the next token is in the first chunk; no extra tile is carried.
    if next_chunk == 0:
        for i_k in tl.static_range(NK):
            _st_store(wb_out + p_state, _st(wb0 + p_state, i_k, o_v, m_v, K, V, BK), i_k, o_v, m_v, K, V, BK)
    if STORE_STATES:
        o_first = tl.load(chunk_off + i_n).to(tl.int64)
    for i_c in range(0, n_chunks):
        if STORE_STATES:
            # Chunk-start states for the backward pass (only chunk boundaries are ever stored).
            p_h = ((o_first + i_c) * H + i_h) * K * V
            _st_store_pair(h_w + p_h, h_s + p_h, b_w1, b_s1, b_w2, b_s2, o_v, m_v, K, V, BK, NK)
        # Token t0 + o_t of the packed sequence sits at slot o_t of this chunk (t0 < bos in a partial first chunk).
        t0 = bos + tl.cast(i_c, tl.int64) * BT - pos0
        o_rel = t0 - bos + o_t  # [BT] token index inside the sequence
        m_t = (o_rel >= 0) & (o_rel < n_tok)
        m_tv = m_t[:, None] & m_v[None, :]
        o_tv = o_t[:, None] * (H * V) + o_v[None, :]  # [BT, BV]
        b_v = tl.load(v + (t0 * H + i_h) * V + o_tv, mask=m_tv, other=0.0).to(tl.float32)  # [BT, BV]
        # Rows outside the sequence get theta = 0, eta = gamma = 1: identity updates.
        p_g = t0 * H + i_h + o_t * H
        b_th = tl.load(theta + p_g, mask=m_t, other=0.0).to(tl.float32)  # [BT]
        b_le_raw = tl.load(log_eta + p_g, mask=m_t, other=0.0).to(tl.float32)  # [BT]
        if CHANNEL:
            b_lg_raw = tl.zeros([BT], dtype=tl.float32)
        else:
            b_lg_raw = tl.load(log_gamma + p_g, mask=m_t, other=0.0).to(tl.float32)  # [BT]
        # Exponentiate only differences with i <= t; a padded column i adds no S_i to W.
        b_lam, _, b_nm, b_G, b_m, b_f, b_beta = _chunk_coefficients(b_th, b_le_raw, b_lg_raw, m_t, m_causal,
                                                                    DOT_PRECISION)
        dt = q.dtype.element_ty
        b_m_end = tl.sum(tl.where(last, b_m, 0.0))
        if CHANNEL:
            b_c = tl.zeros([BT, BT], dtype=tl.float32)
            b_e = -b_v  # [BT, BV] becomes E = K W_base - V
            b_y = tl.zeros([BT, BV], dtype=tl.float32)
            b_c, b_e, b_y = _fwd_reads_chan(q, k, log_gamma, wb0 + p_state, b_w1, b_s1, i_c, b_c, b_e, b_y, b_nm, b_m,
                                            t0, i_h, o_t, m_t, o_v, m_v, 0, H, K, V, BT, BK, DOT_PRECISION)
            if NK > 1:
                b_c, b_e, b_y = _fwd_reads_chan(q, k, log_gamma, wb0 + p_state, b_w2, b_s2, i_c, b_c, b_e, b_y, b_nm,
                                                b_m, t0, i_h, o_t, m_t, o_v, m_v, 1, H, K, V, BT, BK, DOT_PRECISION)
            b_y = tl.dot((-b_c).to(dt), b_e.to(dt), b_y, input_precision=DOT_PRECISION)  # [BT, BV]
            tl.store(y + (t0 * H + i_h) * V + o_tv, b_y.to(y.dtype.element_ty), mask=m_tv)
            if STORE_STATES:
                b_do = tl.load(dy + (t0 * H + i_h) * V + o_tv, mask=m_tv, other=0.0).to(dt)  # [BT, BV]
                b_cdy = tl.dot(tl.trans(b_c).to(dt), b_do, input_precision=DOT_PRECISION)  # [BT, BV]
                tl.store(h_cdy + (t0 * H + i_h) * V + o_tv, b_cdy, mask=m_tv)
            b_ne = (-tl.sum(tl.where(last[:, None], b_nm, 0.0), axis=0)[:, None] * b_e).to(dt)  # [BT, BV]
            b_w1, b_s1 = _fwd_update_chan(k, log_gamma, b_w1, b_s1, b_e, b_ne, b_nm, b_m, b_m_end, t0, i_h, o_t, m_t,
                                          last, 0, H, K, BK, DOT_PRECISION)
            if NK > 1:
                b_w2, b_s2 = _fwd_update_chan(k, log_gamma, b_w2, b_s2, b_e, b_ne, b_nm, b_m, b_m_end, t0, i_h, o_t,
                                              m_t, last, 1, H, K, BK, DOT_PRECISION)
        else:
            b_qk = tl.zeros([BT, BT], dtype=tl.float32)
            b_e = -b_v  # [BT, BV] becomes E = K W_base - V
            b_qw = tl.zeros([BT, BV], dtype=tl.float32)
            b_qs = tl.zeros([BT, BV], dtype=tl.float32)
            b_qk, b_e, b_qw, b_qs = _fwd_reads(q, k, wb0 + p_state, b_w1, b_s1, i_c, b_qk, b_e, b_qw, b_qs, t0, i_h,
                                               o_t, m_t, o_v, m_v, 0, H, K, V, BK, BV, DOT_PRECISION)
            if NK > 1:
                b_qk, b_e, b_qw, b_qs = _fwd_reads(q, k, wb0 + p_state, b_w2, b_s2, i_c, b_qk, b_e, b_qw, b_qs, t0,
                                                   i_h, o_t, m_t, o_v, m_v, 1, H, K, V, BK, BV, DOT_PRECISION)
            b_y = b_beta[:, None] * b_qw + b_f[:, None] * b_qs
            b_y = tl.dot((-(b_G * b_qk)).to(dt), b_e.to(dt), b_y, input_precision=DOT_PRECISION)  # [BT, BV]
            tl.store(y + (t0 * H + i_h) * V + o_tv, b_y.to(y.dtype.element_ty), mask=m_tv)
            b_ge = -tl.sum(tl.where(last[:, None], b_G, 0.0), axis=0)[:, None] * b_e  # [BT, BV] -(row b of G) E
            b_ne = -tl.sum(tl.where(last[:, None], b_nm, 0.0), axis=0)[:, None] * b_e  # [BT, BV] -(row b of N) E
            b_beta_end = tl.sum(tl.where(last, b_beta, 0.0))
            b_f_end = tl.sum(tl.where(last, b_f, 0.0))
            b_w1, b_s1 = _fwd_update(k, b_w1, b_s1, b_ge, b_ne, b_beta_end, b_f_end, b_m_end, t0, i_h, o_t, m_t, 0,
                                     H, K, BK, DOT_PRECISION)
            if NK > 1:
                b_w2, b_s2 = _fwd_update(k, b_w2, b_s2, b_ge, b_ne, b_beta_end, b_f_end, b_m_end, t0, i_h, o_t, m_t, 1,
                                         H, K, BK, DOT_PRECISION)
        if next_chunk == i_c + 1:
            _st_store(wb_out + p_state, b_w1, 0, o_v, m_v, K, V, BK)
            if NK > 1:
                _st_store(wb_out + p_state, b_w2, 1, o_v, m_v, K, V, BK)
    _st_store_pair(w_out + p_state, s_out + p_state, b_w1, b_s1, b_w2, b_s2, o_v, m_v, K, V, BK, NK)


@triton.jit
def _chunk_coefficients(b_th, b_le_raw, b_lg_raw, m_t, m_causal, DOT_PRECISION: tl.constexpr):
    """In-chunk coefficients from the (masked) gates: Lam, P (eta products), N = P theta, G = Lam N, m, f, beta."""
    b_le = tl.cumsum(b_le_raw, axis=0)
    b_lg = tl.cumsum(b_lg_raw, axis=0)
    b_lam = tl.exp(tl.where(m_causal & m_t[None, :], b_lg[:, None] - b_lg[None, :], float("-inf")))  # [BT, BT]
    b_p = tl.exp(tl.where(m_causal, b_le[:, None] - b_le[None, :], float("-inf")))  # [BT, BT]
    b_nm = b_p * b_th[None, :]
    b_G = tl.dot(b_lam, b_nm, input_precision=DOT_PRECISION)
    b_m = tl.exp(b_le)
    b_f = tl.sum(b_lam * b_m[None, :], axis=1)
    return b_lam, b_p, b_nm, b_G, b_m, b_f, tl.exp(b_lg)


@triton.jit
def _bwd_reads(q, k, p_wg, b_dw, b_ds, b_qk, b_e, b_kdw, b_kds, t0, i_h, o_t, m_t, o_v, m_v, i_k,
               H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One K tile's share of QK^T, E = K W_base - V, K dW and K dS."""
    b_q = _tok(q, t0, i_h, o_t, m_t, i_k, H, K, BK)  # [BT, BK]
    b_k = _tok(k, t0, i_h, o_t, m_t, i_k, H, K, BK)  # [BT, BK]
    dt = b_k.dtype
    b_wg = _st(p_wg, i_k, o_v, m_v, K, V, BK)  # [BK, BV] gradient base
    b_qk = tl.dot(b_q, tl.trans(b_k), b_qk, input_precision=DOT_PRECISION)
    b_e = tl.dot(b_k, b_wg.to(dt), b_e, input_precision=DOT_PRECISION)
    b_kdw = tl.dot(b_k, b_dw.to(dt), b_kdw, input_precision=DOT_PRECISION)
    b_kds = tl.dot(b_k, b_ds.to(dt), b_kds, input_precision=DOT_PRECISION)
    return b_qk, b_e, b_kdw, b_kds


@triton.jit
def _bwd_tile(q, k, p_wg, dk, dwb0, dwb_out, b_dw, b_ds, b_de, b_dag, b_ge, b_ne, b_bdo, b_fdo, b_beta_end, b_f_end,
              b_m_end, i_c, next_chunk, t0, i_h, o_t, m_t, o_v, m_v, i_k,
              H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """dk of one K tile and the gradients of its rows of the chunk-start states (W is the base after chunk 0)."""
    b_q = _tok(q, t0, i_h, o_t, m_t, i_k, H, K, BK)  # [BT, BK]
    b_k = _tok(k, t0, i_h, o_t, m_t, i_k, H, K, BK)  # [BT, BK]
    dt = b_k.dtype
    b_wg = _st(p_wg, i_k, o_v, m_v, K, V, BK)  # [BK, BV]
    b_dk = tl.dot(b_de.to(dt), tl.trans(b_wg.to(dt)), input_precision=DOT_PRECISION)
    b_dk = tl.dot(tl.trans(b_dag), b_q, b_dk, input_precision=DOT_PRECISION)
    b_dk = tl.dot(b_ge, tl.trans(b_dw.to(dt)), b_dk, input_precision=DOT_PRECISION)
    b_dk = tl.dot(b_ne, tl.trans(b_ds.to(dt)), b_dk, input_precision=DOT_PRECISION)  # [BT, BK]
    _tok_store(dk, b_dk, t0, i_h, o_t, m_t, i_k, H, K, BK)
    b_dwg = tl.dot(tl.trans(b_k), b_de.to(dt), input_precision=DOT_PRECISION)  # [BK, BV]
    b_dw_start = tl.dot(tl.trans(b_q), b_bdo, b_beta_end * b_dw, input_precision=DOT_PRECISION)
    b_ds = tl.dot(tl.trans(b_q), b_fdo, b_f_end * b_dw + b_m_end * b_ds, input_precision=DOT_PRECISION)
    if i_c == 0:
        m_ends = (tl.zeros([BK, BV], dtype=tl.int64) + next_chunk) == 0  # [BK, BV] splat
        _st_store(dwb0, b_dwg + _st_if(dwb_out, m_ends, i_k, o_v, m_v, K, V, BK), i_k, o_v, m_v, K, V, BK)
    return b_dw_start + tl.where(i_c == 0, 0.0, b_dwg), b_ds


@triton.jit(do_not_specialize=["T"])
def _titans_linear_bwd_kernel(
    q, k, v, theta, log_eta, log_gamma, wb0, start_pos, cu, h_w, h_s, chunk_off, h_cdy, dy, dwb_out, dw_out, ds_out,
    dk, dv, dw_end, ds_end, dwb0, dw0, ds0, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NK: tl.constexpr, CHANNEL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Reverse chunk pass: dW, dS (the gradients w.r.t. the chunk-end states, NK register tiles each) walk back
    through the chunks.

    dk is a partial sum over this program's V tile ([NV, T, H, K], summed by the launcher); dv and the
    initial-state gradients are written directly, every chunk's dW, dS to dw_end, ds_end (rows as h_w) for the
    gate-gradient kernel, which also computes dq.
    """
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu + i_n).to(tl.int64)
    n_tok = tl.load(cu + i_n + 1).to(tl.int64) - bos
    pos0 = tl.load(start_pos + i_n).to(tl.int64)
    o_first = tl.load(chunk_off + i_n).to(tl.int64)
    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    # int64 only in scalar bases; tile offsets are int32.
    p_state = tl.cast(i_nh, tl.int64) * K * V
    b_dw1 = _st(dw_out + p_state, 0, o_v, m_v, K, V, BK)  # [BK, BV] gradient w.r.t. the chunk-end W
    b_ds1 = _st(ds_out + p_state, 0, o_v, m_v, K, V, BK)  # [BK, BV]
    b_dw2 = tl.zeros([BK, BV], dtype=tl.float32)
    b_ds2 = tl.zeros([BK, BV], dtype=tl.float32)
    if NK > 1:
        b_dw2 = _st(dw_out + p_state, 1, o_v, m_v, K, V, BK)
        b_ds2 = _st(ds_out + p_state, 1, o_v, m_v, K, V, BK)
    n_chunks = (pos0 + n_tok + BT - 1) // BT
    next_chunk = (pos0 + n_tok) // BT
    # The gradient w.r.t. the returned base joins the chunk that ends at it (none: the initial base, whose gradient
    # is written by the first chunk, or here when the sequence has no chunk). Read from memory where needed, so no
    # extra tile stays live across the loop.
    if n_chunks == 0:
        for i_k in tl.static_range(NK):
            _st_store(dwb0 + p_state, _st(dwb_out + p_state, i_k, o_v, m_v, K, V, BK), i_k, o_v, m_v, K, V, BK)
    m_causal = o_t[:, None] >= o_t[None, :]
    last = o_t == BT - 1
    p_dk = dk + tl.cast(i_v, tl.int64) * NT * H * K
    for i_r in range(0, n_chunks):
        i_c = n_chunks - 1 - i_r
        # The returned base is the end of chunk next_chunk - 1.
        m_ends = (tl.zeros([BK, BV], dtype=tl.int64) + next_chunk) == i_c + 1  # [BK, BV] splat
        p_h = ((o_first + i_c) * H + i_h) * K * V
        b_dw1 += _st_if(dwb_out + p_state, m_ends, 0, o_v, m_v, K, V, BK)
        _st_store(dw_end + p_h, b_dw1, 0, o_v, m_v, K, V, BK)
        _st_store(ds_end + p_h, b_ds1, 0, o_v, m_v, K, V, BK)
        if NK > 1:
            b_dw2 += _st_if(dwb_out + p_state, m_ends, 1, o_v, m_v, K, V, BK)
            _st_store(dw_end + p_h, b_dw2, 1, o_v, m_v, K, V, BK)
            _st_store(ds_end + p_h, b_ds2, 1, o_v, m_v, K, V, BK)
        p_wg = tl.where(i_c == 0, wb0 + p_state, h_w + p_h)
        t0 = bos + tl.cast(i_c, tl.int64) * BT - pos0
        o_rel = t0 - bos + o_t
        m_t = (o_rel >= 0) & (o_rel < n_tok)
        m_tv = m_t[:, None] & m_v[None, :]
        o_tv = o_t[:, None] * (H * V) + o_v[None, :]  # [BT, BV]
        dt = q.dtype.element_ty
        b_v = tl.load(v + (t0 * H + i_h) * V + o_tv, mask=m_tv, other=0.0).to(tl.float32)  # [BT, BV]
        b_do = tl.load(dy + (t0 * H + i_h) * V + o_tv, mask=m_tv, other=0.0).to(dt)  # [BT, BV]
        p_g = t0 * H + i_h + o_t * H
        b_th = tl.load(theta + p_g, mask=m_t, other=0.0).to(tl.float32)
        b_le_raw = tl.load(log_eta + p_g, mask=m_t, other=0.0).to(tl.float32)
        if CHANNEL:
            b_lg_raw = tl.zeros([BT], dtype=tl.float32)
        else:
            b_lg_raw = tl.load(log_gamma + p_g, mask=m_t, other=0.0).to(tl.float32)
        b_lam, b_p, b_nm, b_G, b_m, b_f, b_beta = _chunk_coefficients(b_th, b_le_raw, b_lg_raw, m_t, m_causal,
                                                                      DOT_PRECISION)
        b_m_end = tl.sum(tl.where(last, b_m, 0.0))
        b_n_end = tl.sum(tl.where(last[:, None], b_nm, 0.0), axis=0)  # [BT] row b of N
        if CHANNEL:
            b_e = -b_v  # [BT, BV] becomes E = K W_base - V
            b_kgdw = tl.zeros([BT, BV], dtype=tl.float32)
            b_kds = tl.zeros([BT, BV], dtype=tl.float32)
            b_e, b_kgdw, b_kds = _bwd_reads_chan(k, log_gamma, p_wg, b_dw1, b_ds1, b_e, b_kgdw, b_kds, b_nm, b_m, t0,
                                                 i_h, o_t, m_t, last, o_v, m_v, 0, H, K, V, BK, DOT_PRECISION)
            if NK > 1:
                b_e, b_kgdw, b_kds = _bwd_reads_chan(k, log_gamma, p_wg, b_dw2, b_ds2, b_e, b_kgdw, b_kds, b_nm, b_m,
                                                     t0, i_h, o_t, m_t, last, o_v, m_v, 1, H, K, V, BK, DOT_PRECISION)
            # -C^T dY as the forward re-run stored it
            b_de = -tl.load(h_cdy + (t0 * H + i_h) * V + o_tv, mask=m_tv, other=0.0)  # [BT, BV]
            b_de -= b_kgdw + b_n_end[:, None] * b_kds
            tl.store(dv + (t0 * H + i_h) * V + o_tv, (-b_de).to(dv.dtype.element_ty), mask=m_tv)
            b_ne = (-b_n_end[:, None] * b_e).to(dt)  # [BT, BV]
            b_dw1, b_ds1 = _bwd_tile_chan(q, k, log_gamma, p_wg, p_dk, dwb0 + p_state, dwb_out + p_state, b_dw1,
                                          b_ds1, b_de, b_e, b_ne, b_do, b_nm, b_m, b_m_end, i_c, next_chunk,
                                          t0, i_h, o_t, m_t, last, o_v, m_v, 0, H, K, V, BT, BK, BV, DOT_PRECISION)
            if NK > 1:
                b_dw2, b_ds2 = _bwd_tile_chan(q, k, log_gamma, p_wg, p_dk, dwb0 + p_state, dwb_out + p_state, b_dw2,
                                              b_ds2, b_de, b_e, b_ne, b_do, b_nm, b_m, b_m_end, i_c, next_chunk,
                                              t0, i_h, o_t, m_t, last, o_v, m_v, 1, H, K, V, BT, BK, BV,
                                              DOT_PRECISION)
        else:
            b_qk = tl.zeros([BT, BT], dtype=tl.float32)
            b_e = -b_v  # [BT, BV] becomes E = K W_base - V
            b_kdw = tl.zeros([BT, BV], dtype=tl.float32)
            b_kds = tl.zeros([BT, BV], dtype=tl.float32)
            b_qk, b_e, b_kdw, b_kds = _bwd_reads(q, k, p_wg, b_dw1, b_ds1, b_qk, b_e, b_kdw, b_kds, t0, i_h, o_t, m_t,
                                                 o_v, m_v, 0, H, K, V, BK, DOT_PRECISION)
            if NK > 1:
                b_qk, b_e, b_kdw, b_kds = _bwd_reads(q, k, p_wg, b_dw2, b_ds2, b_qk, b_e, b_kdw, b_kds, t0, i_h, o_t,
                                                     m_t, o_v, m_v, 1, H, K, V, BK, DOT_PRECISION)
            b_g_end = tl.sum(tl.where(last[:, None], b_G, 0.0), axis=0)  # [BT]
            b_beta_end = tl.sum(tl.where(last, b_beta, 0.0))
            b_f_end = tl.sum(tl.where(last, b_f, 0.0))
            b_dag = (-tl.dot(b_do, tl.trans(b_e.to(dt)), input_precision=DOT_PRECISION) * b_G).to(dt)  # [BT, BT] dA*G
            # E feeds the outputs (through -A E) and both chunk-end states.
            b_de = -(b_g_end[:, None] * b_kdw + b_n_end[:, None] * b_kds)  # [BT, BV]
            b_de = tl.dot(tl.trans(-(b_G * b_qk)).to(dt), b_do, b_de, input_precision=DOT_PRECISION)
            tl.store(dv + (t0 * H + i_h) * V + o_tv, (-b_de).to(dv.dtype.element_ty), mask=m_tv)
            b_ge = (-b_g_end[:, None] * b_e).to(dt)  # [BT, BV]
            b_ne = (-b_n_end[:, None] * b_e).to(dt)  # [BT, BV]
            b_bdo = (b_beta[:, None] * b_do).to(dt)  # [BT, BV]
            b_fdo = (b_f[:, None] * b_do).to(dt)  # [BT, BV]
            b_dw1, b_ds1 = _bwd_tile(q, k, p_wg, p_dk, dwb0 + p_state, dwb_out + p_state, b_dw1, b_ds1, b_de, b_dag,
                                     b_ge, b_ne, b_bdo, b_fdo, b_beta_end, b_f_end, b_m_end, i_c, next_chunk, t0, i_h,
                                     o_t, m_t, o_v, m_v, 0, H, K, V, BK, BV, DOT_PRECISION)
            if NK > 1:
                b_dw2, b_ds2 = _bwd_tile(q, k, p_wg, p_dk, dwb0 + p_state, dwb_out + p_state, b_dw2, b_ds2, b_de, b_dag,
                                         b_ge, b_ne, b_bdo, b_fdo, b_beta_end, b_f_end, b_m_end, i_c, next_chunk, t0,
                                         i_h, o_t, m_t, o_v, m_v, 1, H, K, V, BK, BV, DOT_PRECISION)
    _st_store_pair(dw0 + p_state, ds0 + p_state, b_dw1, b_ds1, b_dw2, b_ds2, o_v, m_v, K, V, BK, NK)


@triton.jit
def _dgate_reads(q, k, p_wg, p_w, p_s, p_dw, p_ds, b_qk, b_e, b_kdw, b_kds, b_qw, b_qs, b_sums, t0, i_h, o_t, m_t,
                 o_v, m_v, i_k, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """One K tile's share of QK^T, E, K dW, K dS, Q W, Q S and (<dW, W>, <dW, S>, <dS, S>) for the gate gradients."""
    b_q = _tok(q, t0, i_h, o_t, m_t, i_k, H, K, BK)  # [BT, BK]
    b_k = _tok(k, t0, i_h, o_t, m_t, i_k, H, K, BK)  # [BT, BK]
    dt = b_k.dtype
    b_e = tl.dot(b_k, _st(p_wg, i_k, o_v, m_v, K, V, BK).to(dt), b_e, input_precision=DOT_PRECISION)
    b_qk = tl.dot(b_q, tl.trans(b_k), b_qk, input_precision=DOT_PRECISION)
    b_w = _st(p_w, i_k, o_v, m_v, K, V, BK)  # [BK, BV] chunk-start W
    b_s = _st(p_s, i_k, o_v, m_v, K, V, BK)  # [BK, BV] chunk-start S
    b_dw = _st(p_dw, i_k, o_v, m_v, K, V, BK)  # [BK, BV] gradient w.r.t. the chunk-end W
    b_ds = _st(p_ds, i_k, o_v, m_v, K, V, BK)  # [BK, BV]
    b_kdw = tl.dot(b_k, b_dw.to(dt), b_kdw, input_precision=DOT_PRECISION)
    b_kds = tl.dot(b_k, b_ds.to(dt), b_kds, input_precision=DOT_PRECISION)
    b_qw = tl.dot(b_q, b_w.to(dt), b_qw, input_precision=DOT_PRECISION)
    b_qs = tl.dot(b_q, b_s.to(dt), b_qs, input_precision=DOT_PRECISION)
    o_3 = tl.arange(0, 4)
    b_sums += tl.where(o_3 == 0, tl.sum(b_dw * b_w), tl.where(o_3 == 1, tl.sum(b_dw * b_s),
                                                              tl.where(o_3 == 2, tl.sum(b_ds * b_s), 0.0)))
    return b_qk, b_e, b_kdw, b_kds, b_qw, b_qs, b_sums


@triton.jit
def _dq_tile(k, dq, p_w, p_s, b_do, b_beta, b_f, b_dag, t0, i_h, o_t, m_t, o_v, m_v, i_k,
             H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dq of one K tile: beta dY W^T + f dY S^T + (dA * G) K."""
    b_k = _tok(k, t0, i_h, o_t, m_t, i_k, H, K, BK)  # [BT, BK]
    dt = b_k.dtype
    b_w = _st(p_w, i_k, o_v, m_v, K, V, BK)  # [BK, BV] chunk-start W
    b_s = _st(p_s, i_k, o_v, m_v, K, V, BK)  # [BK, BV] chunk-start S
    b_dq = b_beta[:, None] * tl.dot(b_do, tl.trans(b_w.to(dt)), input_precision=DOT_PRECISION)
    b_dq += b_f[:, None] * tl.dot(b_do, tl.trans(b_s.to(dt)), input_precision=DOT_PRECISION)
    b_dq = tl.dot(b_dag, b_k, b_dq, input_precision=DOT_PRECISION)  # [BT, BK]
    _tok_store(dq, b_dq, t0, i_h, o_t, m_t, i_k, H, K, BK)


@triton.jit
def _dtheta_dlog_eta(b_dN, b_dm, b_p, b_nm, b_m):
    """dtheta and dlog_eta of a chunk from the gradients of N = P theta and m (dP * P = dN * N), the log-cumsum's
    backward being a reverse cumsum inside the chunk."""
    b_dth = tl.sum(b_dN * b_p, axis=0)
    b_dpp = b_dN * b_nm
    b_dle_c = b_dm * b_m + tl.sum(b_dpp, axis=1) - tl.sum(b_dpp, axis=0)
    return b_dth, tl.sum(b_dle_c) - tl.cumsum(b_dle_c, axis=0) + b_dle_c


@triton.jit(do_not_specialize=["T"])
def _titans_linear_dgate_kernel(
    q, k, v, theta, log_eta, log_gamma, wb0, start_pos, cu, h_w, h_s, chunk_off, dy, dw_end, ds_end,
    dq, dk, dth, dle, dlg, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NK: tl.constexpr, CHANNEL: tl.constexpr, DQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dq (``DQ``) or else the gate gradients (dtheta, dlog_eta, dlog_gamma), partial sums over this program's V tile,
    of every chunk from its start states (h_w, h_s, the base) and end-state gradients (dw_end, ds_end); no tile is
    carried between chunks. Two launches, so neither holds the other's tiles. Under a per-channel decay both also add
    to the reverse pass's dk: C's share (dq launch) and Gam's (gate launch).

    dG = dA * QK^T minus the end-row terms, dbeta, df, dm, chained through G = Lam N, f = Lam m, the exponentials and
    a reverse in-chunk cumsum.
    """
    i_nh = tl.program_id(1)
    if CHANNEL:
        # One key tile per program: the per-channel terms are per tile, and the tiles' shares of the per-head
        # gradients are partial sums (NV x NK of them).
        i_v, i_kt = tl.program_id(0) // NK, tl.program_id(0) % NK
    else:
        i_v, i_kt = tl.program_id(0), 0
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu + i_n).to(tl.int64)
    n_tok = tl.load(cu + i_n + 1).to(tl.int64) - bos
    pos0 = tl.load(start_pos + i_n).to(tl.int64)
    o_first = tl.load(chunk_off + i_n).to(tl.int64)
    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    # int64 only in scalar bases; tile offsets are int32.
    p_state = tl.cast(i_nh, tl.int64) * K * V
    n_chunks = (pos0 + n_tok + BT - 1) // BT
    m_causal = o_t[:, None] >= o_t[None, :]
    last = o_t == BT - 1
    o_dpart = tl.cast(i_v, tl.int64) * NT
    o_gpart = tl.cast(tl.program_id(0), tl.int64) * NT
    if CHANNEL:
        if not DQ:
            # the dq launch wrote the first NV x NK partial sums of dtheta, dlog_eta (from C's share of dN)
            o_gpart += tl.cast(tl.num_programs(0), tl.int64) * NT
    for i_c in range(0, n_chunks):
        p_h = ((o_first + i_c) * H + i_h) * K * V
        t0 = bos + tl.cast(i_c, tl.int64) * BT - pos0
        # The first chunk (the only one that starts at or before the sequence start) has the base W_base.
        p_wg = tl.where(t0 <= bos, wb0 + p_state, h_w + p_h)
        o_rel = t0 - bos + o_t
        m_t = (o_rel >= 0) & (o_rel < n_tok)
        m_tv = m_t[:, None] & m_v[None, :]
        o_tv = o_t[:, None] * (H * V) + o_v[None, :]  # [BT, BV]
        dt = q.dtype.element_ty
        b_v = tl.load(v + (t0 * H + i_h) * V + o_tv, mask=m_tv, other=0.0).to(tl.float32)  # [BT, BV]
        b_do = tl.load(dy + (t0 * H + i_h) * V + o_tv, mask=m_tv, other=0.0).to(dt)  # [BT, BV]
        p_g = t0 * H + i_h + o_t * H
        b_th = tl.load(theta + p_g, mask=m_t, other=0.0).to(tl.float32)
        b_le_raw = tl.load(log_eta + p_g, mask=m_t, other=0.0).to(tl.float32)
        if CHANNEL:
            b_lg_raw = tl.zeros([BT], dtype=tl.float32)
        else:
            b_lg_raw = tl.load(log_gamma + p_g, mask=m_t, other=0.0).to(tl.float32)
        b_lam, b_p, b_nm, b_G, b_m, b_f, b_beta = _chunk_coefficients(b_th, b_le_raw, b_lg_raw, m_t, m_causal,
                                                                      DOT_PRECISION)
        if DQ:
            b_e = -b_v  # [BT, BV] becomes E = K W_base - V
            for i_k in tl.static_range(NK):
                b_kt = _tok(k, t0, i_h, o_t, m_t, i_k, H, K, BK)  # [BT, BK]
                b_e = tl.dot(b_kt, _st(p_wg, i_k, o_v, m_v, K, V, BK).to(dt), b_e, input_precision=DOT_PRECISION)
            b_da = -tl.dot(b_do, tl.trans(b_e.to(dt)), input_precision=DOT_PRECISION)  # [BT, BT]
            if CHANNEL:
                b_dN = _dq_tile_chan(q, k, log_gamma, dq + o_dpart * H * K, dk + o_dpart * H * K, h_w + p_h, h_s + p_h,
                                     b_do, b_da, b_nm, b_m, tl.zeros([BT, BT], dtype=tl.float32), t0, i_h, o_t, m_t,
                                     o_v, m_v, i_kt, H, K, V, BT, BK, DOT_PRECISION)
                b_dth, b_dle = _dtheta_dlog_eta(b_dN, tl.zeros([BT], dtype=tl.float32), b_p, b_nm, b_m)
                p_gp = (o_gpart + t0) * H + i_h + o_t * H
                tl.store(dth + p_gp, b_dth, mask=m_t)
                tl.store(dle + p_gp, b_dle, mask=m_t)
            else:
                for i_k in tl.static_range(NK):
                    _dq_tile(k, dq + o_dpart * H * K, h_w + p_h, h_s + p_h, b_do, b_beta, b_f, (b_da * b_G).to(dt), t0,
                             i_h, o_t, m_t, o_v, m_v, i_k, H, K, V, BK, DOT_PRECISION)
        else:
            if CHANNEL:
                b_e = -b_v  # [BT, BV] becomes E = K W_base - V
                b_kds = tl.zeros([BT, BV], dtype=tl.float32)
                b_dss = tl.zeros([BK, BV], dtype=tl.float32)  # <dS, S> summed at the end
                for i_k in tl.static_range(NK):
                    b_kt = _tok(k, t0, i_h, o_t, m_t, i_k, H, K, BK)  # [BT, BK]
                    b_e = tl.dot(b_kt, _st(p_wg, i_k, o_v, m_v, K, V, BK).to(dt), b_e, input_precision=DOT_PRECISION)
                    b_ds = _st(ds_end + p_h, i_k, o_v, m_v, K, V, BK)  # [BK, BV]
                    b_kds = tl.dot(b_kt, b_ds.to(dt), b_kds, input_precision=DOT_PRECISION)
                    b_dss += b_ds * _st(h_s + p_h, i_k, o_v, m_v, K, V, BK)
                b_da = -tl.dot(b_do, tl.trans(b_e.to(dt)), input_precision=DOT_PRECISION)  # [BT, BT] gradient of C
                # The end-row terms of dN and dm once, in the first key tile's share.
                m_end = last & (i_kt == 0)
                b_dN = -tl.where(m_end[:, None], tl.sum(b_e * b_kds, axis=1)[None, :], 0.0)  # [BT, BT]
                b_dm = tl.where(m_end, tl.sum(b_dss), 0.0)  # [BT]
                b_dN, b_dm = _dgate_tile_chan(q, k, log_gamma, dlg + o_dpart * H * K, dk + o_dpart * H * K,
                                              h_w + p_h, h_s + p_h, dw_end + p_h, b_do, b_e, b_da, b_nm, b_m, b_dN,
                                              b_dm, t0, i_h, o_t, m_t, last, o_v, m_v, i_kt, H, K, V, BT, BK,
                                              DOT_PRECISION)
                b_dth, b_dle = _dtheta_dlog_eta(b_dN, b_dm, b_p, b_nm, b_m)
                p_gp = (o_gpart + t0) * H + i_h + o_t * H
                tl.store(dth + p_gp, b_dth, mask=m_t)
                tl.store(dle + p_gp, b_dle, mask=m_t)
            else:
                b_qk = tl.zeros([BT, BT], dtype=tl.float32)
                b_e = -b_v
                b_kdw = tl.zeros([BT, BV], dtype=tl.float32)
                b_kds = tl.zeros([BT, BV], dtype=tl.float32)
                b_qw = tl.zeros([BT, BV], dtype=tl.float32)
                b_qs = tl.zeros([BT, BV], dtype=tl.float32)
                b_sums = tl.zeros([4], dtype=tl.float32)  # <dW, W>, <dW, S>, <dS, S>
                for i_k in tl.static_range(NK):
                    b_qk, b_e, b_kdw, b_kds, b_qw, b_qs, b_sums = _dgate_reads(
                        q, k, p_wg, h_w + p_h, h_s + p_h, dw_end + p_h, ds_end + p_h, b_qk, b_e, b_kdw, b_kds, b_qw,
                        b_qs, b_sums, t0, i_h, o_t, m_t, o_v, m_v, i_k, H, K, V, BK, DOT_PRECISION)
                o_3 = tl.arange(0, 4)
                b_da = -tl.dot(b_do, tl.trans(b_e.to(dt)), input_precision=DOT_PRECISION)  # [BT, BT] gradient of G*QK^T
                # Coefficient gradients (this V tile's share), then the chain through the log-cumsums.
                b_dbeta = tl.sum(b_do.to(tl.float32) * b_qw, axis=1)
                b_dbeta += tl.where(last, tl.sum(tl.where(o_3 == 0, b_sums, 0.0)), 0.0)
                b_df = tl.sum(b_do.to(tl.float32) * b_qs, axis=1)
                b_df += tl.where(last, tl.sum(tl.where(o_3 == 1, b_sums, 0.0)), 0.0)
                b_dm = tl.where(last, tl.sum(tl.where(o_3 == 2, b_sums, 0.0)), 0.0)  # [BT]
                b_dG = b_da * b_qk - tl.where(last[:, None], tl.sum(b_e * b_kdw, axis=1)[None, :], 0.0)
                b_dN = -tl.where(last[:, None], tl.sum(b_e * b_kds, axis=1)[None, :], 0.0)
                b_dN = tl.dot(tl.trans(b_lam), b_dG, b_dN, input_precision=DOT_PRECISION)
                b_dlam = tl.dot(b_dG, tl.trans(b_nm), b_df[:, None] * b_m[None, :], input_precision=DOT_PRECISION)
                b_dm += tl.sum(b_lam * b_df[:, None], axis=0)
                b_dth, b_dle = _dtheta_dlog_eta(b_dN, b_dm, b_p, b_nm, b_m)
                b_dll = b_dlam * b_lam
                b_dlg_c = b_dbeta * b_beta + tl.sum(b_dll, axis=1) - tl.sum(b_dll, axis=0)
                # Cumsum backward: a reverse cumsum inside the chunk.
                b_dlg = tl.sum(b_dlg_c) - tl.cumsum(b_dlg_c, axis=0) + b_dlg_c
                p_gp = (o_dpart + t0) * H + i_h + o_t * H
                tl.store(dth + p_gp, b_dth, mask=m_t)
                tl.store(dle + p_gp, b_dle, mask=m_t)
                tl.store(dlg + p_gp, b_dlg, mask=m_t)

# Widest key tile held in registers: K > _BK_MAX is split in two tiles of next_power_of_2(K / 2) rows.
_BK_MAX = 64


def _blocks(K, V):
    """(BK, NK, BV): NK key tiles of BK rows (each state is NK fp32 [BK, BV] tiles, as the gated delta kernels hold
    theirs), BV = 16, the narrowest tensor-core tile."""
    if K <= _BK_MAX:
        return max(16, triton.next_power_of_2(K)), 1, 16
    return max(16, triton.next_power_of_2(triton.cdiv(K, 2))), 2, 16


# 8 warps and 2 stages: with K split in 64-row tiles every kernel compiles spill-free for sm_80 and sm_90 at the
# layer's chunk (16) for K = 64 and 128 in bf16, fp16 and fp32 (4 warps or 3 stages spill up to 120 B at fp32 K = 128).
_NUM_WARPS = 8


def _stages(chunk_size: int, BK: int) -> int:
    # 2 stages while the staged [BT, BK] / [BK, BV] buffers stay small; one beyond (chunk 64 at fp32 would need
    # more shared memory than sm_80's 163 KB).
    return 2 if chunk_size * BK <= 2048 else 1


def _launch_forward(q, k, v, theta, log_eta, log_gamma, wb, w, s, start_pos, cu, chunk_size, precision,
                    store_states=False, dy=None):
    T, H, K = q.shape
    V = v.shape[-1]
    n_seq = cu.shape[0] - 1
    BK, NK, BV = _blocks(K, V)
    y = torch.empty(T, H, V, dtype=q.dtype, device=q.device)
    outs = [torch.empty(n_seq, H, K, V, dtype=torch.float32, device=q.device) for _ in range(3)]
    if store_states:
        # Every sequence has at most ceil(L / b) + 1 chunks (a partial head and tail).
        rows = T // chunk_size + 2 * n_seq
        chunk_off = ((start_pos + (cu[1:] - cu[:-1]) + chunk_size - 1) // chunk_size).cumsum(0)
        chunk_off = torch.cat((chunk_off.new_zeros(1), chunk_off[:-1])).contiguous()
        h_w, h_s = (torch.empty(rows, H, K, V, dtype=torch.float32, device=q.device) for _ in range(2))
    else:
        chunk_off, h_w, h_s = start_pos, y, y
    # per-channel decay: the backward's re-run stores C^T dY for the reverse pass
    h_cdy = y
    if store_states and log_gamma.dim() == 3:
        h_cdy = torch.empty(T, H, V, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(V, BV), n_seq * H)
    _titans_linear_fwd_kernel[grid](
        q, k, v, theta, log_eta, log_gamma, wb, w, s, start_pos, cu, y, *outs, h_w, h_s, chunk_off,
        y if dy is None else dy, h_cdy, T,
        H=H, K=K, V=V, BT=chunk_size, BK=BK, BV=BV, NK=NK, CHANNEL=log_gamma.dim() == 3, STORE_STATES=store_states,
        DOT_PRECISION=precision,
        num_stages=_stages(chunk_size, BK), num_warps=_NUM_WARPS,
    )
    if store_states:
        return (y, *outs), (h_w, h_s, chunk_off, h_cdy)
    return (y, *outs)


def _launch_backward(q, k, v, theta, log_eta, log_gamma, wb, w, s, start_pos, cu, chunk_size, precision, dy, dwb, dw,
                     ds):
    T, H, K = q.shape
    V = v.shape[-1]
    n_seq = cu.shape[0] - 1
    BK, NK, BV = _blocks(K, V)
    NV = triton.cdiv(V, BV)
    channel = log_gamma.dim() == 3
    _, (h_w, h_s, chunk_off, h_cdy) = _launch_forward(q, k, v, theta, log_eta, log_gamma, wb, w, s, start_pos, cu,
                                                      chunk_size, precision, store_states=True, dy=dy)
    dq, dk = (torch.empty(NV, T, H, K, dtype=torch.float32, device=q.device) for _ in range(2))
    dv = torch.empty_like(v)
    dw_end, ds_end = torch.empty_like(h_w), torch.empty_like(h_s)
    dwb0, dw0, ds0 = (torch.empty(n_seq, H, K, V, dtype=torch.float32, device=q.device) for _ in range(3))
    _titans_linear_bwd_kernel[(NV, n_seq * H)](
        q, k, v, theta, log_eta, log_gamma, wb, start_pos, cu, h_w, h_s, chunk_off, h_cdy, dy, dwb, dw, ds,
        dk, dv, dw_end, ds_end, dwb0, dw0, ds0, T, T, H=H, K=K, V=V, BT=chunk_size, BK=BK, BV=BV, NK=NK,
        CHANNEL=channel, DOT_PRECISION=precision, num_stages=_stages(chunk_size, BK), num_warps=_NUM_WARPS,
    )
    # dq, then the gate gradients, each in its own launch: with them the reverse pass spills. With a per-channel
    # decay, one program per key tile, and both launches give dtheta, dlog_eta (2 x NV x NK partial sums).
    n_part = NV * NK if channel else NV
    dth, dle = (torch.empty(2 * n_part if channel else n_part, T, H, dtype=torch.float32, device=q.device)
                for _ in range(2))
    dlg = torch.empty(NV, *log_gamma.shape, dtype=torch.float32, device=q.device)
    for want_dq in (True, False):
        _titans_linear_dgate_kernel[(n_part, n_seq * H)](
            q, k, v, theta, log_eta, log_gamma, wb, start_pos, cu, h_w, h_s, chunk_off, dy, dw_end, ds_end,
            dq, dk, dth, dle, dlg, T, T, H=H, K=K, V=V, BT=chunk_size, BK=BK, BV=BV, NK=NK, CHANNEL=channel, DQ=want_dq,
            DOT_PRECISION=precision, num_stages=_stages(chunk_size, BK), num_warps=_NUM_WARPS,
        )
    grads = (dq.sum(0), dk.sum(0), dv, dth.sum(0), dle.sum(0), dlg.sum(0))
    return [g.to(x.dtype) for g, x in zip(grads, (q, k, v, theta, log_eta, log_gamma))] + [dwb0, dw0, ds0]


@torch.library.custom_op("memzoo::titans_linear_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, theta: Tensor, log_eta: Tensor, log_gamma: Tensor, wb: Tensor,
            w: Tensor, s: Tensor, start_pos: Tensor, cu: Tensor, chunk_size: int, precision: str
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _launch_forward(q, k, v, theta, log_eta, log_gamma, wb, w, s, start_pos, cu, chunk_size, precision)


@_fwd_op.register_fake
def _(q, k, v, theta, log_eta, log_gamma, wb, w, s, start_pos, cu, chunk_size, precision):
    T, H, _ = q.shape
    return (v.new_empty(T, H, v.shape[-1], dtype=q.dtype), torch.empty_like(wb), torch.empty_like(w),
            torch.empty_like(s))


@torch.library.custom_op("memzoo::titans_linear_bwd", mutates_args=())
def _bwd_op(q: Tensor, k: Tensor, v: Tensor, theta: Tensor, log_eta: Tensor, log_gamma: Tensor, wb: Tensor,
            w: Tensor, s: Tensor, start_pos: Tensor, cu: Tensor, chunk_size: int, precision: str, dy: Tensor,
            dwb: Tensor, dw: Tensor, ds: Tensor) -> list[Tensor]:
    return _launch_backward(q, k, v, theta, log_eta, log_gamma, wb, w, s, start_pos, cu, chunk_size, precision, dy,
                            dwb, dw, ds)


@_bwd_op.register_fake
def _(q, k, v, theta, log_eta, log_gamma, wb, w, s, start_pos, cu, chunk_size, precision, dy, dwb, dw, ds):
    return [torch.empty_like(x) for x in (q, k, v, theta, log_eta, log_gamma, wb, w, s)]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:11])
    ctx.chunk_size, ctx.precision = inputs[11], inputs[12]


def _backward(ctx, dy, dwb, dw, ds):
    saved = ctx.saved_tensors
    q, v, wb = saved[0], saved[2], saved[6]
    dy = torch.zeros(q.shape[:2] + v.shape[-1:], dtype=q.dtype, device=q.device) if dy is None else dy
    dwb, dw, ds = (torch.zeros_like(wb) if d is None else d.contiguous() for d in (dwb, dw, ds))
    grads = _bwd_op(*saved, ctx.chunk_size, ctx.precision, dy.contiguous(), dwb, dw, ds)
    return (*grads, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def titans_linear_triton(q: Tensor, k: Tensor, v: Tensor, theta: Tensor, log_eta: Tensor, log_gamma: Tensor,
                         initial_state: tuple[Tensor, Tensor, Tensor], start_pos: Tensor, chunk_size: int,
                         cu_seqlens: Tensor | None = None, precision: str | None = None
                         ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """The Triton path of ``titans_linear`` (inputs validated by the dispatcher; log_gamma per head or key channel)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16 on the Triton path, got {chunk_size}")
    if K > 256:
        raise ValueError(f"the Triton path keeps [K, BV] state tiles in registers: K must be <= 256, got {K}")
    (q, cu), (k, _), (v, _), (theta, _), (log_eta, _), (log_gamma, _) = (
        flatten_batch(x, cu_seqlens) for x in (q, k, v, theta, log_eta, log_gamma))
    q, k, v, theta, log_eta, log_gamma = (x[0].contiguous() for x in (q, k, v, theta, log_eta, log_gamma))
    wb, w, s = (x.float().contiguous() for x in initial_state)
    start_pos = start_pos.to(device=q.device, dtype=torch.int64).contiguous()
    y, wb, w, s = _fwd_op(q, k, v, theta, log_eta, log_gamma, wb, w, s, start_pos, cu.contiguous(), chunk_size,
                          resolve_dot_precision(precision))
    return y.reshape(B, T, H, V), (wb, w, s)
