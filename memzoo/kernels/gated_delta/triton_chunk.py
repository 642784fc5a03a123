"""Chunked gated delta rule on GPU: the op, its backward kernels and the autograd wiring; the forward kernels
(blockwise WY solve, w/u, state pass, outputs; tensor-core dots) live in ``triton_chunk_fwd.py``.

Paper: "Gated Delta Networks: Improving Mamba2 with Delta Rule" (arXiv 2412.06464); chunking after
"Parallelizing Linear Transformers with the Delta Rule over Sequence Length" (arXiv 2406.06484).
Recurrence, state S [K, V]:  S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T,
o_t = scale * S_t^T q_t.  Derivation of both directions and the saved / recomputed tensors: README.md next to
this file.

Everything runs in varlen form: B > 1 is flattened into one packed sequence ``[T, H, D]``. Chunk-parallel kernels
run over the (sequence, chunk) rows of ``chunk_table`` (a static bound of ceil(T / BT) + N rows, no host sync;
surplus rows exit at once); the sequential state passes run one program per (V tile, sequence, head) with the fp32
state tile in registers and address chunk c of sequence n as row ``chunk_offsets[n] + c``.

Backward, after recomputing the forward's A, w, v_new (= D) and chunk start states h:

1. ``_dv_local_kernel``: dv_local = scale (q k^T * Gamma)^T dO, the part of dD that needs no state;
2. ``_state_bwd_kernel``: the reverse state pass; dh (each chunk's end-state gradient dS'), dD = dv_local +
   (k exp(G_last - G)) dS', dh0;
3. ``_dqkwg_kernel``: dq, the output and state-update parts of dk, dw = -dD S^T and their terms of dG (the
   gradient with respect to the in-chunk cumsum G), per K tile;
4. ``_wy_bwd_kernel``: the WY transform's backward (dv, the rest of dk, dbeta, dG) and dg = the in-chunk reverse
   cumsum of dG.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_utils import autotune_or_fixed
from ..utils import chunk_table, flatten_batch, resolve_dot_precision
from .reference import l2norm
from .triton_chunk_fwd import MAX_CHUNK, STATE_CONFIGS, chunk_start, forward_output, state_block
from .triton_chunk_fwd import forward_states as _forward_states

__all__ = ["chunk_gated_delta_rule_triton"]


@autotune_or_fixed(
    [triton.Config({"BK": bk, "BV": bv}, num_warps=w) for bk in (32, 64) for bv in (32, 64) for w in (2, 4)],
    key=["H", "K", "V", "BT", "DOT_PRECISION"],
    default=triton.Config({"BK": 64, "BV": 64}, num_warps=4),
)
@triton.jit
def _dv_local_kernel(
    q, k, g_cum, do, dv, cu_seqlens, table, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # dv_local = scale (q k^T * exp(G_i - G_j), i >= j)^T dO for one (chunk, head); fp32 out.
    i_r, i_h = tl.program_id(0), tl.program_id(1)
    i_n, t0, n_in = chunk_start(table, cu_seqlens, i_r, BT)
    if i_n < 0:
        return
    o_i = tl.arange(0, BT)
    m_t = o_i < n_in
    p_q = q + (t0 * H + i_h) * K
    p_k = k + (t0 * H + i_h) * K
    b_s = tl.zeros([BT, BT], dtype=tl.float32)  # [j, i] = k_j . q_i
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        o_tk = o_i[:, None] * (H * K) + o_k[None, :]
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(p_k + o_tk, mask=m_tk, other=0.0)  # [BT, BK]
        b_q = tl.load(p_q + o_tk, mask=m_tk, other=0.0)
        b_s = tl.dot(b_k, tl.trans(b_q), b_s, input_precision=DOT_PRECISION)
    b_G = tl.load(g_cum + t0 * H + i_h + o_i * H, mask=m_t, other=0.0)  # [BT]
    # Only i >= j with token i inside the sequence: padded G would make exp(G_i - G_j) overflow.
    m_s = (o_i[:, None] <= o_i[None, :]) & m_t[None, :]
    b_s = tl.where(m_s, b_s * tl.exp(tl.where(m_s, b_G[None, :] - b_G[:, None], 0.0)), 0.0) * scale
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        o_tv = o_i[:, None] * (H * V) + o_v[None, :]
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_do = tl.load(do + (t0 * H + i_h) * V + o_tv, mask=m_tv, other=0.0).to(k.dtype.element_ty)  # [BT, BV]
        b_dv = tl.dot(b_s.to(k.dtype.element_ty), b_do, input_precision=DOT_PRECISION)
        tl.store(dv + (t0 * H + i_h) * V + o_tv, b_dv, mask=m_tv)


@triton.jit
def _dstate_tile_dd(p_k, b_dh, b_kd, o_t, m_t, i_kt: tl.constexpr, H: tl.constexpr, K: tl.constexpr,
                    BK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # k dS, accumulated over the K tiles
    o_k = i_kt * BK + tl.arange(0, BK)
    b_k = tl.load(p_k + o_t[:, None] * (H * K) + o_k[None, :], mask=m_t[:, None] & (o_k < K)[None, :], other=0.0)
    return tl.dot(b_k, b_dh.to(b_k.dtype), b_kd, input_precision=DOT_PRECISION)


@triton.jit
def _dstate_tile_update(p_q, p_w, b_dh, b_do, b_ndd, b_decay, o_t, m_t, i_kt: tl.constexpr, H: tl.constexpr,
                        K: tl.constexpr, BK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # dS[tile] <- exp(G_last) dS[tile] + q[:, tile]^T (scale exp(G) dO) + w[:, tile]^T (-dD)
    o_k = i_kt * BK + tl.arange(0, BK)
    # Loaded transposed ([BK, BT]) so the tiles enter the dots as they are.
    o_kt = o_k[:, None] + o_t[None, :] * (H * K)
    m_kt = (o_k < K)[:, None] & m_t[None, :]
    b_q = tl.load(p_q + o_kt, mask=m_kt, other=0.0)  # [BK, BT]
    b_dh = tl.dot(b_q, b_do, b_dh * b_decay, input_precision=DOT_PRECISION)
    b_w = tl.load(p_w + o_kt, mask=m_kt, other=0.0)  # [BK, BT]
    return tl.dot(b_w, b_ndd, b_dh, input_precision=DOT_PRECISION)


@triton.jit
def _dstate_tile_store(p, b_dh, o_kv, m_v, i_kt: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr):
    # One K tile of a state gradient; o_kv is the first tile's [BK, BV] offsets.
    o_k = i_kt * BK + tl.arange(0, BK)
    tl.store(p + i_kt * BK * V + o_kv, b_dh.to(p.dtype.element_ty), mask=(o_k < K)[:, None] & m_v[None, :])


# Eight warps by default: with four, the fp32 (TF32) reverse pass spills at K = 128 on sm_80.
@autotune_or_fixed(STATE_CONFIGS, key=["H", "K", "V", "BT", "DOT_PRECISION"],
                   default=triton.Config({"BV": 16}, num_warps=8, num_stages=1))
@triton.jit
def _state_bwd_kernel(
    q, k, w, g_cum, do, dv_local, dht, dh, dv2, dh0, cu_seqlens, chunk_offsets, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Reverse pass: dS (the gradient of the state at a chunk's end) walks the chunks backwards,
    #   dD = dv_local + exp(G_last - G) (k dS),    dS <- exp(G_last) dS + q^T (scale exp(G) dO) - w^T dD;
    # dh gets dS at the end of every chunk (row chunk_offsets[n] + c), dv2 gets dD, dh0 the gradient of the
    # initial state. dS is split into up to four [BK, BV] fp32 tiles (K <= 4 BK).
    i_v, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n64 = tl.cast(i_n, tl.int64)
    bos = tl.load(cu_seqlens + i_n64).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n64 + 1).to(tl.int64)
    n_chunks = tl.cdiv(eos - bos, BT)
    row0 = tl.load(chunk_offsets + i_n64).to(tl.int64)
    o_t = tl.arange(0, BT)
    o_b = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    # int64 only in scalar bases; tile offsets are int32.
    o_kv = o_b[:, None] * V + o_v[None, :]  # [BK, BV]
    p_state = (i_n64 * H + i_h) * K * V
    b_dh1 = tl.zeros([BK, BV], dtype=tl.float32)
    b_dh2 = tl.zeros([BK, BV], dtype=tl.float32)
    b_dh3 = tl.zeros([BK, BV], dtype=tl.float32)
    b_dh4 = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh1 = tl.load(dht + p_state + o_kv, mask=(o_b < K)[:, None] & m_v[None, :], other=0.0)
        if K > BK:
            b_dh2 = tl.load(dht + p_state + BK * V + o_kv, mask=(o_b + BK < K)[:, None] & m_v[None, :], other=0.0)
        if K > 2 * BK:
            b_dh3 = tl.load(dht + p_state + 2 * BK * V + o_kv, mask=(o_b + 2 * BK < K)[:, None] & m_v[None, :],
                            other=0.0)
        if K > 3 * BK:
            b_dh4 = tl.load(dht + p_state + 3 * BK * V + o_kv, mask=(o_b + 3 * BK < K)[:, None] & m_v[None, :],
                            other=0.0)
    for i_c in range(0, n_chunks):
        i_cr = n_chunks - 1 - tl.cast(i_c, tl.int64)
        t0 = bos + i_cr * BT
        m_t = o_t < eos - t0
        p_end = dh + ((row0 + i_cr) * H + i_h) * K * V
        p_k = k + (t0 * H + i_h) * K
        o_tv = o_t[:, None] * (H * V) + o_v[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_gl = tl.load(g_cum + (tl.minimum(t0 + BT, eos) - 1) * H + i_h)
        b_G = tl.load(g_cum + t0 * H + i_h + o_t * H, mask=m_t, other=0.0)  # [BT]
        b_kd = tl.zeros([BT, BV], dtype=tl.float32)
        _dstate_tile_store(p_end, b_dh1, o_kv, m_v, 0, K, V, BK)
        b_kd = _dstate_tile_dd(p_k, b_dh1, b_kd, o_t, m_t, 0, H, K, BK, DOT_PRECISION)
        if K > BK:
            _dstate_tile_store(p_end, b_dh2, o_kv, m_v, 1, K, V, BK)
            b_kd = _dstate_tile_dd(p_k, b_dh2, b_kd, o_t, m_t, 1, H, K, BK, DOT_PRECISION)
        if K > 2 * BK:
            _dstate_tile_store(p_end, b_dh3, o_kv, m_v, 2, K, V, BK)
            b_kd = _dstate_tile_dd(p_k, b_dh3, b_kd, o_t, m_t, 2, H, K, BK, DOT_PRECISION)
        if K > 3 * BK:
            _dstate_tile_store(p_end, b_dh4, o_kv, m_v, 3, K, V, BK)
            b_kd = _dstate_tile_dd(p_k, b_dh4, b_kd, o_t, m_t, 3, H, K, BK, DOT_PRECISION)
        b_dd = tl.load(dv_local + (t0 * H + i_h) * V + o_tv, mask=m_tv, other=0.0)  # [BT, BV] fp32
        b_dd = b_dd + b_kd * tl.where(m_t, tl.exp(b_gl - b_G), 0.0)[:, None]
        tl.store(dv2 + (t0 * H + i_h) * V + o_tv, b_dd.to(dv2.dtype.element_ty), mask=m_tv)
        b_dd = (-b_dd).to(dv2.dtype.element_ty)  # negated in fp32 (the interpreter stores bf16 as integers)
        b_do = tl.load(do + (t0 * H + i_h) * V + o_tv, mask=m_tv, other=0.0).to(tl.float32)
        b_do = (b_do * tl.where(m_t, scale * tl.exp(b_G), 0.0)[:, None]).to(dv2.dtype.element_ty)
        b_decay = tl.exp(b_gl)
        p_q = q + (t0 * H + i_h) * K
        p_w = w + (t0 * H + i_h) * K
        b_dh1 = _dstate_tile_update(p_q, p_w, b_dh1, b_do, b_dd, b_decay, o_t, m_t, 0, H, K, BK, DOT_PRECISION)
        if K > BK:
            b_dh2 = _dstate_tile_update(p_q, p_w, b_dh2, b_do, b_dd, b_decay, o_t, m_t, 1, H, K, BK, DOT_PRECISION)
        if K > 2 * BK:
            b_dh3 = _dstate_tile_update(p_q, p_w, b_dh3, b_do, b_dd, b_decay, o_t, m_t, 2, H, K, BK, DOT_PRECISION)
        if K > 3 * BK:
            b_dh4 = _dstate_tile_update(p_q, p_w, b_dh4, b_do, b_dd, b_decay, o_t, m_t, 3, H, K, BK, DOT_PRECISION)
    if USE_INITIAL_STATE:
        _dstate_tile_store(dh0 + p_state, b_dh1, o_kv, m_v, 0, K, V, BK)
        if K > BK:
            _dstate_tile_store(dh0 + p_state, b_dh2, o_kv, m_v, 1, K, V, BK)
        if K > 2 * BK:
            _dstate_tile_store(dh0 + p_state, b_dh3, o_kv, m_v, 2, K, V, BK)
        if K > 3 * BK:
            _dstate_tile_store(dh0 + p_state, b_dh4, o_kv, m_v, 3, K, V, BK)


@autotune_or_fixed(
    [triton.Config({"BV": bv}, num_warps=w, num_stages=s) for bv in (16, 32, 64) for w in (4, 8) for s in (1, 2)],
    key=["H", "K", "V", "BT", "BK", "DOT_PRECISION"],
    default=triton.Config({"BV": 16}, num_warps=8, num_stages=1),
)
@triton.jit
def _dqkwg_kernel(
    q, k, v_new, g_cum, h, do, dh, dv2, dq, dk, dw, dG, cu_seqlens, table, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One (K tile, chunk, head), walking V: with S the chunk's start state, dS' its end-state gradient, D = v_new,
    #   dq = scale [exp(G) (dO S^T) + (dO D^T * Gamma) k],  dk = (dO D^T * Gamma)^T q scale + exp(G_last - G) (D dS'^T),
    #   dw = -dD S^T,  and this K tile's part of dG (README.md). dk, dw and dG are fp32 partial results.
    i_k, i_r, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, t0, n_in = chunk_start(table, cu_seqlens, i_r, BT)
    if i_n < 0:
        return
    i_r64 = tl.cast(i_r, tl.int64)
    o_i = tl.arange(0, BT)
    m_t = o_i < n_in
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    o_tk = o_i[:, None] * (H * K) + o_k[None, :]
    m_tk = m_t[:, None] & m_k[None, :]
    p_h = h + (i_r64 * H + i_h) * K * V
    p_dh = dh + (i_r64 * H + i_h) * K * V
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)
    b_hdh = tl.zeros([BK], dtype=tl.float32)  # sum_v S * dS'
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        o_kv = o_k[:, None] * V + o_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        o_tv = o_i[:, None] * (H * V) + o_v[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_h = tl.load(p_h + o_kv, mask=m_kv, other=0.0)  # [BK, BV]
        b_dh = tl.load(p_dh + o_kv, mask=m_kv, other=0.0)
        b_vn = tl.load(v_new + (t0 * H + i_h) * V + o_tv, mask=m_tv, other=0.0)  # [BT, BV]
        b_dv = tl.load(dv2 + (t0 * H + i_h) * V + o_tv, mask=m_tv, other=0.0)
        b_do = tl.load(do + (t0 * H + i_h) * V + o_tv, mask=m_tv, other=0.0).to(b_vn.dtype)
        b_ds = tl.dot(b_do, tl.trans(b_vn), b_ds, input_precision=DOT_PRECISION)
        b_dq = tl.dot(b_do, tl.trans(b_h), b_dq, input_precision=DOT_PRECISION)
        b_dk = tl.dot(b_vn, tl.trans(b_dh), b_dk, input_precision=DOT_PRECISION)
        b_dw = tl.dot(b_dv, tl.trans(b_h), b_dw, input_precision=DOT_PRECISION)
        b_hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), 1)
    tl.store(dw + (t0 * H + i_h) * K + o_tk, -b_dw, mask=m_tk)
    n_last = tl.minimum(n_in, BT) - 1
    b_gl = tl.load(g_cum + (t0 + n_last) * H + i_h)
    b_G = tl.load(g_cum + t0 * H + i_h + o_i * H, mask=m_t, other=0.0)  # [BT]
    m_s = (o_i[:, None] >= o_i[None, :]) & m_t[:, None]
    b_ds = tl.where(m_s, b_ds * tl.exp(tl.where(m_s, b_G[:, None] - b_G[None, :], 0.0)), 0.0) * scale
    b_q = tl.load(q + (t0 * H + i_h) * K + o_tk, mask=m_tk, other=0.0)  # [BT, BK]
    b_k = tl.load(k + (t0 * H + i_h) * K + o_tk, mask=m_tk, other=0.0)
    # dG_i = q_i.dq_i - k_i.dk_i, and G_last gets exp(G_last) sum(S * dS') + sum_j k_j.dk_tail_j. The terms that
    # cancel exactly (the attention diagonal, the state update's last token) are left out, not subtracted: with
    # strong decays dG is far smaller than they are.
    b_dq = b_dq * tl.where(m_t, scale * tl.exp(b_G), 0.0)[:, None]  # the state's part
    b_dg = tl.sum(b_q.to(tl.float32) * b_dq, 1)
    b_dk = b_dk * tl.where(m_t, tl.exp(b_gl - b_G), 0.0)[:, None]  # the state update's part
    b_kdk = tl.where(o_i != n_last, tl.sum(b_k.to(tl.float32) * b_dk, 1), 0.0)
    b_dg += tl.where(o_i == n_last, tl.exp(b_gl) * tl.sum(b_hdh) + tl.sum(b_kdk), -b_kdk)
    # The attention part, its diagonal apart (that term of dG cancels): rowsum and colsum of (dO D^T * P) through
    # q.(ds k) and k.(ds^T q), ds strictly lower.
    b_dsd = tl.sum(tl.where(o_i[:, None] == o_i[None, :], b_ds, 0.0), 1)  # [BT]
    b_ds = tl.where(o_i[:, None] > o_i[None, :], b_ds, 0.0)
    b_dqa = tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=DOT_PRECISION)  # [BT, BK]
    b_dg += tl.sum(b_q.to(tl.float32) * b_dqa, 1)
    b_dq += b_dqa + b_dsd[:, None] * b_k.to(tl.float32)
    tl.store(dq + (t0 * H + i_h) * K + o_tk, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    b_dka = tl.dot(tl.trans(b_ds).to(b_q.dtype), b_q, input_precision=DOT_PRECISION)
    b_dg -= tl.sum(b_k.to(tl.float32) * b_dka, 1)
    b_dk += b_dka + b_dsd[:, None] * b_q.to(tl.float32)
    # dG partials are [T, H, NK]: this K tile's column.
    tl.store(dG + (t0 * H + i_h) * tl.cdiv(K, BK) + i_k + o_i * (H * tl.cdiv(K, BK)), b_dg, mask=m_t)
    tl.store(dk + (t0 * H + i_h) * K + o_tk, b_dk, mask=m_tk)


@autotune_or_fixed(
    [triton.Config({"BK": bk, "BV": bv}, num_warps=w, num_stages=s) for bk in (16, 32, 64) for bv in (16, 32, 64)
     for w in (4, 8) for s in (1, 2)],
    key=["H", "K", "V", "BT", "NK", "DOT_PRECISION"],
    default=triton.Config({"BK": 16, "BV": 16}, num_warps=4, num_stages=1),
)
@triton.jit
def _wy_bwd_kernel(
    k, v, beta, g_cum, A, dw, dv2, dk_part, dG_part, dk, dv, dbeta, dg, cu_seqlens, table,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, NK: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Backward of steps 1-2 for one (chunk, head): w = A (beta exp(G) k), u = A (beta v), A = (I + L)^-1 with
    # L_ij = beta_i exp(G_i - G_j) k_i.k_j (i > j); du = dD. Finishes dk, writes dv, dbeta and dg = the in-chunk
    # reverse cumsum of dG (this kernel's terms plus the NK partials of _dqkwg_kernel).
    i_r, i_h = tl.program_id(0), tl.program_id(1)
    i_n, t0, n_in = chunk_start(table, cu_seqlens, i_r, BT)
    if i_n < 0:
        return
    o_i = tl.arange(0, BT)
    m_t = o_i < n_in
    # A^T, loaded transposed: every dot below takes A^T (no register transpose).
    b_At = tl.load(A + (t0 * H + i_h) * BT + o_i[None, :] * (H * BT) + o_i[:, None], mask=m_t[None, :],
                   other=0.0)  # [BT, BT]
    b_beta = tl.load(beta + t0 * H + i_h + o_i * H, mask=m_t, other=0.0).to(tl.float32)  # [BT]
    b_G = tl.load(g_cum + t0 * H + i_h + o_i * H, mask=m_t, other=0.0)  # [BT]
    b_eg = tl.where(m_t, tl.exp(b_G), 0.0)
    b_kscale = b_beta * b_eg
    p_k = k + (t0 * H + i_h) * K
    p_dw = dw + (t0 * H + i_h) * K
    # dA = dw (beta exp(G) k)^T + du (beta v)^T
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        o_tk = o_i[:, None] * (H * K) + o_k[None, :]
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(p_k + o_tk, mask=m_tk, other=0.0)  # [BT, BK]
        b_dw = tl.load(p_dw + o_tk, mask=m_tk, other=0.0).to(b_k.dtype)
        b_kb = (b_k * b_kscale[:, None]).to(b_k.dtype)
        b_dA = tl.dot(b_dw, tl.trans(b_kb), b_dA, input_precision=DOT_PRECISION)
    b_db = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        o_tv = o_i[:, None] * (H * V) + o_v[None, :]
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_v = tl.load(v + (t0 * H + i_h) * V + o_tv, mask=m_tv, other=0.0)  # [BT, BV]
        b_du = tl.load(dv2 + (t0 * H + i_h) * V + o_tv, mask=m_tv, other=0.0).to(b_At.dtype)
        b_vb = (b_v * b_beta[:, None]).to(b_At.dtype)
        b_dA = tl.dot(b_du, tl.trans(b_vb), b_dA, input_precision=DOT_PRECISION)
        b_dvb = tl.dot(b_At, b_du, input_precision=DOT_PRECISION)  # d(beta v) = A^T du
        b_db += tl.sum(b_dvb * b_v.to(tl.float32), 1)
        tl.store(dv + (t0 * H + i_h) * V + o_tv, (b_dvb * b_beta[:, None]).to(dv.dtype.element_ty), mask=m_tv)
    # dL = -A^T dA A^T on the strict lower triangle (A's diagonal is fixed, its upper part zero).
    m_low = (o_i[:, None] > o_i[None, :]) & m_t[:, None]
    b_dA = tl.where(m_low, b_dA, 0.0).to(b_At.dtype)
    b_dL = tl.dot(b_dA, b_At, input_precision=DOT_PRECISION).to(b_At.dtype)
    b_dL = -tl.dot(b_At, b_dL, input_precision=DOT_PRECISION)
    # dM = dL * exp(G_i - G_j) = dL * L / (beta_i k_i.k_j). With x = dM k and y = (beta dM)^T k: dk += beta x + y,
    # dbeta_i += k_i.x_i, dG_i += beta_i k_i.x_i - k_i.y_i (the rowsum and colsum of dL * L).
    b_dM = tl.where(m_low, b_dL * tl.exp(tl.where(m_low, b_G[:, None] - b_G[None, :], 0.0)), 0.0)
    b_dMb = tl.trans((b_dM * b_beta[:, None]).to(b_At.dtype))
    b_dM = b_dM.to(b_At.dtype)
    b_dG = tl.zeros([BT], dtype=tl.float32)
    p_dkp = dk_part + (t0 * H + i_h) * K
    # Two passes over K, so that only A^T, or dM and (beta dM)^T, are held as dot operands at a time: first the w
    # part (into dk_part, in place), then the L part and the final dk.
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        o_tk = o_i[:, None] * (H * K) + o_k[None, :]
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_dw = tl.load(p_dw + o_tk, mask=m_tk, other=0.0).to(b_At.dtype)
        b_dkb = tl.dot(b_At, b_dw, input_precision=DOT_PRECISION)  # d(beta exp(G) k) = A^T dw
        b_k = tl.load(p_k + o_tk, mask=m_tk, other=0.0).to(tl.float32)  # [BT, BK]
        b_s = tl.sum(b_dkb * b_k, 1) * b_eg
        b_db += b_s
        b_dG += b_beta * b_s
        b_dk = tl.load(p_dkp + o_tk, mask=m_tk, other=0.0) + b_dkb * b_kscale[:, None]
        tl.store(p_dkp + o_tk, b_dk, mask=m_tk)
    tl.debug_barrier()  # the block's stores to dk_part are visible to all its threads below
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        o_tk = o_i[:, None] * (H * K) + o_k[None, :]
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(p_k + o_tk, mask=m_tk, other=0.0)  # [BT, BK]
        b_x = tl.dot(b_dM, b_k, input_precision=DOT_PRECISION)
        b_y = tl.dot(b_dMb, b_k, input_precision=DOT_PRECISION)
        b_kf = b_k.to(tl.float32)
        b_r = tl.sum(b_x * b_kf, 1)
        b_db += b_r
        b_dG += b_beta * b_r - tl.sum(b_y * b_kf, 1)
        b_dk = tl.load(p_dkp + o_tk, mask=m_tk, other=0.0) + b_x * b_beta[:, None] + b_y
        tl.store(dk + (t0 * H + i_h) * K + o_tk, b_dk.to(dk.dtype.element_ty), mask=m_tk)
    o_p = (t0 * H + i_h) * NK + o_i * (H * NK)
    for i_p in range(0, NK):
        b_dG += tl.load(dG_part + o_p + i_p, mask=m_t, other=0.0)
    b_dg = tl.cumsum(tl.where(m_t, b_dG, 0.0), 0, reverse=True)  # g_j enters G_i for every i >= j
    tl.store(dg + t0 * H + i_h + o_i * H, b_dg.to(dg.dtype.element_ty), mask=m_t)
    tl.store(dbeta + t0 * H + i_h + o_i * H, b_db.to(dbeta.dtype.element_ty), mask=m_t)


def _chunk_rows(cu: Tensor, total: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    """(the chunk table, each sequence's first chunk row ``[N]``), both on the device."""
    lengths = cu[1:] - cu[:-1]
    n_chunks = (lengths + chunk_size - 1) // chunk_size
    return chunk_table(cu, total, chunk_size).contiguous(), n_chunks.cumsum(0) - n_chunks


def _chunk_forward(q, k, v, g, beta, h0, cu, scale, chunk_size, precision):
    """Packed inputs ``[T, H, ...]`` -> (o ``[T, H, V]`` in q's dtype, ht fp32 ``[N, H, K, V]``)."""
    table, chunk_offsets = _chunk_rows(cu, q.shape[0], chunk_size)
    g_cum, _, _, _, v_new, h, ht = _forward_states(k, v, g, beta, h0, cu, table, chunk_offsets, chunk_size,
                                                   precision)
    o = forward_output(q, k, v_new, h, g_cum, cu, table, scale, chunk_size, precision, q.dtype)
    return o, ht


def _chunk_backward(q, k, v, g, beta, h0, cu, do, dht, scale, chunk_size, precision):
    """Gradients of every input: recompute A, w, v_new and the chunk start states, then the four backward kernels
    (module docstring)."""
    T, H, K = k.shape
    V = v.shape[-1]
    n_seq = cu.numel() - 1
    table, chunk_offsets = _chunk_rows(cu, T, chunk_size)
    rows = table.shape[0]
    g_cum, A, w, _, v_new, h, _ = _forward_states(k, v, g, beta, h0, cu, table, chunk_offsets, chunk_size,
                                                  precision)
    f32 = dict(dtype=torch.float32, device=k.device)
    do, dht = do.contiguous(), dht.contiguous()
    dv_local = torch.empty(T, H, V, **f32)
    _dv_local_kernel[(rows, H)](q, k, g_cum, do, dv_local, cu, table, scale, H=H, K=K, V=V, BT=chunk_size,
                                DOT_PRECISION=precision)
    dh = torch.empty(rows, H, K, V, dtype=k.dtype, device=k.device)
    dv2 = torch.empty(T, H, V, dtype=k.dtype, device=k.device)
    dh0 = torch.empty(n_seq, H, K, V, **f32) if h0 is not None else None
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), n_seq, H)
    _state_bwd_kernel[grid](
        q, k, w, g_cum, do, dv_local, dht, dh, dv2, dh0, cu, chunk_offsets, scale,
        H=H, K=K, V=V, BT=chunk_size, BK=state_block(K), USE_FINAL_STATE_GRADIENT=dht is not None,
        USE_INITIAL_STATE=h0 is not None, DOT_PRECISION=precision,
    )
    BK = min(32, max(16, triton.next_power_of_2(K)))  # the K tile of _dqkwg_kernel (its dG partials)
    NK = triton.cdiv(K, BK)
    dq = torch.empty_like(q)
    dk_part, dw = torch.empty(T, H, K, **f32), torch.empty(T, H, K, **f32)
    dG = torch.empty(T, H, NK, **f32)
    _dqkwg_kernel[(NK, rows, H)](q, k, v_new, g_cum, h, do, dh, dv2, dq, dk_part, dw, dG, cu, table, scale,
                                 H=H, K=K, V=V, BT=chunk_size, BK=BK, DOT_PRECISION=precision)
    dk, dv, dg, dbeta = torch.empty_like(k), torch.empty_like(v), torch.empty_like(g), torch.empty_like(beta)
    _wy_bwd_kernel[(rows, H)](k, v, beta, g_cum, A, dw, dv2, dk_part, dG, dk, dv, dbeta, dg, cu, table,
                              H=H, K=K, V=V, BT=chunk_size, NK=NK, DOT_PRECISION=precision)
    return dq, dk, dv, dg, dbeta, (dh0 if dh0 is not None else q.new_zeros(0, dtype=torch.float32))




@torch.library.custom_op("memzoo::gated_delta_chunk_fwd", mutates_args=())
def _chunk_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, h0: Tensor | None, cu: Tensor, scale: float,
    chunk_size: int, precision: str,
) -> tuple[Tensor, Tensor]:
    return _chunk_forward(q, k, v, g, beta, h0, cu, scale, chunk_size, precision)


@_chunk_fwd_op.register_fake
def _(q, k, v, g, beta, h0, cu, scale, chunk_size, precision):
    T, H, K = q.shape
    return v.new_empty(T, H, v.shape[-1], dtype=q.dtype), q.new_empty(cu.shape[0] - 1, H, K, v.shape[-1],
                                                                       dtype=torch.float32)


@torch.library.custom_op("memzoo::gated_delta_chunk_bwd", mutates_args=())
def _chunk_bwd_op(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, h0: Tensor | None, cu: Tensor, do: Tensor,
    dht: Tensor, scale: float, chunk_size: int, precision: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _chunk_backward(q, k, v, g, beta, h0, cu, do, dht, scale, chunk_size, precision)


@_chunk_bwd_op.register_fake
def _(q, k, v, g, beta, h0, cu, do, dht, scale, chunk_size, precision):
    dh0 = h0.new_empty(h0.shape) if h0 is not None else q.new_empty(0, dtype=torch.float32)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g),
            torch.empty_like(beta), dh0)


def _setup_context(ctx, inputs, output):
    q, k, v, g, beta, h0, cu, scale, chunk_size, precision = inputs
    ctx.save_for_backward(q, k, v, g, beta, h0, cu)
    ctx.scale, ctx.chunk_size, ctx.precision = scale, chunk_size, precision


def _backward(ctx, do, dht):
    q, k, v, g, beta, h0, cu = ctx.saved_tensors
    if do is None:
        do = torch.zeros(q.shape[:2] + v.shape[-1:], dtype=q.dtype, device=q.device)
    if dht is None:
        dht = torch.zeros(cu.shape[0] - 1, q.shape[1], q.shape[2], v.shape[-1], device=q.device)
    dq, dk, dv, dg, dbeta, dh0 = _chunk_bwd_op(q, k, v, g, beta, h0, cu, do, dht, ctx.scale, ctx.chunk_size,
                                               ctx.precision)
    return dq, dk, dv, dg, dbeta, (dh0 if h0 is not None else None), None, None, None, None


_chunk_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def chunk_gated_delta_rule_triton(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float | None = None,
    initial_state: Tensor | None = None, output_final_state: bool = False, cu_seqlens: Tensor | None = None,
    use_qk_l2norm: bool = False, chunk_size: int = 64, precision: str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The Triton path of ``chunk_gated_delta_rule`` (inputs already validated by the dispatcher)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if chunk_size < 16 or chunk_size & (chunk_size - 1) or chunk_size > MAX_CHUNK:
        raise ValueError(f"chunk_size must be a power of two >= 16 and <= {MAX_CHUNK} on the Triton path (the "
                         f"blockwise solve merges up to four 16x16 blocks), got {chunk_size}")
    precision = resolve_dot_precision(precision)
    if K > 256:
        raise ValueError(f"the Triton path keeps a [K, BV] state tile in registers: K must be <= 256, got {K}")
    if scale is None:
        scale = K ** -0.5
    out_dtype = q.dtype
    if use_qk_l2norm:
        # Normalised in fp32 (autograd carries the l2norm backward), then back to the input dtype so every
        # kernel sees one dtype.
        q, k = l2norm(q.float()).to(out_dtype), l2norm(k.float()).to(out_dtype)
    (q, cu), (k, _), (v, _), (g, _), (beta, _) = (flatten_batch(x, cu_seqlens) for x in (q, k, v, g, beta))
    h0 = None if initial_state is None else initial_state.contiguous()
    q, k, v, g, beta = (x[0].contiguous() for x in (q, k, v, g, beta))
    o, ht = _chunk_fwd_op(q, k, v, g, beta, h0, cu, float(scale), chunk_size, precision)
    return o.reshape(B, T, H, V).to(out_dtype), (ht if output_final_state else None)
