"""Triton reverse walk of the 2-layer MLP Titans memory: the sequential part of ``mlp_chunk``'s backward.

Paper: "Titans: Learning to Memorize at Test Time" (arXiv 2501.00663), eqs 13-18; the forward and its derivation
are in ``triton_mlp.py`` and README.md ("MLP memory").  The reads' backward (every chunk at once, batched matmuls in
``mlp_chunk``) gives the cotangents d_act, d_G_z, d_G_h of the base pass and dH_q, dp of the reads; what is left is
sequential: the gradient of the state after chunk c, dX' = [dW' | dS'] per matrix, walked from the last chunk to the
first through

    (r) lq retention (chunks that ended before the next token): dW' <- retain_vjp(W_pre, dW')
    (1) d lhs = -rhs dX'^T,  d rhs = -lhs dX',  d(beta_b, f_b, m_b) = <dW', W>, <dW', S>, <dS', S>
    (2) the base pass's vector-Jacobian product (LayerNorm, psi and gelu second derivatives) for d K, d V, d B
    (3) dX = [beta_b dW' | m_b dS' + f_b dW'] + (A_q^T dp, dH_q^T [beta Q | f Q]) + [dB | 0]

with lhs = (A, G_h), rows = (G_z, K), rhs = [g_b rows | n_b rows] for matrices (A1 | S1, A2^T | S2^T).  One program
per (sequence, head); the carry dX lives in an fp32 global workspace (``[2, N, H, E, 2D]``, returned as the gradient
of the initial state) like the forward's states, E streamed in tiles of 16 rows, four E loops per chunk (two with lq
retention's statistics).  Loop (1) writes the base pass's total cotangents d_act + d lhs_1 and d_G_h + d lhs_2 over
their inputs, which loop (2) reads back.  Every chunk of the grid is walked, padding included (its rows are exact
identities), so the results are the PyTorch walk's.  Dots take input-dtype operands with fp32 accumulation (TF32 for
fp32 inputs unless ``precision="ieee"``); float64 inputs keep float64 throughout (interpreter exactness tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import Miras
from .triton_mlp import _DOT_DTYPES, _chunk_base, _chunk_offsets, _config

__all__ = ["titans_mlp_walk_bwd_triton"]


@triton.jit
def _updated_weights(p_x, b_lhs, b_ge, b_rows, beta_b, f_b, o_w, D: tl.constexpr, DT: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """One ``[BE, D]`` tile of W_pre = beta_b W + f_b S - (lhs diag(g_b))^T rows (the chunk-end weights before
    retention), computed as the forward does."""
    b_w = tl.load(p_x + o_w)
    b_s = tl.load(p_x + D + o_w)
    return tl.dot(tl.trans((b_lhs * -b_ge[:, None]).to(DT)), b_rows, beta_b * b_w + f_b * b_s,
                  input_precision=DOT_PRECISION)


@triton.jit
def _lq_retain_vjp(p_x, p_c, p_lhs, b_ge, b_rows, beta_b, f_b, lq_q, lq_eps, D: tl.constexpr, E: tl.constexpr,
                   BT: tl.constexpr, BE: tl.constexpr, DT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dW' <- c dW' - (q - 2) <dW', W_pre> n^(-(2q - 2)/q) |W_pre|^(q - 2) W_pre for one matrix, with
    n = ||W_pre||_q^q + eps and c = n^(-(q - 2)/q); ``p_x`` the chunk's start state, ``p_c`` the carry (rows 2D
    apart), ``p_lhs`` the ``[BT, E]`` lhs rows, ``b_ge`` the chunk-end row of G, ``b_rows`` the rows (dot dtype)."""
    o_e = tl.arange(0, BE)
    o_d = tl.arange(0, D)
    o_te = tl.arange(0, BT)[:, None] * E + o_e[None, :]
    b_nq = tl.zeros([D], dtype=p_c.dtype.element_ty)
    b_gw = tl.zeros([D], dtype=p_c.dtype.element_ty)
    for i_e in range(0, E // BE):
        o_w = (i_e * BE + o_e)[:, None] * (2 * D) + o_d[None, :]  # [BE, D]
        b_w = _updated_weights(p_x, tl.load(p_lhs + i_e * BE + o_te), b_ge, b_rows, beta_b, f_b, o_w, D, DT,
                               DOT_PRECISION)
        b_nq += tl.sum(tl.exp(lq_q * tl.log(tl.maximum(tl.abs(b_w), 1e-30))), axis=0)
        b_gw += tl.sum(tl.load(p_c + o_w) * b_w, axis=0)
    b_log_n = tl.log(tl.sum(b_nq) + lq_eps)
    b_c = tl.exp(-(lq_q - 2.0) / lq_q * b_log_n)
    b_c2 = (lq_q - 2.0) * tl.sum(b_gw) * tl.exp(-(2.0 * lq_q - 2.0) / lq_q * b_log_n)
    for i_e in range(0, E // BE):
        o_w = (i_e * BE + o_e)[:, None] * (2 * D) + o_d[None, :]  # [BE, D]
        b_w = _updated_weights(p_x, tl.load(p_lhs + i_e * BE + o_te), b_ge, b_rows, beta_b, f_b, o_w, D, DT,
                               DOT_PRECISION)
        b_pow = tl.exp((lq_q - 2.0) * tl.log(tl.maximum(tl.abs(b_w), 1e-30)))
        tl.store(p_c + o_w, b_c * tl.load(p_c + o_w) - b_c2 * b_pow * b_w)


@triton.jit
def _dlhs_half(p_cc, p_dlhs, p_rows, b_g, E: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
               DT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Adds -(g rows) dX'_c^T to the ``[BT, E]`` cotangent at ``p_dlhs`` (in place) for the weight or momentum
    columns dX'_c of one matrix's carry (at ``p_cc``, rows 2D apart).  A loop of its own: the ``[BT, D]`` operand of
    this reduction over D is replicated in every warp."""
    o_t = tl.arange(0, BT)
    o_e = tl.arange(0, BE)
    o_d = tl.arange(0, D)
    o_te = o_t[:, None] * E + o_e[None, :]
    b_r = (tl.load(p_rows + o_t[:, None] * D + o_d[None, :]) * b_g[:, None]).to(DT)  # [BT, D]
    for i_e in range(0, E // BE):
        o_w = (i_e * BE + o_e)[:, None] * (2 * D) + o_d[None, :]  # [BE, D]
        b_dl = tl.dot(b_r, tl.trans(tl.load(p_cc + o_w).to(DT)), input_precision=DOT_PRECISION)  # [BT, BE]
        tl.store(p_dlhs + i_e * BE + o_te, tl.load(p_dlhs + i_e * BE + o_te) - b_dl)


@triton.jit
def _carry_pass(p_x, p_c, p_lhs, p_dlhs, p_rows, p_ge, p_ne, p_dge, p_dne, E: tl.constexpr, D: tl.constexpr,
                BT: tl.constexpr, BE: tl.constexpr, DT: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Step (1) for one matrix: adds d lhs = -(g_b rows) dW'^T - (n_b rows) dS'^T to the ``[BT, E]`` cotangent at
    ``p_dlhs`` (in place), with d rhs = -lhs [dW' | dS'] stores the gradients of the chunk-end rows g_b, n_b (at
    ``p_ge``, ``p_ne``) at ``p_dge``, ``p_dne``; returns the gradient of the ``[BT, D]`` rows and <dW', W>,
    <dW', S>, <dS', S>."""
    o_t = tl.arange(0, BT)
    o_e = tl.arange(0, BE)
    o_d = tl.arange(0, D)
    o_te = o_t[:, None] * E + o_e[None, :]
    b_dw = tl.zeros([BT, D], dtype=ACC)
    b_ds = tl.zeros([BT, D], dtype=ACC)
    b_beta = tl.zeros([D], dtype=ACC)
    b_f = tl.zeros([D], dtype=ACC)
    b_m = tl.zeros([D], dtype=ACC)
    for i_e in range(0, E // BE):
        o_w = (i_e * BE + o_e)[:, None] * (2 * D) + o_d[None, :]  # [BE, D]
        b_cw = tl.load(p_c + o_w)  # [BE, D]
        b_cs = tl.load(p_c + D + o_w)  # [BE, D]
        b_s = tl.load(p_x + D + o_w)  # [BE, D]
        b_beta += tl.sum(b_cw * tl.load(p_x + o_w), axis=0)
        b_f += tl.sum(b_cw * b_s, axis=0)
        b_m += tl.sum(b_cs * b_s, axis=0)
        b_lhs = tl.load(p_lhs + i_e * BE + o_te).to(DT)  # [BT, BE]
        b_dw = tl.dot(b_lhs, b_cw.to(DT), b_dw, input_precision=DOT_PRECISION)
        b_ds = tl.dot(b_lhs, b_cs.to(DT), b_ds, input_precision=DOT_PRECISION)
    b_rows = tl.load(p_rows + o_t[:, None] * D + o_d[None, :])  # [BT, D]
    b_ge = tl.load(p_ge + o_t)  # [BT]
    b_ne = tl.load(p_ne + o_t)
    tl.store(p_dge + o_t, -tl.sum(b_dw * b_rows, axis=1))
    tl.store(p_dne + o_t, -tl.sum(b_ds * b_rows, axis=1))
    b_drows = -(b_dw * b_ge[:, None] + b_ds * b_ne[:, None])
    _dlhs_half(p_c, p_dlhs, p_rows, b_ge, E, D, BT, BE, DT, DOT_PRECISION)
    # The second half reads back the d lhs the first one wrote.
    tl.debug_barrier()
    _dlhs_half(p_c + D, p_dlhs, p_rows, b_ne, E, D, BT, BE, DT, DOT_PRECISION)
    return b_drows, tl.sum(b_beta), tl.sum(b_f), tl.sum(b_m)


@triton.jit
def _carry_update(p_c, p_db, p_dbe, b_db, o_w, o_b, beta_b, f_b, m_b, b_lw, b_lw_s, enters, first,
                  D: tl.constexpr, E: tl.constexpr):
    """Step (3) on one ``[BE, D]`` tile of one matrix: dW = beta_b dW' + read term + dB, dS = m_b dS' + f_b dW' + read
    term, in place; in the first chunk dB is the gradient of the initial base instead.  ``b_lw``, ``b_lw_s`` the read
    terms, ``b_db`` the base pass's gradient of B; ``enters``: the returned base's gradient enters here."""
    b_cw = tl.load(p_c + o_w)
    b_cs = tl.load(p_c + D + o_w)
    b_dbt = b_db + tl.load(p_dbe + o_b, mask=o_b < tl.where(enters, E * D, 0), other=0.0)
    if first:
        tl.store(p_db + o_b, b_dbt)
        tl.store(p_c + o_w, beta_b * b_cw + b_lw)
    else:
        tl.store(p_c + o_w, beta_b * b_cw + b_lw + b_dbt)
    tl.store(p_c + D + o_w, m_b * b_cs + f_b * b_cw + b_lw_s)


@triton.jit(do_not_specialize=["NC", "NH", "H"])
def _titans_mlp_bwd_kernel(
    qq, k, g_z, act, g_h, a_q, d_p, d_hq, d_act, d_gh, d_gz, s, u2, rstd, y, e, dpsi, mean_ey,
    ends, g_end, n_end, next_chunk, base0, xs, d_base_end, carry, d_base0, dk, dv, d_ends, d_gend, d_nend,
    NC, NH, H, lq_q, lq_eps,
    D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, RETAIN_LQ: tl.constexpr,
    DT: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_nh = tl.program_id(0)
    i_n = i_nh // H
    i_next = tl.load(next_chunk + i_n).to(tl.int32)
    o_t, o_d, o_e, o_td, o_tq, o_te = _chunk_offsets(D, E, BT, BE)
    sz_state = E * 2 * D
    # int64 only in scalar bases; tile offsets are int32.
    sz_slot = tl.cast(NH, tl.int64) * sz_state
    sz_mat = (NC + 1) * sz_slot
    p_x = xs + tl.cast(i_nh, tl.int64) * sz_state  # matrix 0 slot 0; matrix 1 sz_mat on
    p_c = carry + tl.cast(i_nh, tl.int64) * sz_state  # matrix 0; matrix 1 sz_slot on
    sz_b0 = tl.cast(NH, tl.int64) * (E * D)
    p_b0 = base0 + tl.cast(i_nh, tl.int64) * (E * D)  # matrix 0; matrix 1 sz_b0 on (as d_base_end, d_base0)
    p_dbe = d_base_end + tl.cast(i_nh, tl.int64) * (E * D)
    p_db0 = d_base0 + tl.cast(i_nh, tl.int64) * (E * D)
    for i_r in range(0, NC):
        i_c = NC - 1 - i_r
        p_in = p_x + i_c * sz_slot
        first = i_c == 0
        p_g1, p_g2, rs = _chunk_base(p_in, p_b0, sz_b0, sz_mat, first, D)
        p_tok = tl.cast(i_c, tl.int64) * NH + i_nh
        p_te = p_tok * (BT * E)
        beta_b = tl.load(ends + p_tok * 3)
        f_b = tl.load(ends + p_tok * 3 + 1)
        m_b = tl.load(ends + p_tok * 3 + 2)
        p_ge = (tl.cast(i_c, tl.int64) * 2 * NH + i_nh) * BT
        # the chunk-end rows of G^(1), N^(1) ``[BT]``; G^(2), N^(2) NH * BT on
        p_gn = (tl.cast(i_c, tl.int64) * 2 * NH + NH + i_nh) * BT
        p_td = p_tok * (BT * D)

        # (r) Retention happened where the chunk ended before the sequence's next token.
        if RETAIN_LQ:
            if i_c < i_next:
                _lq_retain_vjp(p_in, p_c, act + p_te, tl.load(g_end + p_ge + o_t), tl.load(g_z + p_td + o_td).to(DT),
                               beta_b, f_b, lq_q, lq_eps, D, E, BT, BE, DT, DOT_PRECISION)
                _lq_retain_vjp(p_in + sz_mat, p_c + sz_slot, g_h + p_te, tl.load(g_end + p_gn + o_t),
                               tl.load(k + p_td + o_td).to(DT), beta_b, f_b, lq_q, lq_eps, D, E, BT, BE, DT,
                               DOT_PRECISION)
                tl.debug_barrier()

        # (1) Matrix 2 (lhs G_h, rows K; its rows' gradient starts dK), then matrix 1 (lhs A, rows G_z): d lhs into
        # d_gh / d_act, d rhs.
        b_drows, d_beta, d_f, d_m = _carry_pass(p_in + sz_mat, p_c + sz_slot, g_h + p_te, d_gh + p_te, k + p_td,
                                                g_end + p_gn, n_end + p_gn, d_gend + p_gn, d_nend + p_gn, E, D, BT,
                                                BE, DT, ACC, DOT_PRECISION)
        tl.store(dk + p_td + o_td, b_drows)
        b_drows, d_beta0, d_f0, d_m0 = _carry_pass(p_in, p_c, act + p_te, d_act + p_te, g_z + p_td, g_end + p_ge,
                                                   n_end + p_ge, d_gend + p_ge, d_nend + p_ge, E, D, BT, BE, DT, ACC,
                                                   DOT_PRECISION)
        tl.store(d_ends + p_tok * 3, d_beta + d_beta0)
        tl.store(d_ends + p_tok * 3 + 1, d_f + d_f0)
        tl.store(d_ends + p_tok * 3 + 2, d_m + d_m0)
        b_dgz = tl.load(d_gz + p_td + o_td) + b_drows
        tl.debug_barrier()

        # (2) The base pass vjp: d G_z += (d G_h gelu'(H)) B1, then the LayerNorm / psi part on the row block.
        for i_e in range(0, E // BE):
            o_g = (i_e * BE + o_e)[:, None] * rs + o_d[None, :]  # [BE, D]
            b_du = tl.load(d_gh + p_te + i_e * BE + o_te) * tl.load(s + p_te + i_e * BE + o_te)  # [BT, BE]
            b_dgz = tl.dot(b_du.to(DT), tl.load(p_g1 + o_g).to(DT), b_dgz, input_precision=DOT_PRECISION)
        b_y = tl.load(y + p_td + o_td)  # [BT, D]
        b_rstd = tl.load(rstd + p_tok * BT + o_t)[:, None]  # [BT, 1]
        b_gy = (tl.sum(b_dgz * b_y, axis=1) / D)[:, None]
        b_dr = tl.load(dpsi + p_td + o_td) * (
            b_rstd * (b_dgz - (tl.sum(b_dgz, axis=1) / D)[:, None] - b_y * b_gy))
        b_in = b_dr - b_rstd * (tl.load(mean_ey + p_tok * BT + o_t)[:, None] * b_dgz
                                + b_gy * tl.load(e + p_td + o_td))
        b_dz = b_rstd * (b_in - (tl.sum(b_in, axis=1) / D)[:, None]
                         - b_y * ((tl.sum(b_in * b_y, axis=1) + tl.sum(b_dgz * tl.load(g_z + p_td + o_td), axis=1))
                                  / D)[:, None])
        tl.store(dv + p_td + o_td, -b_dr)
        b_dk = tl.load(dk + p_td + o_td) + b_dr
        b_dzd = b_dz.to(DT)

        # (3) Matrix 1: dB1 = (d G_h gelu'(H))^T G_z + A^T dZ, read term A_q^T dp.
        b_gzd = tl.load(g_z + p_td + o_td).to(DT)
        b_dpw = tl.load(d_p + p_tok * (BT * 2 * D) + o_tq).to(DT)  # [BT, D]
        b_dps = tl.load(d_p + p_tok * (BT * 2 * D) + D + o_tq).to(DT)  # [BT, D]
        for i_e in range(0, E // BE):
            o_w = (i_e * BE + o_e)[:, None] * (2 * D) + o_d[None, :]  # [BE, D]
            o_b = (i_e * BE + o_e)[:, None] * D + o_d[None, :]  # [BE, D]
            b_du = tl.load(d_gh + p_te + i_e * BE + o_te) * tl.load(s + p_te + i_e * BE + o_te)  # [BT, BE]
            b_db = tl.dot(tl.trans(b_du.to(DT)), b_gzd, input_precision=DOT_PRECISION)  # [BE, D]
            b_db = tl.dot(tl.trans(tl.load(act + p_te + i_e * BE + o_te).to(DT)), b_dzd, b_db,
                          input_precision=DOT_PRECISION)
            b_aq = tl.trans(tl.load(a_q + p_te + i_e * BE + o_te).to(DT))  # [BE, BT]
            b_lw = tl.dot(b_aq, b_dpw, input_precision=DOT_PRECISION)
            b_ls = tl.dot(b_aq, b_dps, input_precision=DOT_PRECISION)
            _carry_update(p_c, p_db0, p_dbe, b_db, o_w, o_b, beta_b, f_b, m_b, b_lw, b_ls, i_next == i_c, first, D, E)

        # Matrix 2: dH = (d act + dZ B1^T) gelu'(H) + d G_h u gelu''(H), dK += dH B2, dB2^T = dH^T K, read term
        # dH_q^T [beta Q | f Q].
        b_kd = tl.load(k + p_td + o_td).to(DT)
        b_qb = tl.load(qq + p_tok * (BT * 2 * D) + o_tq).to(DT)  # [BT, D]
        b_qf = tl.load(qq + p_tok * (BT * 2 * D) + D + o_tq).to(DT)  # [BT, D]
        for i_e in range(0, E // BE):
            o_g = (i_e * BE + o_e)[:, None] * rs + o_d[None, :]  # [BE, D]
            o_w = (i_e * BE + o_e)[:, None] * (2 * D) + o_d[None, :]  # [BE, D]
            o_b = (i_e * BE + o_e)[:, None] * D + o_d[None, :]  # [BE, D]
            o_se = p_te + i_e * BE + o_te
            b_dh = tl.dot(b_dzd, tl.trans(tl.load(p_g1 + o_g).to(DT)), tl.load(d_act + o_se),
                          input_precision=DOT_PRECISION)  # [BT, BE]
            b_dh = b_dh * tl.load(s + o_se) + tl.load(d_gh + o_se) * tl.load(u2 + o_se)
            b_dhd = b_dh.to(DT)
            b_dk = tl.dot(b_dhd, tl.load(p_g2 + o_g).to(DT), b_dk, input_precision=DOT_PRECISION)
            b_db = tl.dot(tl.trans(b_dhd), b_kd, input_precision=DOT_PRECISION)  # [BE, D]
            b_hq = tl.trans(tl.load(d_hq + o_se).to(DT))  # [BE, BT]
            b_lw = tl.dot(b_hq, b_qb, input_precision=DOT_PRECISION)
            b_ls = tl.dot(b_hq, b_qf, input_precision=DOT_PRECISION)
            _carry_update(p_c + sz_slot, p_db0 + sz_b0, p_dbe + sz_b0, b_db, o_w, o_b, beta_b, f_b, m_b, b_lw, b_ls,
                          i_next == i_c, first, D, E)
        tl.store(dk + p_td + o_td, b_dk)
        # The next (earlier) chunk reads the carry other threads of this program wrote.
        tl.debug_barrier()


def titans_mlp_walk_bwd_triton(qq: Tensor, k: Tensor, xs: Tensor, base0: Tensor, ends: Tensor, g_end: Tensor,
                               n_end: Tensor, next_chunk: Tensor, act: Tensor, g_z: Tensor, g_h: Tensor, a_q: Tensor,
                               d_p: Tensor, d_hq: Tensor, d_act: Tensor, d_gh: Tensor, d_gz: Tensor, factors,
                               d_end: Tensor, d_base_end: Tensor, miras: Miras, dtype: torch.dtype,
                               precision: str) -> list[Tensor]:
    """The reverse walk of ``mlp_chunk._chunks_backward`` on the kernel, dots in ``dtype`` at ``precision``.

    Takes the forward's inputs and stored states (chunk first, as ``_chunks_forward``: qq ``[NC, N, H, b, 2D]``, k,
    g_z ``[.., D]``, act, g_h, a_q ``[.., E]``, xs ``[2, NC + 1, N, H, E, 2D]``, base0 ``[2, N, H, E, D]``), the
    reads' backward (d_p ``[.., 2D]``, d_hq, d_act, d_gh ``[.., E]``, d_gz ``[.., D]``; d_act and d_gh are
    overwritten), ``_base_factors``' output and the cotangents of the final state and returned base.  Returns dk, dv,
    d x0, d base0, d ends, d g_end, d n_end.
    """
    NC, N, H, b, D = k.shape
    E = xs.shape[-2]
    s, u2, rstd, y, e, dpsi, mean_ey = (x.contiguous() for x in factors)
    carry = d_end.clone(memory_format=torch.contiguous_format)
    ends_last = next_chunk == NC
    carry[:, ends_last, ..., :D] += d_base_end[:, ends_last]
    dk, dv = torch.empty_like(k), torch.empty_like(k)
    d_base0 = torch.empty_like(base0)
    d_ends, d_gend, d_nend = torch.empty_like(ends), torch.empty_like(g_end), torch.empty_like(n_end)
    dot_dtype = _DOT_DTYPES[dtype]
    BE, warps = _config(D, dot_dtype)
    _titans_mlp_bwd_kernel[(N * H,)](
        qq, k, g_z, act, g_h, a_q, d_p.contiguous(), d_hq, d_act, d_gh, d_gz, s, u2, rstd, y, e, dpsi, mean_ey,
        ends, g_end, n_end, next_chunk, base0, xs, d_base_end.contiguous(), carry, d_base0, dk, dv, d_ends, d_gend,
        d_nend, NC, N * H, H, float(miras.q), float(miras.lq_eps), D=D, E=E, BT=b, BE=BE,
        RETAIN_LQ=miras.retention == "lq", DT=dot_dtype, ACC=_DOT_DTYPES[k.dtype], DOT_PRECISION=precision,
        num_warps=warps, num_stages=1,
    )
    return [dk, dv, carry, d_base0, d_ends, d_gend, d_nend]
