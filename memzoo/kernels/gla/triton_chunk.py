"""Chunked gated linear attention (GLA) in Triton: forward and hand-derived backward.

"Gated Linear Attention Transformers with Hardware-Efficient Training" (arXiv 2312.06635).  Recurrence, with a
per-key log-decay g_t <= 0 and a state S of shape [K, V]:

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T          o_t = scale * S_t^T q_t

Everything runs in varlen form ([1, sum T, H, D] plus cu_seqlens; a batch is flattened first).  Gates live in
log2 space (b = chunk-local cumsum of g / ln 2) so kernels use exp2.  Forward: (1) gate cumsum, (2) sequential
state pass storing the chunk-start states h, (3) intra-chunk attention A in fp32 with 16-row sub-chunks whose
exponents are re-based to a nearby anchor, (4) output.  Backward recomputes (1)-(3), then runs the reverse state
pass for dh / dh0, dA, dv, the intra-chunk dq / dk and the inter-chunk dq / dk / dg.  The derivation is in
``README.md`` next to this file.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_utils import autotune_or_fixed
from ..utils import chunk_table, flatten_batch, resolve_dot_precision

__all__ = ["chunk_gla_triton"]

# A global read inside a kernel must be a tl.constexpr: the interpreter reads any Python global, a GPU compile
# rejects a plain float (NameError at the first use).
RCP_LN2 = tl.constexpr(1.4426950408889634)
# Padded rows load g = 0, so an exponent that is <= 0 on valid rows can be positive there: such exponents are
# masked before exp2 (masked lanes are zero anyway, but inf * 0 would make NaN).
# A scalar condition joins a vector mask as ``o_k < tl.where(cond, K, 0)``: the interpreter rejects the mask that
# ``vector & scalar`` produces.
# Input precision of the dots whose operands are fp32 (fp32 inputs, and the fp32 A / dA tiles): "tf32" runs them
# on tensor cores; "ieee" (exact fp32, for exactness checks) runs them on the FMA units, ~15x slower, and its
# [64, 64] tiles spill registers at the default configs.  $MEMZOO_DOT_PRECISION, read once at import.
_PREC = tl.constexpr(resolve_dot_precision(None))


@triton.jit
def _chunk_cumsum_kernel(g, gc, cu_seqlens, table, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                         BK: tl.constexpr):
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n = tl.load(table + i_c * 2)
    if i_n < 0:
        return
    i_t = tl.cast(tl.load(table + i_c * 2 + 1), tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    o_t = bos + i_t * BT + tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m = (o_t < eos)[:, None] & (o_k < K)[None, :]
    p_g = (o_t[:, None] * H + i_h) * K + o_k[None, :]
    b_g = tl.load(g + p_g, mask=m, other=0).to(tl.float32) * RCP_LN2  # [BT, BK]
    tl.store(gc + p_g, tl.cumsum(b_g, 0), mask=m)


@autotune_or_fixed(
    configs=[triton.Config({"BV": bv}, num_warps=w, num_stages=s) for bv in (32, 64) for w in (2, 4) for s in (2, 3)],
    key=["H", "K", "V", "BT", "BK", "USE_H0", "STORE_HT"],
    default=triton.Config({"BV": 32}, num_warps=4, num_stages=2),
)
@triton.jit
def _fwd_h_kernel(k, v, gc, h0, h, ht, cu_seqlens, chunk_offsets, H: tl.constexpr, K: tl.constexpr,
                  V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_H0: tl.constexpr,
                  STORE_HT: tl.constexpr):
    i_kv, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.cast(tl.program_id(2), tl.int64)
    NV = tl.cdiv(V, BV)
    i_k, i_v = i_kv // NV, i_kv % NV
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    NT = tl.cdiv(eos - bos, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = (i_h * K + o_k[:, None]) * V + o_v[None, :]  # [BK, BV] offsets inside one [H, K, V] state
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + tl.cast(i_n, tl.int64) * H * K * V + p_kv, mask=m_kv, other=0)
    for i_s in range(0, NT):
        i_t = tl.cast(i_s, tl.int64)
        tl.store(h + (boh + i_t) * H * K * V + p_kv, b_h.to(h.dtype.element_ty), mask=m_kv)
        o_t = bos + i_t * BT + tl.arange(0, BT)
        m_t = o_t < eos
        last = tl.minimum(bos + i_t * BT + BT, eos) - 1
        b_k = tl.load(k + (o_t[:, None] * H + i_h) * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0)
        b_g = tl.load(gc + (o_t[:, None] * H + i_h) * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0)
        b_v = tl.load(v + (o_t[:, None] * H + i_h) * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0)
        b_gl = tl.load(gc + (last * H + i_h) * K + o_k, mask=m_k, other=0)  # [BK]
        # exponents b_last - b_t <= 0 on valid rows; padded rows are zeroed before the exp can matter
        b_kd = tl.where(m_t[:, None], b_k * tl.exp2(b_gl[None, :] - b_g), 0)  # [BT, BK]
        b_h = b_h * tl.exp2(b_gl)[:, None] + tl.dot(tl.trans(b_kd.to(b_k.dtype)), b_v, input_precision=_PREC)
    if STORE_HT:
        tl.store(ht + tl.cast(i_n, tl.int64) * H * K * V + p_kv, b_h, mask=m_kv)


@triton.jit
def _intra_attn_kernel(q, k, gc, A, cu_seqlens, table, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                       BC: tl.constexpr, BK: tl.constexpr, NC: tl.constexpr):
    i_ij, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.cast(tl.program_id(2), tl.int64)
    i_i, i_j = i_ij // NC, i_ij % NC
    i_n = tl.load(table + i_c * 2)
    if i_n < 0:
        return
    i_t = tl.cast(tl.load(table + i_c * 2 + 1), tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    o_c = tl.arange(0, BC)
    n_i = bos + i_t * BT + i_i * BC
    # a sub-block past the sequence end stores nothing (and its anchor would be a padded row)
    if n_i >= eos:
        return
    o_i = n_i + o_c
    o_j = bos + i_t * BT + i_j * BC + o_c
    m_i, m_j = o_i < eos, o_j < eos
    p_A = A + (o_i[:, None] * H + i_h) * BT + i_j * BC + o_c[None, :]
    b_A = tl.zeros([BC, BC], dtype=tl.float32)
    if i_i > i_j:
        # re-base both sides to the first row n of the later sub-block: exp2(b_t - b_n) and exp2(b_n - b_j) are <= 1
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = tl.cast(i_k, tl.int64) * BK + tl.arange(0, BK)
            m_k = o_k < K
            m_ik, m_jk = m_i[:, None] & m_k[None, :], m_j[:, None] & m_k[None, :]
            b_q = tl.load(q + (o_i[:, None] * H + i_h) * K + o_k[None, :], mask=m_ik, other=0)  # [BC, BK]
            b_gq = tl.load(gc + (o_i[:, None] * H + i_h) * K + o_k[None, :], mask=m_ik, other=0)
            b_k = tl.load(k + (o_j[:, None] * H + i_h) * K + o_k[None, :], mask=m_jk, other=0)
            b_gk = tl.load(gc + (o_j[:, None] * H + i_h) * K + o_k[None, :], mask=m_jk, other=0)
            b_gn = tl.load(gc + (n_i * H + i_h) * K + o_k, mask=m_k, other=0)  # [BK]
            b_qg = (b_q * tl.exp2(tl.where(m_ik, b_gq - b_gn[None, :], 0))).to(b_q.dtype)
            b_kg = tl.where(m_jk, b_k * tl.exp2(b_gn[None, :] - b_gk), 0).to(b_k.dtype)
            b_A += tl.dot(b_qg, tl.trans(b_kg), input_precision=_PREC)
    elif i_i == i_j:
        # diagonal sub-block: every exp2(b_t - b_j) with j <= t formed elementwise, column by column
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = tl.cast(i_k, tl.int64) * BK + tl.arange(0, BK)
            m_k = o_k < K
            m_ik = m_i[:, None] & m_k[None, :]
            b_q = tl.load(q + (o_i[:, None] * H + i_h) * K + o_k[None, :], mask=m_ik, other=0).to(tl.float32)
            b_gq = tl.load(gc + (o_i[:, None] * H + i_h) * K + o_k[None, :], mask=m_ik, other=0)
            for j in range(0, BC):
                r_j = n_i + tl.cast(j, tl.int64)
                m_r = o_k < tl.where(r_j < eos, K, 0)
                b_kj = tl.load(k + (r_j * H + i_h) * K + o_k, mask=m_r, other=0).to(tl.float32)  # [BK]
                b_gj = tl.load(gc + (r_j * H + i_h) * K + o_k, mask=m_r, other=0)
                m_c = (o_c >= j)[:, None] & m_ik
                b_e = tl.exp2(tl.where(m_c, b_gq - b_gj[None, :], 0))  # [BC, BK]
                b_col = tl.sum(tl.where(m_c, b_q * b_kj[None, :] * b_e, 0), 1)  # [BC]
                b_A += tl.where(o_c[None, :] == j, b_col[:, None], 0)
    tl.store(p_A, b_A, mask=m_i[:, None])


@autotune_or_fixed(
    configs=[triton.Config({"BV": bv}, num_warps=w, num_stages=3) for bv in (32, 64) for w in (2, 4)],
    key=["H", "K", "V", "BT", "BK"],
    default=triton.Config({"BV": 32}, num_warps=4, num_stages=2),
)
@triton.jit
def _fwd_o_kernel(q, v, gc, h, A, o, cu_seqlens, table, chunk_offsets, scale, H: tl.constexpr, K: tl.constexpr,
                  V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.cast(tl.program_id(2), tl.int64)
    i_n = tl.load(table + i_c * 2)
    if i_n < 0:
        return
    i_t = tl.cast(tl.load(table + i_c * 2 + 1), tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    i_ch = tl.load(chunk_offsets + i_n).to(tl.int64) + i_t
    o_c = tl.arange(0, BT)
    o_t = bos + i_t * BT + o_c
    o_v = i_v * BV + tl.arange(0, BV)
    m_t, m_v = o_t < eos, o_v < V
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = tl.cast(i_k, tl.int64) * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(q + (o_t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0)  # [BT, BK]
        b_g = tl.load(gc + (o_t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0)
        b_h = tl.load(h + ((i_ch * H + i_h) * K + o_k[:, None]) * V + o_v[None, :],
                      mask=m_k[:, None] & m_v[None, :], other=0)  # [BK, BV]
        b_qg = (b_q * tl.exp2(b_g)).to(b_q.dtype)
        b_o += tl.dot(b_qg, b_h.to(b_q.dtype), input_precision=_PREC)
    m_A = m_t[:, None] & (o_c[:, None] >= o_c[None, :])
    b_A = tl.load(A + (o_t[:, None] * H + i_h) * BT + o_c[None, :], mask=m_A, other=0)  # [BT, BT] fp32
    b_v = tl.load(v + (o_t[:, None] * H + i_h) * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0)
    b_o += tl.dot(b_A.to(b_v.dtype), b_v, input_precision=_PREC)
    tl.store(o + (o_t[:, None] * H + i_h) * V + o_v[None, :], (b_o * scale).to(o.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])


@autotune_or_fixed(
    configs=[triton.Config({"BV": bv}, num_warps=w, num_stages=s) for bv in (32, 64) for w in (2, 4, 8)
             for s in (2, 3)],
    key=["H", "K", "V", "BT", "BK", "USE_DHT", "USE_DH0"],
    # 8 warps: with 4, fp32 inputs at K = 128 need more than 255 registers per thread on sm_90 and spill
    default=triton.Config({"BV": 32}, num_warps=8, num_stages=2),
)
@triton.jit
def _bwd_dh_kernel(q, do, gc, dht, dh, dh0, cu_seqlens, chunk_offsets, scale, H: tl.constexpr, K: tl.constexpr,
                   V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_DHT: tl.constexpr,
                   USE_DH0: tl.constexpr):
    i_kv, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.cast(tl.program_id(2), tl.int64)
    NV = tl.cdiv(V, BV)
    i_k, i_v = i_kv // NV, i_kv % NV
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    NT = tl.cdiv(eos - bos, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = (i_h * K + o_k[:, None]) * V + o_v[None, :]
    # b_dh is the gradient of the state at the end of the current chunk
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(dht + tl.cast(i_n, tl.int64) * H * K * V + p_kv, mask=m_kv, other=0)
    for i_r in range(0, NT):
        i_t = NT - 1 - tl.cast(i_r, tl.int64)
        tl.store(dh + (boh + i_t) * H * K * V + p_kv, b_dh.to(dh.dtype.element_ty), mask=m_kv)
        o_t = bos + i_t * BT + tl.arange(0, BT)
        m_t = o_t < eos
        last = tl.minimum(bos + i_t * BT + BT, eos) - 1
        b_q = tl.load(q + (o_t[:, None] * H + i_h) * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0)
        b_g = tl.load(gc + (o_t[:, None] * H + i_h) * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0)
        b_do = tl.load(do + (o_t[:, None] * H + i_h) * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0)
        b_gl = tl.load(gc + (last * H + i_h) * K + o_k, mask=m_k, other=0)  # [BK]
        b_qg = (b_q * tl.exp2(b_g)).to(b_q.dtype)  # [BT, BK]
        b_dh = b_dh * tl.exp2(b_gl)[:, None] + scale * tl.dot(tl.trans(b_qg), b_do.to(b_q.dtype),
                                                              input_precision=_PREC)
    if USE_DH0:
        tl.store(dh0 + tl.cast(i_n, tl.int64) * H * K * V + p_kv, b_dh, mask=m_kv)


@triton.jit
def _bwd_dA_kernel(do, v, dA, cu_seqlens, table, scale, H: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                   BV: tl.constexpr):
    i_c, i_h = tl.program_id(0), tl.cast(tl.program_id(1), tl.int64)
    i_n = tl.load(table + i_c * 2)
    if i_n < 0:
        return
    i_t = tl.cast(tl.load(table + i_c * 2 + 1), tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    o_c = tl.arange(0, BT)
    o_t = bos + i_t * BT + o_c
    m_t = o_t < eos
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = tl.cast(i_v, tl.int64) * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_do = tl.load(do + (o_t[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0)  # [BT, BV]
        b_v = tl.load(v + (o_t[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0)
        b_dA += tl.dot(b_do.to(b_v.dtype), tl.trans(b_v), input_precision=_PREC)
    b_dA = tl.where(m_t[:, None] & (o_c[:, None] >= o_c[None, :]), b_dA * scale, 0)
    tl.store(dA + (o_t[:, None] * H + i_h) * BT + o_c[None, :], b_dA, mask=m_t[:, None])


@triton.jit
def _bwd_dv_kernel(k, gc, A, do, dh, dv, cu_seqlens, table, chunk_offsets, scale, H: tl.constexpr,
                   K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.cast(tl.program_id(2), tl.int64)
    i_n = tl.load(table + i_c * 2)
    if i_n < 0:
        return
    i_t = tl.cast(tl.load(table + i_c * 2 + 1), tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    i_ch = tl.load(chunk_offsets + i_n).to(tl.int64) + i_t
    last = tl.minimum(bos + i_t * BT + BT, eos) - 1
    o_c = tl.arange(0, BT)
    o_t = bos + i_t * BT + o_c
    o_v = i_v * BV + tl.arange(0, BV)
    m_t, m_v = o_t < eos, o_v < V
    m_tv = m_t[:, None] & m_v[None, :]
    # A^T: rows are key positions j, columns query positions t >= j
    m_At = m_t[None, :] & (o_c[None, :] >= o_c[:, None])
    b_At = tl.load(A + (o_t[None, :] * H + i_h) * BT + o_c[:, None], mask=m_At, other=0)  # [BT, BT]
    b_do = tl.load(do + (o_t[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0)  # [BT, BV]
    b_dv = scale * tl.dot(b_At.to(b_do.dtype), b_do, input_precision=_PREC)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = tl.cast(i_k, tl.int64) * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        b_k = tl.load(k + (o_t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0)  # [BT, BK]
        b_g = tl.load(gc + (o_t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0)
        b_gl = tl.load(gc + (last * H + i_h) * K + o_k, mask=m_k, other=0)
        b_kd = tl.where(m_tk, b_k * tl.exp2(b_gl[None, :] - b_g), 0).to(b_k.dtype)
        b_dh = tl.load(dh + ((i_ch * H + i_h) * K + o_k[:, None]) * V + o_v[None, :],
                       mask=m_k[:, None] & m_v[None, :], other=0)  # [BK, BV]
        b_dv += tl.dot(b_kd, b_dh.to(b_k.dtype), input_precision=_PREC)
    tl.store(dv + (o_t[:, None] * H + i_h) * V + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_tv)


@triton.jit
def _bwd_intra_kernel(q, k, gc, dA, dq, dk, cu_seqlens, table, H: tl.constexpr, K: tl.constexpr,
                      BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, NC: tl.constexpr):
    i_ki, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.cast(tl.program_id(2), tl.int64)
    i_k, i_i = i_ki // NC, i_ki % NC
    i_n = tl.load(table + i_c * 2)
    if i_n < 0:
        return
    i_t = tl.cast(tl.load(table + i_c * 2 + 1), tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    t0 = bos + i_t * BT
    o_c = tl.arange(0, BC)
    n_i = t0 + i_i * BC
    if n_i >= eos:
        return
    o_i = n_i + o_c
    o_k = i_k * BK + tl.arange(0, BK)
    m_i, m_k = o_i < eos, o_k < K
    m_ik = m_i[:, None] & m_k[None, :]
    p_ik = (o_i[:, None] * H + i_h) * K + o_k[None, :]
    b_gi = tl.load(gc + p_ik, mask=m_ik, other=0)  # [BC, BK]

    # dq_t = sum_{j <= t} dA_tj k_j exp2(b_t - b_j); earlier sub-blocks re-based to the first row n of this one
    b_dq = tl.zeros([BC, BK], dtype=tl.float32)
    b_gn = tl.load(gc + (n_i * H + i_h) * K + o_k, mask=m_k, other=0)  # [BK]
    for i_j in range(0, i_i):
        o_j = t0 + tl.cast(i_j, tl.int64) * BC + o_c
        m_jk = (o_j < eos)[:, None] & m_k[None, :]
        b_k = tl.load(k + (o_j[:, None] * H + i_h) * K + o_k[None, :], mask=m_jk, other=0)
        b_gk = tl.load(gc + (o_j[:, None] * H + i_h) * K + o_k[None, :], mask=m_jk, other=0)
        b_kg = tl.where(m_jk, b_k * tl.exp2(b_gn[None, :] - b_gk), 0)  # [BC, BK] fp32
        b_dA = tl.load(dA + (o_i[:, None] * H + i_h) * BT + tl.cast(i_j, tl.int64) * BC + o_c[None, :],
                       mask=m_i[:, None], other=0)  # [BC, BC]
        b_dq += tl.dot(b_dA, b_kg, input_precision=_PREC)
    b_dq *= tl.exp2(tl.where(m_ik, b_gi - b_gn[None, :], 0))
    for j in range(0, BC):
        r_j = n_i + tl.cast(j, tl.int64)
        m_r = o_k < tl.where(r_j < eos, K, 0)
        b_kj = tl.load(k + (r_j * H + i_h) * K + o_k, mask=m_r, other=0).to(tl.float32)  # [BK]
        b_gj = tl.load(gc + (r_j * H + i_h) * K + o_k, mask=m_r, other=0)
        b_dAj = tl.load(dA + (o_i * H + i_h) * BT + i_i * BC + j, mask=m_i, other=0)  # [BC] column j
        m_c = (o_c >= j)[:, None] & m_ik
        b_dq += tl.where(m_c, b_dAj[:, None] * b_kj[None, :] * tl.exp2(tl.where(m_c, b_gi - b_gj[None, :], 0)), 0)

    # dk_j = sum_{t >= j} dA_tj q_t exp2(b_t - b_j); later sub-blocks re-based to the last row m of this one
    b_dk = tl.zeros([BC, BK], dtype=tl.float32)
    r_m = tl.minimum(n_i + BC, eos) - 1
    b_gm = tl.load(gc + (r_m * H + i_h) * K + o_k, mask=m_k, other=0)  # [BK]
    for i_j in range(i_i + 1, NC):
        o_j = t0 + tl.cast(i_j, tl.int64) * BC + o_c
        m_j = o_j < eos
        m_jk = m_j[:, None] & m_k[None, :]
        b_q = tl.load(q + (o_j[:, None] * H + i_h) * K + o_k[None, :], mask=m_jk, other=0)
        b_gq = tl.load(gc + (o_j[:, None] * H + i_h) * K + o_k[None, :], mask=m_jk, other=0)
        b_qg = b_q * tl.exp2(tl.where(m_jk, b_gq - b_gm[None, :], 0))  # [BC, BK] fp32
        b_dAt = tl.load(dA + (o_j[None, :] * H + i_h) * BT + i_i * BC + o_c[:, None],
                        mask=m_j[None, :], other=0)  # [BC (j, this block), BC (t, later block)]
        b_dk += tl.dot(b_dAt, b_qg, input_precision=_PREC)
    b_dk *= tl.where(m_ik, tl.exp2(b_gm[None, :] - b_gi), 0)
    for t in range(0, BC):
        r_t = n_i + tl.cast(t, tl.int64)
        m_r = o_k < tl.where(r_t < eos, K, 0)
        b_qt = tl.load(q + (r_t * H + i_h) * K + o_k, mask=m_r, other=0).to(tl.float32)  # [BK]
        b_gt = tl.load(gc + (r_t * H + i_h) * K + o_k, mask=m_r, other=0)
        b_dAt = tl.load(dA + (r_t * H + i_h) * BT + i_i * BC + o_c, mask=o_c < tl.where(r_t < eos, BC, 0), other=0)
        m_c = (o_c <= tl.where(r_t < eos, t, -1))[:, None] & m_ik
        b_dk += tl.where(m_c, b_dAt[:, None] * b_qt[None, :] * tl.exp2(tl.where(m_c, b_gt[None, :] - b_gi, 0)), 0)
    tl.store(dq + p_ik, b_dq, mask=m_ik)
    tl.store(dk + p_ik, b_dk, mask=m_ik)


@triton.jit
def _bwd_inter_kernel(q, k, v, gc, h, do, dh, dq_intra, dk_intra, dq, dk, dg, cu_seqlens, table, chunk_offsets,
                      scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr):
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.cast(tl.program_id(2), tl.int64)
    i_n = tl.load(table + i_c * 2)
    if i_n < 0:
        return
    i_t = tl.cast(tl.load(table + i_c * 2 + 1), tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    i_ch = tl.load(chunk_offsets + i_n).to(tl.int64) + i_t
    last = tl.minimum(bos + i_t * BT + BT, eos) - 1
    o_t = bos + i_t * BT + tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_t, m_k = o_t < eos, o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    p_tk = (o_t[:, None] * H + i_h) * K + o_k[None, :]
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dgl = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = tl.cast(i_v, tl.int64) * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        p_kv = ((i_ch * H + i_h) * K + o_k[:, None]) * V + o_v[None, :]
        b_do = tl.load(do + (o_t[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0)  # [BT, BV]
        b_v = tl.load(v + (o_t[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0)
        b_h = tl.load(h + p_kv, mask=m_kv, other=0)  # [BK, BV] chunk-start state
        b_dh = tl.load(dh + p_kv, mask=m_kv, other=0)  # [BK, BV] gradient of the chunk-end state
        b_dq += tl.dot(b_do.to(b_v.dtype), tl.trans(b_h.to(b_v.dtype)), input_precision=_PREC)
        b_dk += tl.dot(b_v, tl.trans(b_dh.to(b_v.dtype)), input_precision=_PREC)
        b_dgl += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), 1)
    # The epilogue finishes dq, then dk, then dg, so that few [BT, BK] tiles are live at once (all of them together
    # exceed 255 registers per thread and spill).
    b_g = tl.load(gc + p_tk, mask=m_tk, other=0)
    b_gl = tl.load(gc + (last * H + i_h) * K + o_k, mask=m_k, other=0)  # [BK]
    b_dq = tl.where(m_tk, scale * b_dq * tl.exp2(b_g), 0) + tl.load(dq_intra + p_tk, mask=m_tk, other=0)
    tl.store(dq + p_tk, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    b_db = tl.load(q + p_tk, mask=m_tk, other=0).to(tl.float32) * b_dq  # [BT, BK]
    b_dk = tl.where(m_tk, b_dk * tl.exp2(b_gl[None, :] - b_g), 0)  # the inter-chunk part
    b_k = tl.load(k + p_tk, mask=m_tk, other=0).to(tl.float32)
    # d/d b_last of <dh', h'>: h' = exp2(b_last) h + sum_j k_j exp2(b_last - b_j) v_j^T
    b_dgl = b_dgl * tl.exp2(b_gl) + tl.sum(b_k * b_dk, 0)
    b_dk += tl.load(dk_intra + p_tk, mask=m_tk, other=0)
    tl.store(dk + p_tk, b_dk.to(dk.dtype.element_ty), mask=m_tk)
    b_db = b_db - b_k * b_dk + tl.where((o_t == last)[:, None], b_dgl[None, :], 0)
    tl.store(dg + p_tk, tl.cumsum(b_db, 0, reverse=True).to(dg.dtype.element_ty), mask=m_tk)


def _blocks(K: int, V: int) -> tuple[int, int]:
    def tile(d: int) -> int:
        return min(64, max(16, triton.next_power_of_2(d)))

    return tile(K), tile(V)


def _chunk_meta(cu: Tensor, total: int, BT: int) -> tuple[Tensor, Tensor]:
    """The (sequence, chunk) table of the chunk-parallel grids and every sequence's first chunk, on the device."""
    table = chunk_table(cu, total, BT)
    n_chunks = (cu[1:] - cu[:-1] + BT - 1) // BT
    offsets = torch.cat([n_chunks.new_zeros(1), n_chunks.cumsum(0)])  # [N+1]
    return table, offsets


def _gate_cumsum(g: Tensor, cu: Tensor, table: Tensor, BT: int) -> Tensor:
    _, total, H, K = g.shape
    gc = torch.empty(total, H, K, device=g.device, dtype=torch.float32)
    BK = min(64, max(16, triton.next_power_of_2(K)))
    _chunk_cumsum_kernel[(triton.cdiv(K, BK), table.shape[0], H)](g, gc, cu, table, H=H, K=K, BT=BT, BK=BK)
    return gc


def _state_pass(k, v, gc, h0, cu, offsets, n_rows, BT, want_final):
    """Chunk-start states ``h [rows, H, K, V]`` (input dtype) and, if asked, the fp32 final state ``[N, H, K, V]``."""
    _, total, H, K = k.shape
    V = v.shape[-1]
    N = cu.numel() - 1
    BK, _ = _blocks(K, V)
    h = torch.empty(n_rows, H, K, V, device=k.device, dtype=k.dtype)
    ht = torch.empty(N, H, K, V, device=k.device, dtype=torch.float32) if want_final else None
    grid = lambda meta: (triton.cdiv(K, BK) * triton.cdiv(V, meta["BV"]), N, H)
    _fwd_h_kernel[grid](k, v, gc, h0, h, ht, cu, offsets, H=H, K=K, V=V, BT=BT, BK=BK,
                        USE_H0=h0 is not None, STORE_HT=want_final)
    return h, ht


def _intra_attention(q, k, gc, cu, table, BT):
    _, total, H, K = q.shape
    BC = 16
    A = torch.empty(total, H, BT, device=q.device, dtype=torch.float32)
    BK, _ = _blocks(K, K)
    NC = BT // BC
    _intra_attn_kernel[(NC * NC, table.shape[0], H)](q, k, gc, A, cu, table, H=H, K=K, BT=BT, BC=BC, BK=BK, NC=NC,
                                                     num_warps=2)
    return A


def _forward(q, k, v, g, scale, h0, cu, BT, want_final):
    _, total, H, K = q.shape
    V = v.shape[-1]
    table, offsets = _chunk_meta(cu, total, BT)
    gc = _gate_cumsum(g, cu, table, BT)
    h, ht = _state_pass(k, v, gc, h0, cu, offsets, table.shape[0], BT, want_final)
    A = _intra_attention(q, k, gc, cu, table, BT)
    o = torch.empty_like(v)
    BK, _ = _blocks(K, V)
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), table.shape[0], H)
    _fwd_o_kernel[grid](q, v, gc, h, A, o, cu, table, offsets, scale, H=H, K=K, V=V, BT=BT, BK=BK)
    return o, ht


def _backward(q, k, v, g, scale, h0, cu, BT, do, dht):
    _, total, H, K = q.shape
    V = v.shape[-1]
    N = cu.numel() - 1
    BK, BV = _blocks(K, V)
    table, offsets = _chunk_meta(cu, total, BT)
    rows = table.shape[0]
    gc = _gate_cumsum(g, cu, table, BT)
    h, _ = _state_pass(k, v, gc, h0, cu, offsets, rows, BT, False)
    A = _intra_attention(q, k, gc, cu, table, BT)

    dh = torch.empty(rows, H, K, V, device=q.device, dtype=q.dtype)
    dh0 = torch.empty(N, H, K, V, device=q.device, dtype=torch.float32) if h0 is not None else None
    grid = lambda meta: (triton.cdiv(K, BK) * triton.cdiv(V, meta["BV"]), N, H)
    _bwd_dh_kernel[grid](q, do, gc, dht, dh, dh0, cu, offsets, scale, H=H, K=K, V=V, BT=BT, BK=BK,
                         USE_DHT=dht is not None, USE_DH0=h0 is not None)

    dA = torch.empty(total, H, BT, device=q.device, dtype=torch.float32)
    _bwd_dA_kernel[(rows, H)](do, v, dA, cu, table, scale, H=H, V=V, BT=BT, BV=BV, num_warps=4)
    dv = torch.empty_like(v)
    _bwd_dv_kernel[(triton.cdiv(V, BV), rows, H)](k, gc, A, do, dh, dv, cu, table, offsets, scale, H=H, K=K, V=V,
                                                  BT=BT, BK=BK, BV=BV, num_warps=4)
    BC = 16
    NC = BT // BC
    dq_intra = torch.empty(total, H, K, device=q.device, dtype=torch.float32)
    dk_intra = torch.empty(total, H, K, device=q.device, dtype=torch.float32)
    _bwd_intra_kernel[(triton.cdiv(K, BK) * NC, rows, H)](q, k, gc, dA, dq_intra, dk_intra, cu, table, H=H, K=K,
                                                           BT=BT, BC=BC, BK=BK, NC=NC, num_warps=4)
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    dg = torch.empty_like(g)
    _bwd_inter_kernel[(triton.cdiv(K, BK), rows, H)](q, k, v, gc, h, do, dh, dq_intra, dk_intra, dq, dk, dg, cu,
                                                     table, offsets, scale, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
                                                     num_warps=8)
    return dq, dk, dv, dg, dh0


@torch.library.custom_op("memzoo::gla_chunk_fwd", mutates_args=())
def _gla_chunk_fwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float, h0: Tensor | None, cu: Tensor,
                   chunk_size: int, want_final: bool) -> tuple[Tensor, Tensor]:
    o, ht = _forward(q, k, v, g, scale, h0, cu, chunk_size, want_final)
    # a custom op cannot return None: an unrequested final state is an empty tensor
    return o, ht if ht is not None else q.new_zeros(0, dtype=torch.float32)


@_gla_chunk_fwd.register_fake
def _(q, k, v, g, scale, h0, cu, chunk_size, want_final):
    _, _, H, K = q.shape
    shape = (cu.shape[0] - 1, H, K, v.shape[-1]) if want_final else (0,)
    return torch.empty_like(v), q.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("memzoo::gla_chunk_bwd", mutates_args=())
def _gla_chunk_bwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float, h0: Tensor | None, cu: Tensor,
                   chunk_size: int, do: Tensor, dht: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dg, dh0 = _backward(q, k, v, g, scale, h0, cu, chunk_size, do, dht)
    return dq, dk, dv, dg, dh0 if dh0 is not None else q.new_zeros(0, dtype=torch.float32)


@_gla_chunk_bwd.register_fake
def _(q, k, v, g, scale, h0, cu, chunk_size, do, dht):
    dh0 = torch.empty_like(h0) if h0 is not None else q.new_empty(0, dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g), dh0


def _setup_context(ctx, inputs, output):
    q, k, v, g, scale, h0, cu, chunk_size, want_final = inputs
    ctx.save_for_backward(q, k, v, g, h0, cu)
    ctx.scale, ctx.chunk_size, ctx.want_final = scale, chunk_size, want_final


def _backward_rule(ctx, do, dht):
    """The hand-derived backward (README.md): recomputes gates, states and A from the saved inputs."""
    q, k, v, g, h0, cu = ctx.saved_tensors
    dht = dht.contiguous() if ctx.want_final and dht is not None else None
    dq, dk, dv, dg, dh0 = _gla_chunk_bwd(q, k, v, g, ctx.scale, h0, cu, ctx.chunk_size, do.contiguous(), dht)
    return dq, dk, dv, dg, None, dh0 if h0 is not None else None, None, None, None


_gla_chunk_fwd.register_autograd(_backward_rule, setup_context=_setup_context)


def chunk_gla_triton(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float | None = None, initial_state: Tensor | None = None,
    output_final_state: bool = False, cu_seqlens: Tensor | None = None, chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Triton chunked GLA; arguments and results as ``memzoo.kernels.gla.chunk_gla`` (inputs already checked).

    The chunk is shrunk to ``max(16, next_pow2(T))`` when the whole input is shorter than ``chunk_size``.
    """
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else float(scale)
    BT = min(chunk_size, max(16, triton.next_power_of_2(max(T, 1))))
    qf, cu = flatten_batch(q.contiguous(), cu_seqlens)
    kf, _ = flatten_batch(k.contiguous(), cu_seqlens)
    vf, _ = flatten_batch(v.contiguous(), cu_seqlens)
    gf, _ = flatten_batch(g.contiguous(), cu_seqlens)
    h0 = None if initial_state is None else initial_state.contiguous()
    o, ht = _gla_chunk_fwd(qf, kf, vf, gf, scale, h0, cu, BT, output_final_state)
    return o.reshape(v.shape), ht if output_final_state else None
