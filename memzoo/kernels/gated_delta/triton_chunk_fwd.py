"""Forward stages of the chunked gated delta rule on GPU, written for tensor cores (README.md, steps 1-5).

Paper: "Gated Delta Networks: Improving Mamba2 with Delta Rule" (arXiv 2412.06464); chunking after
"Parallelizing Linear Transformers with the Delta Rule over Sequence Length" (arXiv 2406.06484).
Recurrence, state S [K, V]:  S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T.

Four kernels, one per stage, each keeping few fp32 tiles live:

1. ``_wy_solve_kernel``: in-chunk cumsum G of g and A = (I + L)^-1 blockwise: the chunk is cut into 16-row
   sub-blocks (up to four, so BT <= 64); the Gram blocks k_i k_j^T are tensor-core dots, the four 16x16 diagonal
   blocks of (I + L) are inverted by forward substitution and the off-diagonal blocks of the inverse are merged
   with 16x16 dots (X_ij = -X_ii sum_{j<=m<i} L_im X_mj).
2. ``_wu_fwd_kernel``: w = A (beta exp(G) k), u = A (beta v).
3. ``_state_fwd_kernel``: the sequential state pass; the fp32 state lives in up to four [64, BV] register tiles,
   stores every chunk's start state h and the corrected values v_new = u - w h.
4. ``_output_fwd_kernel``: o = scale [exp(G) (q h) + (q k^T * exp(G_i - G_j)) v_new].

Every ``tl.dot`` takes operands in the storage dtype (bf16/fp16 inputs: bf16/fp16 operands, fp32 accumulation;
fp32 inputs: TF32 unless ``DOT_PRECISION="ieee"``). A, w, u, h and v_new are stored in the input dtype; G and
the states passed between calls stay fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_utils import autotune_or_fixed

__all__ = ["forward_states", "forward_output", "chunk_start", "MAX_CHUNK"]

# Four 16-row sub-blocks per chunk.
MAX_CHUNK = 64


@triton.jit
def chunk_start(table, cu_seqlens, i_r, BT: tl.constexpr):
    """Chunk-table row i_r -> (its sequence, < 0 for a surplus row; the chunk's first token; tokens from there to the
    sequence end), int64 scalars."""
    i_r64 = tl.cast(i_r, tl.int64)
    i_n = tl.load(table + 2 * i_r64).to(tl.int64)
    i_c = tl.load(table + 2 * i_r64 + 1).to(tl.int64)
    i_s = tl.maximum(i_n, 0)  # surplus rows read sequence 0's bounds, then exit
    bos = tl.load(cu_seqlens + i_s).to(tl.int64)
    eos = tl.load(cu_seqlens + i_s + 1).to(tl.int64)
    t0 = bos + i_c * BT
    return i_n, t0, eos - t0


@triton.jit
def _invert_unit_lower(b_l, o_c):
    """(I + L)^-1 for a strictly lower-triangular [16, 16] L, by forward substitution row by row."""
    b_a = tl.where(o_c[:, None] == o_c[None, :], 1.0, 0.0)  # [16, 16]
    for i in range(1, 16):
        # Row i: e_i - sum_{j<i} L_ij X_j; rows j < i are final and L_ij = 0 for j >= i.
        b_li = tl.sum(tl.where(o_c[:, None] == i, b_l, 0.0), 0)  # [16]
        b_row = -tl.sum(b_li[:, None] * b_a, 0)  # [16]
        b_a = tl.where(o_c[:, None] == i, b_row[None, :] + b_a, b_a)
    return b_a


@triton.jit
def _store_block(p_a, b_a, o_row, m_row, j: tl.constexpr, H: tl.constexpr, BT: tl.constexpr):
    # Columns j*16 .. j*16+15 of the in-chunk rows o_row of A [T, H, BT]; p_a points at the chunk's first row.
    o_col = j * 16 + tl.arange(0, 16)
    p = p_a + o_row[:, None] * (H * BT) + o_col[None, :]
    tl.store(p, b_a.to(p_a.dtype.element_ty), mask=m_row[:, None] & (o_col < BT)[None, :])


@autotune_or_fixed(
    [triton.Config({"BK": bk}, num_warps=w) for bk in (32, 64) for w in (1, 2, 4)],
    key=["H", "K", "BT", "DOT_PRECISION"],
    default=triton.Config({"BK": 32}, num_warps=4),
)
@triton.jit
def _wy_solve_kernel(
    k, g, beta, g_cum, A, cu_seqlens, table,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Steps 1 and 2a for one (chunk, head): G = cumsum(g) and A = (I + L)^-1, L_ij = beta_i exp(G_i - G_j) k_i.k_j.
    i_r, i_h = tl.program_id(0), tl.program_id(1)
    i_r64 = tl.cast(i_r, tl.int64)
    i_n = tl.load(table + 2 * i_r64).to(tl.int64)
    if i_n < 0:
        return
    i_c = tl.load(table + 2 * i_r64 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    o_c = tl.arange(0, 16)
    t0 = bos + i_c * BT
    # int64 only in the scalar chunk base; in-chunk offsets are int32. The four 16-row sub-blocks: rows past BT
    # or past the sequence end read zeros and are never stored.
    n_in = eos - t0
    o_1, o_2, o_3, o_4 = o_c, o_c + 16, o_c + 32, o_c + 48
    m_1 = o_1 < n_in
    m_2 = (o_2 < BT) & (o_2 < n_in)
    m_3 = (o_3 < BT) & (o_3 < n_in)
    m_4 = (o_4 < BT) & (o_4 < n_in)
    p_g = g + t0 * H + i_h
    p_gc = g_cum + t0 * H + i_h
    b_g1 = tl.load(p_g + o_1 * H, mask=m_1, other=0.0).to(tl.float32)  # [16]
    b_g2 = tl.load(p_g + o_2 * H, mask=m_2, other=0.0).to(tl.float32)
    b_g3 = tl.load(p_g + o_3 * H, mask=m_3, other=0.0).to(tl.float32)
    b_g4 = tl.load(p_g + o_4 * H, mask=m_4, other=0.0).to(tl.float32)
    b_G1 = tl.cumsum(b_g1, 0)  # [16]
    b_G2 = tl.cumsum(b_g2, 0) + tl.sum(b_g1)
    b_G3 = tl.cumsum(b_g3, 0) + tl.sum(b_g1) + tl.sum(b_g2)
    b_G4 = tl.cumsum(b_g4, 0) + tl.sum(b_g1) + tl.sum(b_g2) + tl.sum(b_g3)
    tl.store(p_gc + o_1 * H, b_G1, mask=m_1)
    tl.store(p_gc + o_2 * H, b_G2, mask=m_2)
    tl.store(p_gc + o_3 * H, b_G3, mask=m_3)
    tl.store(p_gc + o_4 * H, b_G4, mask=m_4)
    # Gram blocks k_i k_j^T (i >= j) on tensor cores, accumulated over K tiles.
    b_a11 = tl.zeros([16, 16], dtype=tl.float32)
    b_a21 = tl.zeros([16, 16], dtype=tl.float32)
    b_a22 = tl.zeros([16, 16], dtype=tl.float32)
    b_a31 = tl.zeros([16, 16], dtype=tl.float32)
    b_a32 = tl.zeros([16, 16], dtype=tl.float32)
    b_a33 = tl.zeros([16, 16], dtype=tl.float32)
    b_a41 = tl.zeros([16, 16], dtype=tl.float32)
    b_a42 = tl.zeros([16, 16], dtype=tl.float32)
    b_a43 = tl.zeros([16, 16], dtype=tl.float32)
    b_a44 = tl.zeros([16, 16], dtype=tl.float32)
    p_k = k + (t0 * H + i_h) * K
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_k1 = tl.load(p_k + o_1[:, None] * (H * K) + o_k[None, :], mask=m_1[:, None] & m_k[None, :], other=0.0)
        b_k2 = tl.load(p_k + o_2[:, None] * (H * K) + o_k[None, :], mask=m_2[:, None] & m_k[None, :], other=0.0)
        b_k3 = tl.load(p_k + o_3[:, None] * (H * K) + o_k[None, :], mask=m_3[:, None] & m_k[None, :], other=0.0)
        b_k4 = tl.load(p_k + o_4[:, None] * (H * K) + o_k[None, :], mask=m_4[:, None] & m_k[None, :], other=0.0)
        b_a11 = tl.dot(b_k1, tl.trans(b_k1), b_a11, input_precision=DOT_PRECISION)
        b_a21 = tl.dot(b_k2, tl.trans(b_k1), b_a21, input_precision=DOT_PRECISION)
        b_a22 = tl.dot(b_k2, tl.trans(b_k2), b_a22, input_precision=DOT_PRECISION)
        b_a31 = tl.dot(b_k3, tl.trans(b_k1), b_a31, input_precision=DOT_PRECISION)
        b_a32 = tl.dot(b_k3, tl.trans(b_k2), b_a32, input_precision=DOT_PRECISION)
        b_a33 = tl.dot(b_k3, tl.trans(b_k3), b_a33, input_precision=DOT_PRECISION)
        b_a41 = tl.dot(b_k4, tl.trans(b_k1), b_a41, input_precision=DOT_PRECISION)
        b_a42 = tl.dot(b_k4, tl.trans(b_k2), b_a42, input_precision=DOT_PRECISION)
        b_a43 = tl.dot(b_k4, tl.trans(b_k3), b_a43, input_precision=DOT_PRECISION)
        b_a44 = tl.dot(b_k4, tl.trans(b_k4), b_a44, input_precision=DOT_PRECISION)
    p_b = beta + t0 * H + i_h
    b_b1 = tl.load(p_b + o_1 * H, mask=m_1, other=0.0).to(tl.float32)  # [16]
    b_b2 = tl.load(p_b + o_2 * H, mask=m_2, other=0.0).to(tl.float32)
    b_b3 = tl.load(p_b + o_3 * H, mask=m_3, other=0.0).to(tl.float32)
    b_b4 = tl.load(p_b + o_4 * H, mask=m_4, other=0.0).to(tl.float32)
    # L blocks. Below the diagonal blocks G_i <= G_j (g <= 0), so exp never overflows; inside a diagonal block the
    # exponent is masked to the strict lower triangle before exp.
    m_low = o_c[:, None] > o_c[None, :]
    b_l11 = tl.where(m_low, b_a11 * b_b1[:, None] * tl.exp(tl.where(m_low, b_G1[:, None] - b_G1[None, :], 0.0)), 0.0)
    b_l22 = tl.where(m_low, b_a22 * b_b2[:, None] * tl.exp(tl.where(m_low, b_G2[:, None] - b_G2[None, :], 0.0)), 0.0)
    b_l33 = tl.where(m_low, b_a33 * b_b3[:, None] * tl.exp(tl.where(m_low, b_G3[:, None] - b_G3[None, :], 0.0)), 0.0)
    b_l44 = tl.where(m_low, b_a44 * b_b4[:, None] * tl.exp(tl.where(m_low, b_G4[:, None] - b_G4[None, :], 0.0)), 0.0)
    b_l21 = b_a21 * b_b2[:, None] * tl.exp(b_G2[:, None] - b_G1[None, :])  # [16, 16]
    b_l31 = b_a31 * b_b3[:, None] * tl.exp(b_G3[:, None] - b_G1[None, :])
    b_l32 = b_a32 * b_b3[:, None] * tl.exp(b_G3[:, None] - b_G2[None, :])
    b_l41 = b_a41 * b_b4[:, None] * tl.exp(b_G4[:, None] - b_G1[None, :])
    b_l42 = b_a42 * b_b4[:, None] * tl.exp(b_G4[:, None] - b_G2[None, :])
    b_l43 = b_a43 * b_b4[:, None] * tl.exp(b_G4[:, None] - b_G3[None, :])
    # Diagonal blocks of the inverse, then the off-diagonal ones: X_ij = -X_ii sum_{j <= m < i} L_im X_mj.
    b_x11 = _invert_unit_lower(b_l11, o_c)
    b_x22 = _invert_unit_lower(b_l22, o_c)
    b_x33 = _invert_unit_lower(b_l33, o_c)
    b_x44 = _invert_unit_lower(b_l44, o_c)
    b_x21 = -tl.dot(b_x22, tl.dot(b_l21, b_x11, input_precision=DOT_PRECISION), input_precision=DOT_PRECISION)
    b_x32 = -tl.dot(b_x33, tl.dot(b_l32, b_x22, input_precision=DOT_PRECISION), input_precision=DOT_PRECISION)
    b_x43 = -tl.dot(b_x44, tl.dot(b_l43, b_x33, input_precision=DOT_PRECISION), input_precision=DOT_PRECISION)
    b_s31 = tl.dot(b_l31, b_x11, input_precision=DOT_PRECISION)
    b_s31 = tl.dot(b_l32, b_x21, b_s31, input_precision=DOT_PRECISION)
    b_x31 = -tl.dot(b_x33, b_s31, input_precision=DOT_PRECISION)
    b_s42 = tl.dot(b_l42, b_x22, input_precision=DOT_PRECISION)
    b_s42 = tl.dot(b_l43, b_x32, b_s42, input_precision=DOT_PRECISION)
    b_x42 = -tl.dot(b_x44, b_s42, input_precision=DOT_PRECISION)
    b_s41 = tl.dot(b_l41, b_x11, input_precision=DOT_PRECISION)
    b_s41 = tl.dot(b_l42, b_x21, b_s41, input_precision=DOT_PRECISION)
    b_s41 = tl.dot(b_l43, b_x31, b_s41, input_precision=DOT_PRECISION)
    b_x41 = -tl.dot(b_x44, b_s41, input_precision=DOT_PRECISION)
    b_0 = tl.zeros([16, 16], dtype=tl.float32)
    p_a = A + (t0 * H + i_h) * BT
    _store_block(p_a, b_x11, o_1, m_1, 0, H, BT)
    _store_block(p_a, b_0, o_1, m_1, 1, H, BT)
    _store_block(p_a, b_0, o_1, m_1, 2, H, BT)
    _store_block(p_a, b_0, o_1, m_1, 3, H, BT)
    _store_block(p_a, b_x21, o_2, m_2, 0, H, BT)
    _store_block(p_a, b_x22, o_2, m_2, 1, H, BT)
    _store_block(p_a, b_0, o_2, m_2, 2, H, BT)
    _store_block(p_a, b_0, o_2, m_2, 3, H, BT)
    _store_block(p_a, b_x31, o_3, m_3, 0, H, BT)
    _store_block(p_a, b_x32, o_3, m_3, 1, H, BT)
    _store_block(p_a, b_x33, o_3, m_3, 2, H, BT)
    _store_block(p_a, b_0, o_3, m_3, 3, H, BT)
    _store_block(p_a, b_x41, o_4, m_4, 0, H, BT)
    _store_block(p_a, b_x42, o_4, m_4, 1, H, BT)
    _store_block(p_a, b_x43, o_4, m_4, 2, H, BT)
    _store_block(p_a, b_x44, o_4, m_4, 3, H, BT)


@autotune_or_fixed(
    [triton.Config({"BK": bk, "BV": bv}, num_warps=w) for bk in (32, 64) for bv in (32, 64) for w in (2, 4)],
    key=["H", "K", "V", "BT", "DOT_PRECISION"],
    default=triton.Config({"BK": 64, "BV": 64}, num_warps=4),
)
@triton.jit
def _wu_fwd_kernel(
    k, v, beta, g_cum, A, w, u, cu_seqlens, table,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Step 2b for one (chunk, head): w = A (beta exp(G) k), u = A (beta v), K and V walked in tiles.
    i_r, i_h = tl.program_id(0), tl.program_id(1)
    i_r64 = tl.cast(i_r, tl.int64)
    i_n = tl.load(table + 2 * i_r64).to(tl.int64)
    if i_n < 0:
        return
    i_c = tl.load(table + 2 * i_r64 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    t0 = bos + i_c * BT
    # int64 only in the scalar chunk base; offsets inside the chunk are int32 tiles.
    o_i = tl.arange(0, BT)
    m_t = o_i < eos - t0
    b_A = tl.load(A + (t0 * H + i_h) * BT + o_i[:, None] * (H * BT) + o_i[None, :], mask=m_t[:, None],
                  other=0.0)  # [BT, BT]
    b_beta = tl.load(beta + t0 * H + i_h + o_i * H, mask=m_t, other=0.0).to(tl.float32)  # [BT]
    b_G = tl.load(g_cum + t0 * H + i_h + o_i * H, mask=m_t, other=0.0)  # [BT]
    b_kscale = b_beta * tl.exp(b_G)  # [BT]
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        o_tk = o_i[:, None] * (H * K) + o_k[None, :]
        b_k = tl.load(k + (t0 * H + i_h) * K + o_tk, mask=m_tk, other=0.0)  # [BT, BK]
        b_kb = (b_k * b_kscale[:, None]).to(b_A.dtype)
        b_w = tl.dot(b_A, b_kb, input_precision=DOT_PRECISION)  # [BT, BK]
        tl.store(w + (t0 * H + i_h) * K + o_tk, b_w.to(w.dtype.element_ty), mask=m_tk)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        o_tv = o_i[:, None] * (H * V) + o_v[None, :]
        b_v = tl.load(v + (t0 * H + i_h) * V + o_tv, mask=m_tv, other=0.0)  # [BT, BV]
        b_vb = (b_v * b_beta[:, None]).to(b_A.dtype)
        b_u = tl.dot(b_A, b_vb, input_precision=DOT_PRECISION)  # [BT, BV]
        tl.store(u + (t0 * H + i_h) * V + o_tv, b_u.to(u.dtype.element_ty), mask=m_tv)


@triton.jit
def _state_tile_step(p_w, p_h, b_h, b_v, o_i, m_t, o_v, m_v, i_kt: tl.constexpr, H: tl.constexpr, K: tl.constexpr,
                     V: tl.constexpr, BK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One K tile of the state pass: store the tile of the chunk-start state, accumulate w_tile S_tile into b_v."""
    o_k = i_kt * BK + tl.arange(0, BK)
    m_k = o_k < K
    tl.store(p_h + o_k[:, None] * V + o_v[None, :], b_h.to(p_h.dtype.element_ty), mask=m_k[:, None] & m_v[None, :])
    b_w = tl.load(p_w + o_i[:, None] * (H * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
    return tl.dot(b_w, b_h.to(b_w.dtype), b_v, input_precision=DOT_PRECISION)  # [BT, BV]


@triton.jit
def _state_tile_update(p_k, b_h, b_vd, b_decay, o_i, m_t, i_kt: tl.constexpr, H: tl.constexpr, K: tl.constexpr,
                       BK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One K tile of S' = exp(G_last) S + k_tile^T (exp(G_last - G) v_new)."""
    o_k = i_kt * BK + tl.arange(0, BK)
    b_k = tl.load(p_k + o_i[:, None] * (H * K) + o_k[None, :], mask=m_t[:, None] & (o_k < K)[None, :],
                  other=0.0)  # [BT, BK]
    return tl.dot(tl.trans(b_k), b_vd.to(b_k.dtype), b_h * b_decay, input_precision=DOT_PRECISION)


# The state passes' configs (forward here, reverse in triton_chunk.py with its own default). One stage by default:
# pipelining the chunk loop double-buffers the fp32 w and k tiles (spills at K = 256 in fp32).
STATE_CONFIGS = [
    triton.Config({"BV": bv}, num_warps=w, num_stages=s) for bv in (16, 32, 64) for w in (2, 4) for s in (1, 2, 3)
]
STATE_DEFAULT = triton.Config({"BV": 16}, num_warps=4, num_stages=1)


@autotune_or_fixed(STATE_CONFIGS, key=["H", "K", "V", "BT", "DOT_PRECISION"], default=STATE_DEFAULT)
@triton.jit
def _state_fwd_kernel(
    k, w, u, g_cum, h0, h, v_new, ht, cu_seqlens, chunk_offsets,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Steps 3-4 along one sequence: v_new = u - w S, S' = exp(G_last) S + (k exp(G_last - G))^T v_new; h gets S
    # before every chunk (row chunk_offsets[n] + c), ht the state after the last token. The fp32 state is split
    # into up to four [BK, BV] tiles (K <= 4 BK).
    i_v, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n64 = tl.cast(i_n, tl.int64)
    bos = tl.load(cu_seqlens + i_n64).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n64 + 1).to(tl.int64)
    n_chunks = tl.cdiv(eos - bos, BT)
    row0 = tl.load(chunk_offsets + i_n64).to(tl.int64)
    o_i = tl.arange(0, BT)
    o_b = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    # int64 only in scalar bases; tile offsets are int32.
    p_s = (i_n64 * H + i_h) * K * V
    o_s = o_b[:, None] * V + o_v[None, :]  # [BK, BV] first K tile of a state
    b_h1 = tl.zeros([BK, BV], dtype=tl.float32)
    b_h2 = tl.zeros([BK, BV], dtype=tl.float32)
    b_h3 = tl.zeros([BK, BV], dtype=tl.float32)
    b_h4 = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h1 = tl.load(h0 + p_s + o_s, mask=(o_b < K)[:, None] & m_v[None, :], other=0.0)
        if K > BK:
            b_h2 = tl.load(h0 + p_s + BK * V + o_s, mask=(o_b + BK < K)[:, None] & m_v[None, :], other=0.0)
        if K > 2 * BK:
            b_h3 = tl.load(h0 + p_s + 2 * BK * V + o_s, mask=(o_b + 2 * BK < K)[:, None] & m_v[None, :], other=0.0)
        if K > 3 * BK:
            b_h4 = tl.load(h0 + p_s + 3 * BK * V + o_s, mask=(o_b + 3 * BK < K)[:, None] & m_v[None, :], other=0.0)
    for i_c in range(0, n_chunks):
        t0 = bos + tl.cast(i_c, tl.int64) * BT
        m_t = o_i < eos - t0
        m_tv = m_t[:, None] & m_v[None, :]
        p_h = h + ((row0 + tl.cast(i_c, tl.int64)) * H + i_h) * K * V
        p_w = w + (t0 * H + i_h) * K
        o_tv = o_i[:, None] * (H * V) + o_v[None, :]
        b_v = -tl.load(u + (t0 * H + i_h) * V + o_tv, mask=m_tv, other=0.0).to(tl.float32)  # [BT, BV]: w S - u
        b_v = _state_tile_step(p_w, p_h, b_h1, b_v, o_i, m_t, o_v, m_v, 0, H, K, V, BK, DOT_PRECISION)
        if K > BK:
            b_v = _state_tile_step(p_w, p_h, b_h2, b_v, o_i, m_t, o_v, m_v, 1, H, K, V, BK, DOT_PRECISION)
        if K > 2 * BK:
            b_v = _state_tile_step(p_w, p_h, b_h3, b_v, o_i, m_t, o_v, m_v, 2, H, K, V, BK, DOT_PRECISION)
        if K > 3 * BK:
            b_v = _state_tile_step(p_w, p_h, b_h4, b_v, o_i, m_t, o_v, m_v, 3, H, K, V, BK, DOT_PRECISION)
        b_v = -b_v
        tl.store(v_new + (t0 * H + i_h) * V + o_tv, b_v.to(v_new.dtype.element_ty), mask=m_tv)
        i_last = tl.minimum(t0 + BT, eos) - 1
        b_gl = tl.load(g_cum + i_last * H + i_h)
        b_G = tl.load(g_cum + t0 * H + i_h + o_i * H, mask=m_t, other=0.0)  # [BT]
        # Padded rows have k = 0; where() keeps exp of their (meaningless) G out of the product.
        b_vd = b_v * tl.where(m_t, tl.exp(b_gl - b_G), 0.0)[:, None]  # [BT, BV]
        b_decay = tl.exp(b_gl)
        p_k = k + (t0 * H + i_h) * K
        b_h1 = _state_tile_update(p_k, b_h1, b_vd, b_decay, o_i, m_t, 0, H, K, BK, DOT_PRECISION)
        if K > BK:
            b_h2 = _state_tile_update(p_k, b_h2, b_vd, b_decay, o_i, m_t, 1, H, K, BK, DOT_PRECISION)
        if K > 2 * BK:
            b_h3 = _state_tile_update(p_k, b_h3, b_vd, b_decay, o_i, m_t, 2, H, K, BK, DOT_PRECISION)
        if K > 3 * BK:
            b_h4 = _state_tile_update(p_k, b_h4, b_vd, b_decay, o_i, m_t, 3, H, K, BK, DOT_PRECISION)
    tl.store(ht + p_s + o_s, b_h1, mask=(o_b < K)[:, None] & m_v[None, :])
    if K > BK:
        tl.store(ht + p_s + BK * V + o_s, b_h2, mask=(o_b + BK < K)[:, None] & m_v[None, :])
    if K > 2 * BK:
        tl.store(ht + p_s + 2 * BK * V + o_s, b_h3, mask=(o_b + 2 * BK < K)[:, None] & m_v[None, :])
    if K > 3 * BK:
        tl.store(ht + p_s + 3 * BK * V + o_s, b_h4, mask=(o_b + 3 * BK < K)[:, None] & m_v[None, :])


@autotune_or_fixed(
    [triton.Config({"BK": bk, "BV": bv}, num_warps=w, num_stages=s)
     for bk, bv, w in ((128, 128, 8), (64, 64, 4), (32, 32, 2)) for s in (2, 3)],
    key=["H", "K", "V", "BT", "DOT_PRECISION"],
    default=triton.Config({"BK": 64, "BV": 64}, num_warps=4, num_stages=2),
)
@triton.jit
def _output_fwd_kernel(
    q, k, v_new, h, g_cum, o, cu_seqlens, table, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Step 5 for one (V tile, chunk, head): o = scale [exp(G) (q S) + (q k^T * exp(G_i - G_j)) v_new].
    i_v, i_r, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_r64 = tl.cast(i_r, tl.int64)
    i_n = tl.load(table + 2 * i_r64).to(tl.int64)
    if i_n < 0:
        return
    i_c = tl.load(table + 2 * i_r64 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    t0 = bos + i_c * BT
    o_i = tl.arange(0, BT)
    m_t = o_i < eos - t0
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_tv = m_t[:, None] & m_v[None, :]
    # int64 only in scalar bases; tile offsets are int32.
    p_q = q + (t0 * H + i_h) * K
    p_k = k + (t0 * H + i_h) * K
    p_h = h + (i_r64 * H + i_h) * K * V
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_s = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        o_tk = o_i[:, None] * (H * K) + o_k[None, :]
        b_q = tl.load(p_q + o_tk, mask=m_t[:, None] & m_k[None, :], other=0.0)  # [BT, BK]
        b_k = tl.load(p_k + o_tk, mask=m_t[:, None] & m_k[None, :], other=0.0)  # [BT, BK]
        b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)  # [BK, BV]
        b_o = tl.dot(b_q, b_h.to(b_q.dtype), b_o, input_precision=DOT_PRECISION)
        b_s = tl.dot(b_q, tl.trans(b_k), b_s, input_precision=DOT_PRECISION)
    b_G = tl.load(g_cum + t0 * H + i_h + o_i * H, mask=m_t, other=0.0)  # [BT]
    b_diff = tl.where(o_i[:, None] >= o_i[None, :], b_G[:, None] - b_G[None, :], float("-inf"))
    b_s = b_s * tl.exp(b_diff)  # [BT, BT]
    o_tv = o_i[:, None] * (H * V) + o_v[None, :]
    b_vn = tl.load(v_new + (t0 * H + i_h) * V + o_tv, mask=m_tv, other=0.0)  # [BT, BV]
    b_o = b_o * tl.exp(b_G)[:, None]
    b_o = tl.dot(b_s.to(b_vn.dtype), b_vn, b_o, input_precision=DOT_PRECISION)
    tl.store(o + (t0 * H + i_h) * V + o_tv, (scale * b_o).to(o.dtype.element_ty), mask=m_tv)


def state_block(K: int) -> int:
    """BK of the state passes (forward and reverse): K is held in up to four [BK, BV] tiles."""
    return min(64, max(16, triton.next_power_of_2(K)))


def forward_states(k: Tensor, v: Tensor, g: Tensor, beta: Tensor, h0: Tensor | None, cu: Tensor, table: Tensor,
                   chunk_offsets: Tensor, chunk_size: int, precision: str):
    """Steps 1-4 on packed inputs ``[T, H, ...]`` of one dtype.

    Returns:
        g_cum fp32 ``[T, H]``; A ``[T, H, BT]``, w ``[T, H, K]``, u and v_new ``[T, H, V]``, h (every chunk's start
        state) ``[R, H, K, V]``, all in k's dtype; the final states ht fp32 ``[N, H, K, V]``.
    """
    T, H, K = k.shape
    V = v.shape[-1]
    n_seq, rows = cu.numel() - 1, table.shape[0]
    dev, dt = k.device, k.dtype
    g_cum = torch.empty(T, H, dtype=torch.float32, device=dev)
    A = torch.empty(T, H, chunk_size, dtype=dt, device=dev)
    _wy_solve_kernel[(rows, H)](k, g, beta, g_cum, A, cu, table, H=H, K=K, BT=chunk_size, DOT_PRECISION=precision)
    w = torch.empty(T, H, K, dtype=dt, device=dev)
    u = torch.empty(T, H, V, dtype=dt, device=dev)
    _wu_fwd_kernel[(rows, H)](k, v, beta, g_cum, A, w, u, cu, table, H=H, K=K, V=V, BT=chunk_size,
                              DOT_PRECISION=precision)
    h = torch.empty(rows, H, K, V, dtype=dt, device=dev)
    v_new = torch.empty(T, H, V, dtype=dt, device=dev)
    ht = torch.empty(n_seq, H, K, V, dtype=torch.float32, device=dev)
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), n_seq, H)
    _state_fwd_kernel[grid](
        k, w, u, g_cum, h0, h, v_new, ht, cu, chunk_offsets,
        H=H, K=K, V=V, BT=chunk_size, BK=state_block(K), USE_INITIAL_STATE=h0 is not None, DOT_PRECISION=precision,
    )
    return g_cum, A, w, u, v_new, h, ht


def forward_output(q: Tensor, k: Tensor, v_new: Tensor, h: Tensor, g_cum: Tensor, cu: Tensor, table: Tensor,
                   scale: float, chunk_size: int, precision: str, out_dtype: torch.dtype) -> Tensor:
    """Step 5: o ``[T, H, V]`` in ``out_dtype``."""
    T, H, K = q.shape
    V = v_new.shape[-1]
    o = torch.empty(T, H, V, dtype=out_dtype, device=q.device)
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), table.shape[0], H)
    _output_fwd_kernel[grid](q, k, v_new, h, g_cum, o, cu, table, scale, H=H, K=K, V=V, BT=chunk_size,
                             DOT_PRECISION=precision)
    return o
