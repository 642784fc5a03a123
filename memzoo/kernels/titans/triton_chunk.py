"""Triton forward of the linear Titans memory (momentum + per-head decay), closed chunk form of titans.md §2.

Paper: "Titans: Learning to Memorize at Test Time" (arXiv 2501.00663).  Per head, state W, S [K, V] in fp32:

    S_t = eta_t S_{t-1} - theta_t k_t^T (k_t W_t' - v_t),    W_t = gamma_t W_{t-1} + S_t,    y_t = q_t W_t

One program per (V tile, sequence, head) walks the chunks of its sequence with W_base, W, S resident in registers.
Per chunk (b = BT tokens, a partial first chunk when the sequence starts at ``start_pos`` > 0, padded rows are
exact identities): E = K W_base - V; Lam = beta_t/beta_i, N = theta_j prod eta, G = Lam N and f = Lam m from
log-cumsums (only exponents <= 0 are taken); Y = beta (Q W) + f (Q S) - (G * QK^T) E; the chunk end updates
W, S with rank-b products.  No triangular solve: the gradients are frozen at the chunk start.

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


@triton.jit(do_not_specialize=["T"])
def _titans_linear_fwd_kernel(
    q, k, v, theta, log_eta, log_gamma, wb0, w0, s0, start_pos, cu, y, wb_out, w_out, s_out, h_w, h_s, chunk_off,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    STORE_STATES: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu + i_n).to(tl.int64)
    n_tok = tl.load(cu + i_n + 1).to(tl.int64) - bos
    pos0 = tl.load(start_pos + i_n).to(tl.int64)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    # int64 only in scalar bases; tile offsets are int32.
    p_state = tl.cast(i_nh, tl.int64) * K * V
    o_kv = o_k[:, None] * V + o_v[None, :]  # [BK, BV]
    b_w = tl.load(w0 + p_state + o_kv, mask=m_kv, other=0.0)  # [BK, BV]
    b_s = tl.load(s0 + p_state + o_kv, mask=m_kv, other=0.0)  # [BK, BV]
    n_chunks = (pos0 + n_tok + BT - 1) // BT
    next_chunk = (pos0 + n_tok) // BT
    m_causal = o_t[:, None] >= o_t[None, :]  # [BT, BT]
    last = o_t == BT - 1
    # The returned gradient base is the weights at the end of chunk next_chunk - 1 (stored there), or the initial
    # base when the next token is in the first chunk; no extra [BK, BV] tile is carried.
    if next_chunk == 0:
        tl.store(wb_out + p_state + o_kv, tl.load(wb0 + p_state + o_kv, mask=m_kv, other=0.0), mask=m_kv)
    if STORE_STATES:
        o_first = tl.load(chunk_off + i_n).to(tl.int64)
    for i_c in range(0, n_chunks):
        if STORE_STATES:
            # Chunk-start states for the backward pass (only chunk boundaries are ever stored).
            p_h = ((o_first + i_c) * H + i_h) * K * V
            tl.store(h_w + p_h + o_kv, b_w, mask=m_kv)
            tl.store(h_s + p_h + o_kv, b_s, mask=m_kv)
        # Token t0 + o_t of the packed sequence sits at slot o_t of this chunk (t0 < bos in a partial first chunk).
        t0 = bos + tl.cast(i_c, tl.int64) * BT - pos0
        o_rel = t0 - bos + o_t  # [BT] token index inside the sequence
        m_t = (o_rel >= 0) & (o_rel < n_tok)
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        o_tk = o_t[:, None] * (H * K) + o_k[None, :]  # [BT, BK]
        o_tv = o_t[:, None] * (H * V) + o_v[None, :]  # [BT, BV]
        b_q = tl.load(q + (t0 * H + i_h) * K + o_tk, mask=m_tk, other=0.0)  # [BT, BK]
        b_k = tl.load(k + (t0 * H + i_h) * K + o_tk, mask=m_tk, other=0.0)  # [BT, BK]
        b_v = tl.load(v + (t0 * H + i_h) * V + o_tv, mask=m_tv, other=0.0).to(tl.float32)  # [BT, BV]
        # Rows outside the sequence get theta = 0, eta = gamma = 1: identity updates.
        p_g = t0 * H + i_h + o_t * H
        b_th = tl.load(theta + p_g, mask=m_t, other=0.0).to(tl.float32)  # [BT]
        b_le_raw = tl.load(log_eta + p_g, mask=m_t, other=0.0).to(tl.float32)  # [BT]
        b_lg_raw = tl.load(log_gamma + p_g, mask=m_t, other=0.0).to(tl.float32)  # [BT]
        # Exponentiate only differences with i <= t; a padded column i adds no S_i to W.
        b_lam, _, b_nm, b_G, b_m, b_f, b_beta = _chunk_coefficients(b_th, b_le_raw, b_lg_raw, m_t, m_causal,
                                                                    DOT_PRECISION)
        b_A = b_G * tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)  # [BT, BT]
        # Errors at the chunk base, E = K W_base - V (the base is W except in the first chunk).
        m_first = (tl.zeros([BK, BV], dtype=tl.int32) + i_c) == 0  # [BK, BV] splat of i_c == 0
        b_wb = tl.load(wb0 + p_state + o_kv, mask=m_kv & m_first, other=0.0)
        b_wb = tl.where(m_first, b_wb, b_w)  # [BK, BV]
        b_e = tl.dot(b_k, b_wb.to(b_k.dtype), -b_v, input_precision=DOT_PRECISION)  # [BT, BV]
        b_y = b_beta[:, None] * tl.dot(b_q, b_w.to(b_q.dtype), input_precision=DOT_PRECISION)
        b_y += b_f[:, None] * tl.dot(b_q, b_s.to(b_q.dtype), input_precision=DOT_PRECISION)
        b_y = tl.dot((-b_A).to(b_q.dtype), b_e.to(b_q.dtype), b_y, input_precision=DOT_PRECISION)
        tl.store(y + (t0 * H + i_h) * V + o_tv, b_y.to(y.dtype.element_ty), mask=m_tv)
        b_g_end = tl.sum(tl.where(last[:, None], b_G, 0.0), axis=0)  # [BT] row b of G
        b_n_end = tl.sum(tl.where(last[:, None], b_nm, 0.0), axis=0)  # [BT] row b of N
        b_beta_end = tl.sum(tl.where(last, b_beta, 0.0))
        b_f_end = tl.sum(tl.where(last, b_f, 0.0))
        b_m_end = tl.sum(tl.where(last, b_m, 0.0))
        b_kt = tl.trans(b_k)  # [BK, BT]
        b_w_new = tl.dot(b_kt, (-b_g_end[:, None] * b_e).to(b_k.dtype), b_beta_end * b_w + b_f_end * b_s,
                         input_precision=DOT_PRECISION)
        b_s = tl.dot(b_kt, (-b_n_end[:, None] * b_e).to(b_k.dtype), b_m_end * b_s, input_precision=DOT_PRECISION)
        b_w = b_w_new
        if next_chunk == i_c + 1:
            tl.store(wb_out + p_state + o_kv, b_w, mask=m_kv)
    tl.store(w_out + p_state + o_kv, b_w, mask=m_kv)
    tl.store(s_out + p_state + o_kv, b_s, mask=m_kv)


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


@triton.jit(do_not_specialize=["T"])
def _titans_linear_bwd_kernel(
    q, k, v, theta, log_eta, log_gamma, wb0, start_pos, cu, h_w, h_s, chunk_off, dy, dwb_out, dw_out, ds_out,
    dk, dv, dw_end, ds_end, dwb0, dw0, ds0, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Reverse chunk pass: dW, dS (the gradients w.r.t. the chunk-end states) walk back through the chunks.

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
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    # int64 only in scalar bases; tile offsets are int32.
    p_state = tl.cast(i_nh, tl.int64) * K * V
    o_kv = o_k[:, None] * V + o_v[None, :]  # [BK, BV]
    b_dw = tl.load(dw_out + p_state + o_kv, mask=m_kv, other=0.0)  # [BK, BV] gradient w.r.t. the chunk-end W
    b_ds = tl.load(ds_out + p_state + o_kv, mask=m_kv, other=0.0)  # [BK, BV]
    n_chunks = (pos0 + n_tok + BT - 1) // BT
    next_chunk = (pos0 + n_tok) // BT
    # The gradient w.r.t. the returned base joins the chunk that ends at it (none: the initial base, whose gradient
    # is written by the first chunk, or here when the sequence has no chunk). Read from memory where needed, so no
    # extra [BK, BV] tile stays live across the loop.
    if n_chunks == 0:
        tl.store(dwb0 + p_state + o_kv, tl.load(dwb_out + p_state + o_kv, mask=m_kv, other=0.0), mask=m_kv)
    m_causal = o_t[:, None] >= o_t[None, :]
    last = o_t == BT - 1
    o_dpart = tl.cast(i_v, tl.int64) * NT
    for i_r in range(0, n_chunks):
        i_c = n_chunks - 1 - i_r
        # The returned base is the end of chunk next_chunk - 1.
        m_ends = (tl.zeros([BK, BV], dtype=tl.int64) + next_chunk) == i_c + 1  # [BK, BV] splat
        b_dw += tl.load(dwb_out + p_state + o_kv, mask=m_kv & m_ends, other=0.0)
        p_h = ((o_first + i_c) * H + i_h) * K * V
        tl.store(dw_end + p_h + o_kv, b_dw, mask=m_kv)
        tl.store(ds_end + p_h + o_kv, b_ds, mask=m_kv)
        p_wg = tl.where(i_c == 0, wb0 + p_state, h_w + p_h)
        b_wg = tl.load(p_wg + o_kv, mask=m_kv, other=0.0)  # [BK, BV] gradient base
        t0 = bos + tl.cast(i_c, tl.int64) * BT - pos0
        o_rel = t0 - bos + o_t
        m_t = (o_rel >= 0) & (o_rel < n_tok)
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        o_tk = o_t[:, None] * (H * K) + o_k[None, :]  # [BT, BK]
        o_tv = o_t[:, None] * (H * V) + o_v[None, :]  # [BT, BV]
        b_q = tl.load(q + (t0 * H + i_h) * K + o_tk, mask=m_tk, other=0.0)  # [BT, BK]
        b_k = tl.load(k + (t0 * H + i_h) * K + o_tk, mask=m_tk, other=0.0)  # [BT, BK]
        dt = b_k.dtype
        b_v = tl.load(v + (t0 * H + i_h) * V + o_tv, mask=m_tv, other=0.0).to(tl.float32)  # [BT, BV]
        b_do = tl.load(dy + (t0 * H + i_h) * V + o_tv, mask=m_tv, other=0.0).to(dt)  # [BT, BV]
        p_g = t0 * H + i_h + o_t * H
        b_th = tl.load(theta + p_g, mask=m_t, other=0.0).to(tl.float32)
        b_le_raw = tl.load(log_eta + p_g, mask=m_t, other=0.0).to(tl.float32)
        b_lg_raw = tl.load(log_gamma + p_g, mask=m_t, other=0.0).to(tl.float32)
        b_lam, b_p, b_nm, b_G, b_m, b_f, b_beta = _chunk_coefficients(b_th, b_le_raw, b_lg_raw, m_t, m_causal,
                                                                      DOT_PRECISION)
        b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)  # [BT, BT]
        b_e = tl.dot(b_k, b_wg.to(dt), -b_v, input_precision=DOT_PRECISION)  # [BT, BV]
        b_g_end = tl.sum(tl.where(last[:, None], b_G, 0.0), axis=0)  # [BT]
        b_n_end = tl.sum(tl.where(last[:, None], b_nm, 0.0), axis=0)  # [BT]
        b_beta_end = tl.sum(tl.where(last, b_beta, 0.0))
        b_f_end = tl.sum(tl.where(last, b_f, 0.0))
        b_m_end = tl.sum(tl.where(last, b_m, 0.0))
        b_kdw = tl.dot(b_k, b_dw.to(dt), input_precision=DOT_PRECISION)  # [BT, BV]
        b_kds = tl.dot(b_k, b_ds.to(dt), input_precision=DOT_PRECISION)  # [BT, BV]
        b_da = -tl.dot(b_do, tl.trans(b_e.to(dt)), input_precision=DOT_PRECISION)  # [BT, BT] gradient of G * QK^T
        b_dag = b_da * b_G
        # E feeds the outputs (through -A E) and both chunk-end states.
        b_de = -(b_g_end[:, None] * b_kdw + b_n_end[:, None] * b_kds)  # [BT, BV]
        b_de = tl.dot(tl.trans(-(b_G * b_qk)).to(dt), b_do, b_de, input_precision=DOT_PRECISION)
        tl.store(dv + (t0 * H + i_h) * V + o_tv, (-b_de).to(dv.dtype.element_ty), mask=m_tv)
        b_dk = tl.dot(b_de.to(dt), tl.trans(b_wg.to(dt)), input_precision=DOT_PRECISION)
        b_dk = tl.dot(tl.trans(b_dag.to(dt)), b_q, b_dk, input_precision=DOT_PRECISION)
        b_dk -= b_g_end[:, None] * tl.dot(b_e.to(dt), tl.trans(b_dw.to(dt)), input_precision=DOT_PRECISION)
        b_dk -= b_n_end[:, None] * tl.dot(b_e.to(dt), tl.trans(b_ds.to(dt)), input_precision=DOT_PRECISION)
        p_part = (o_dpart + t0) * H * K + i_h * K
        tl.store(dk + p_part + o_tk, b_dk, mask=m_tk)
        # Gradients w.r.t. this chunk's start states (W is also the base of every chunk but the first).
        b_dwg = tl.dot(tl.trans(b_k), b_de.to(dt), input_precision=DOT_PRECISION)  # [BK, BV]
        b_dw_start = tl.dot(tl.trans(b_q), (b_beta[:, None] * b_do).to(dt), b_beta_end * b_dw,
                            input_precision=DOT_PRECISION)
        b_ds = tl.dot(tl.trans(b_q), (b_f[:, None] * b_do).to(dt), b_f_end * b_dw + b_m_end * b_ds,
                      input_precision=DOT_PRECISION)
        if i_c == 0:
            m_ends = (tl.zeros([BK, BV], dtype=tl.int64) + next_chunk) == 0  # [BK, BV] splat
            b_dnb = tl.load(dwb_out + p_state + o_kv, mask=m_kv & m_ends, other=0.0)
            tl.store(dwb0 + p_state + o_kv, b_dwg + b_dnb, mask=m_kv)
        b_dw = b_dw_start + tl.where(i_c == 0, 0.0, b_dwg)
    tl.store(dw0 + p_state + o_kv, b_dw, mask=m_kv)
    tl.store(ds0 + p_state + o_kv, b_ds, mask=m_kv)


@triton.jit(do_not_specialize=["T"])
def _titans_linear_dgate_kernel(
    q, k, v, theta, log_eta, log_gamma, wb0, start_pos, cu, h_w, h_s, chunk_off, dy, dw_end, ds_end,
    dq, dth, dle, dlg, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dq (``DQ``) or else the gate gradients (dtheta, dlog_eta, dlog_gamma), partial sums over this program's V tile,
    of every chunk from its start states (h_w, h_s, the base) and end-state gradients (dw_end, ds_end); no tile is
    carried between chunks. Two launches, so neither holds the other's tiles.

    dG = dA * QK^T minus the end-row terms, dbeta, df, dm, chained through G = Lam N, f = Lam m, the exponentials and
    a reverse in-chunk cumsum.
    """
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu + i_n).to(tl.int64)
    n_tok = tl.load(cu + i_n + 1).to(tl.int64) - bos
    pos0 = tl.load(start_pos + i_n).to(tl.int64)
    o_first = tl.load(chunk_off + i_n).to(tl.int64)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    # int64 only in scalar bases; tile offsets are int32.
    p_state = tl.cast(i_nh, tl.int64) * K * V
    o_kv = o_k[:, None] * V + o_v[None, :]  # [BK, BV]
    n_chunks = (pos0 + n_tok + BT - 1) // BT
    m_causal = o_t[:, None] >= o_t[None, :]
    last = o_t == BT - 1
    o_dpart = tl.cast(i_v, tl.int64) * NT
    for i_c in range(0, n_chunks):
        p_h = ((o_first + i_c) * H + i_h) * K * V
        t0 = bos + tl.cast(i_c, tl.int64) * BT - pos0
        # The first chunk (the only one that starts at or before the sequence start) has the base W_base.
        p_wg = tl.where(t0 <= bos, wb0 + p_state, h_w + p_h)
        o_rel = t0 - bos + o_t
        m_t = (o_rel >= 0) & (o_rel < n_tok)
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        o_tk = o_t[:, None] * (H * K) + o_k[None, :]  # [BT, BK]
        o_tv = o_t[:, None] * (H * V) + o_v[None, :]  # [BT, BV]
        b_q = tl.load(q + (t0 * H + i_h) * K + o_tk, mask=m_tk, other=0.0)  # [BT, BK]
        b_k = tl.load(k + (t0 * H + i_h) * K + o_tk, mask=m_tk, other=0.0)  # [BT, BK]
        dt = b_k.dtype
        b_v = tl.load(v + (t0 * H + i_h) * V + o_tv, mask=m_tv, other=0.0).to(tl.float32)  # [BT, BV]
        b_do = tl.load(dy + (t0 * H + i_h) * V + o_tv, mask=m_tv, other=0.0).to(dt)  # [BT, BV]
        p_g = t0 * H + i_h + o_t * H
        b_th = tl.load(theta + p_g, mask=m_t, other=0.0).to(tl.float32)
        b_le_raw = tl.load(log_eta + p_g, mask=m_t, other=0.0).to(tl.float32)
        b_lg_raw = tl.load(log_gamma + p_g, mask=m_t, other=0.0).to(tl.float32)
        b_lam, b_p, b_nm, b_G, b_m, b_f, b_beta = _chunk_coefficients(b_th, b_le_raw, b_lg_raw, m_t, m_causal,
                                                                      DOT_PRECISION)
        b_wg = tl.load(p_wg + o_kv, mask=m_kv, other=0.0)  # [BK, BV] gradient base
        b_e = tl.dot(b_k, b_wg.to(dt), -b_v, input_precision=DOT_PRECISION)  # [BT, BV]
        b_da = -tl.dot(b_do, tl.trans(b_e.to(dt)), input_precision=DOT_PRECISION)  # [BT, BT] gradient of G * QK^T
        if DQ:
            b_w = tl.load(h_w + p_h + o_kv, mask=m_kv, other=0.0)  # [BK, BV] chunk-start W
            b_s = tl.load(h_s + p_h + o_kv, mask=m_kv, other=0.0)  # [BK, BV] chunk-start S
            b_dq = b_beta[:, None] * tl.dot(b_do, tl.trans(b_w.to(dt)), input_precision=DOT_PRECISION)
            b_dq += b_f[:, None] * tl.dot(b_do, tl.trans(b_s.to(dt)), input_precision=DOT_PRECISION)
            b_dq = tl.dot((b_da * b_G).to(dt), b_k, b_dq, input_precision=DOT_PRECISION)  # [BT, BK]
            tl.store(dq + (o_dpart + t0) * H * K + i_h * K + o_tk, b_dq, mask=m_tk)
        else:
            b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)  # [BT, BT]
            b_dw = tl.load(dw_end + p_h + o_kv, mask=m_kv, other=0.0)  # [BK, BV] gradient w.r.t. the chunk-end W
            b_ds = tl.load(ds_end + p_h + o_kv, mask=m_kv, other=0.0)  # [BK, BV]
            b_kdw = tl.dot(b_k, b_dw.to(dt), input_precision=DOT_PRECISION)  # [BT, BV]
            b_kds = tl.dot(b_k, b_ds.to(dt), input_precision=DOT_PRECISION)  # [BT, BV]
            b_w = tl.load(h_w + p_h + o_kv, mask=m_kv, other=0.0)  # [BK, BV] chunk-start W
            b_s = tl.load(h_s + p_h + o_kv, mask=m_kv, other=0.0)  # [BK, BV] chunk-start S
            # Coefficient gradients (this V tile's share), then the chain through the log-cumsums.
            b_dbeta = tl.sum(b_do.to(tl.float32) * tl.dot(b_q, b_w.to(dt), input_precision=DOT_PRECISION), axis=1)
            b_dbeta += tl.where(last, tl.sum(b_dw * b_w), 0.0)
            b_df = tl.sum(b_do.to(tl.float32) * tl.dot(b_q, b_s.to(dt), input_precision=DOT_PRECISION), axis=1)
            b_df += tl.where(last, tl.sum(b_dw * b_s), 0.0)
            b_dm = tl.where(last, tl.sum(b_ds * b_s), 0.0)  # [BT]
            b_dG = b_da * b_qk - tl.where(last[:, None], tl.sum(b_e * b_kdw, axis=1)[None, :], 0.0)
            b_dN = -tl.where(last[:, None], tl.sum(b_e * b_kds, axis=1)[None, :], 0.0)
            b_dN = tl.dot(tl.trans(b_lam), b_dG, b_dN, input_precision=DOT_PRECISION)
            b_dlam = tl.dot(b_dG, tl.trans(b_nm), b_df[:, None] * b_m[None, :], input_precision=DOT_PRECISION)
            b_dm += tl.sum(b_lam * b_df[:, None], axis=0)
            b_dth = tl.sum(b_dN * b_p, axis=0)
            b_dpp = b_dN * b_nm  # dP * P
            b_dll = b_dlam * b_lam
            b_dle_c = b_dm * b_m + tl.sum(b_dpp, axis=1) - tl.sum(b_dpp, axis=0)
            b_dlg_c = b_dbeta * b_beta + tl.sum(b_dll, axis=1) - tl.sum(b_dll, axis=0)
            # Cumsum backward: a reverse cumsum inside the chunk.
            b_dle = tl.sum(b_dle_c) - tl.cumsum(b_dle_c, axis=0) + b_dle_c
            b_dlg = tl.sum(b_dlg_c) - tl.cumsum(b_dlg_c, axis=0) + b_dlg_c
            p_gp = (o_dpart + t0) * H + i_h + o_t * H
            tl.store(dth + p_gp, b_dth, mask=m_t)
            tl.store(dle + p_gp, b_dle, mask=m_t)
            tl.store(dlg + p_gp, b_dlg, mask=m_t)


def _blocks(K, V):
    # BV = 16, the narrowest tensor-core tile: the backward keeps five fp32 [K, BV] state tiles live.
    return max(16, triton.next_power_of_2(K)), 16


def _stages(chunk_size: int, BK: int) -> int:
    # Triton's default 3 stages (fewer spills) while the staged [BT, BK] / [BK, BV] buffers fit the shared memory of
    # sm_80 (163 KB) at fp32; one stage beyond (chunk 64 at K = 128 would need up to 258 KB).
    return 3 if chunk_size * BK <= 2048 else 1


def _launch_forward(q, k, v, theta, log_eta, log_gamma, wb, w, s, start_pos, cu, chunk_size, precision,
                    store_states=False):
    T, H, K = q.shape
    V = v.shape[-1]
    n_seq = cu.shape[0] - 1
    BK, BV = _blocks(K, V)
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
    grid = (triton.cdiv(V, BV), n_seq * H)
    _titans_linear_fwd_kernel[grid](
        q, k, v, theta, log_eta, log_gamma, wb, w, s, start_pos, cu, y, *outs, h_w, h_s, chunk_off, T,
        H=H, K=K, V=V, BT=chunk_size, BK=BK, BV=BV, STORE_STATES=store_states, DOT_PRECISION=precision,
        num_stages=_stages(chunk_size, BK),
    )
    if store_states:
        return (y, *outs), (h_w, h_s, chunk_off)
    return (y, *outs)


def _launch_backward(q, k, v, theta, log_eta, log_gamma, wb, w, s, start_pos, cu, chunk_size, precision, dy, dwb, dw,
                     ds):
    T, H, K = q.shape
    V = v.shape[-1]
    n_seq = cu.shape[0] - 1
    BK, BV = _blocks(K, V)
    NV = triton.cdiv(V, BV)
    _, (h_w, h_s, chunk_off) = _launch_forward(q, k, v, theta, log_eta, log_gamma, wb, w, s, start_pos, cu,
                                               chunk_size, precision, store_states=True)
    dq, dk = (torch.empty(NV, T, H, K, dtype=torch.float32, device=q.device) for _ in range(2))
    dv = torch.empty_like(v)
    dw_end, ds_end = torch.empty_like(h_w), torch.empty_like(h_s)
    dwb0, dw0, ds0 = (torch.empty(n_seq, H, K, V, dtype=torch.float32, device=q.device) for _ in range(3))
    _titans_linear_bwd_kernel[(NV, n_seq * H)](
        q, k, v, theta, log_eta, log_gamma, wb, start_pos, cu, h_w, h_s, chunk_off, dy, dwb, dw, ds,
        dk, dv, dw_end, ds_end, dwb0, dw0, ds0, T, T, H=H, K=K, V=V, BT=chunk_size, BK=BK, BV=BV,
        DOT_PRECISION=precision, num_stages=_stages(chunk_size, BK),
    )
    # dq, then the gate gradients, each in its own launch: with them the reverse pass spills.
    dth, dle, dlg = (torch.empty(NV, T, H, dtype=torch.float32, device=q.device) for _ in range(3))
    for want_dq in (True, False):
        _titans_linear_dgate_kernel[(NV, n_seq * H)](
            q, k, v, theta, log_eta, log_gamma, wb, start_pos, cu, h_w, h_s, chunk_off, dy, dw_end, ds_end,
            dq, dth, dle, dlg, T, T, H=H, K=K, V=V, BT=chunk_size, BK=BK, BV=BV, DQ=want_dq, DOT_PRECISION=precision,
            num_stages=_stages(chunk_size, BK),
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
    """The Triton path of ``titans_linear`` (inputs validated by the dispatcher; per-head log_gamma only)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if log_gamma.dim() != 3:
        raise ValueError("the Triton path takes a per-head log_gamma [B, T, H]; use impl='ref' for channel-wise")
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
