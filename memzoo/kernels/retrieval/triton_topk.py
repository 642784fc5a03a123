"""Exact chunk top-k in Triton: a streaming block-top-k that never writes the [T, N] score matrix.

LongMem ("Augmenting Language Models with Long-Term Memory", arXiv 2306.07174) retrieval: per query, the k chunk
keys with the largest q . kc, ties to the newest chunk.  One program owns BLOCK_T queries of one (batch, head):

    1. score a tile of BLOCK_N chunk keys with one tl.dot (fp32 accumulate);
    2. turn each score into an int64 order key: high half = the fp32 bits mapped to a monotone int32, low half =
       the chunk's recency priority (N - rank, 0 for invalid chunks), so one integer comparison is the whole
       (score desc, stamp desc, index desc) order and keys are unique per query;
    3. merge the tile into a running top-KP held in registers: repeatedly move the tile's largest key into the slot
       of the running minimum while it beats it (only as many rounds as the best row needs);
    4. after the last tile, sort the running keys by k max-extractions and decode them into (score, chunk index).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_utils import INTERPRET, autotune_or_fixed
from .reference import chunk_priority

__all__ = ["chunk_topk_triton", "MAX_K"]

# The running top-k lives in registers: [BLOCK_T, next_pow2(k)] int64 per program.
MAX_K = 256

_KEY_MIN = tl.constexpr(-(2**63))
_NO_SIGN = tl.constexpr(0x7FFFFFFF)


@triton.jit
def _chunk_topk_kernel(q, keys, prio, order, scores, idx, T, N, H, K: tl.constexpr, KP: tl.constexpr,
                       D: tl.constexpr, BD: tl.constexpr, HALF_DOT: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_bh64 = tl.cast(i_bh, tl.int64)
    i_b = i_bh64 // H
    o_t = tl.cast(i_t, tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < T
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_k = tl.arange(0, KP)
    p_q = q + i_bh64 * T * D + o_t[:, None] * D + o_d[None, :]
    b_q = tl.load(p_q, mask=m_t[:, None] & m_d[None, :], other=0.0)  # [BT, BD]
    if not HALF_DOT:
        b_q = b_q.to(tl.float32)
    b_top = tl.full([BLOCK_T, KP], _KEY_MIN, tl.int64)
    for i_n in range(0, tl.cdiv(N, BLOCK_N)):
        o_n = tl.cast(i_n, tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        p_k = keys + i_bh64 * N * D + o_n[None, :] * D + o_d[:, None]
        b_k = tl.load(p_k, mask=m_d[:, None] & m_n[None, :], other=0.0)  # [BD, BN]
        # 1. Scores: half inputs of one dtype multiply exactly into the fp32 accumulator; anything else is fp32 IEEE
        # (never TF32, so the selection equals the fp32 reference).
        if HALF_DOT:
            b_s = tl.dot(b_q, b_k.to(b_q.dtype))  # [BT, BN]
        else:
            b_s = tl.dot(b_q, b_k.to(tl.float32), input_precision="ieee")  # [BT, BN]
        # 2. Order keys; -0.0 becomes +0.0 so that equal scores share one bit pattern.
        b_s = tl.where(b_s == 0.0, 0.0, b_s)
        b_bits = b_s.to(tl.int32, bitcast=True)
        b_bits = b_bits ^ ((b_bits >> 31) & _NO_SIGN)
        b_p = tl.load(prio + i_b * N + o_n, mask=m_n, other=0)  # [BN]
        b_key = (b_bits.to(tl.int64) << 32) | b_p[None, :]  # [BT, BN]
        b_key = tl.where(m_t[:, None] & (b_p[None, :] > 0), b_key, _KEY_MIN)
        # 3. Merge: a row needs at most (#tile keys above its current minimum) rounds, and at most KP.
        b_min = tl.min(b_top, axis=1)  # [BT]
        n_rounds = tl.minimum(tl.max(tl.sum((b_key > b_min[:, None]).to(tl.int32), axis=1), axis=0), KP)
        for _ in range(0, n_rounds):
            b_max = tl.max(b_key, axis=1)  # [BT]
            b_min = tl.min(b_top, axis=1)  # [BT]
            i_slot = tl.min(tl.where(b_top == b_min[:, None], o_k[None, :], KP), axis=1)  # [BT]
            m_ins = (b_max > b_min)[:, None] & (o_k[None, :] == i_slot[:, None])  # [BT, KP]
            b_top = tl.where(m_ins, b_max[:, None], b_top)
            b_key = tl.where(b_key == b_max[:, None], _KEY_MIN, b_key)
    # 4. Sort: the i-th extraction of the maximum is the i-th best key (keys of one row are unique).
    b_out = tl.full([BLOCK_T, KP], _KEY_MIN, tl.int64)
    for i_k in range(0, K):
        b_max = tl.max(b_top, axis=1)  # [BT]
        b_out = tl.where(o_k[None, :] == tl.cast(i_k, tl.int32), b_max[:, None], b_out)
        b_top = tl.where(b_top == b_max[:, None], _KEY_MIN, b_top)
    m_found = b_out != _KEY_MIN  # [BT, KP]
    b_hi = (b_out >> 32).to(tl.int32)
    b_score = (b_hi ^ ((b_hi >> 31) & _NO_SIGN)).to(tl.float32, bitcast=True)
    b_score = tl.where(m_found, b_score, float("-inf"))
    b_rank = N - (b_out - ((b_out >> 32) << 32))  # [BT, KP]
    m_out = m_t[:, None] & (o_k[None, :] < K)
    b_idx = tl.load(order + i_b * N + b_rank, mask=m_out & m_found, other=-1)  # [BT, KP]
    o_out = i_bh64 * T * K + o_t[:, None] * K + o_k[None, :]
    tl.store(scores + o_out, b_score, mask=m_out)
    tl.store(idx + o_out, b_idx, mask=m_out)


_chunk_topk_tuned = autotune_or_fixed(
    [triton.Config({"BLOCK_T": bt, "BLOCK_N": bn}, num_warps=w) for bt in (32, 64, 128) for bn in (32, 64)
     for w in (4, 8)],
    key=["KP", "D", "HALF_DOT"],
    default=triton.Config({"BLOCK_T": 32, "BLOCK_N": 32}, num_warps=4),
)(_chunk_topk_kernel)


def _launch(q: Tensor, keys: Tensor, prio: Tensor, order: Tensor, k: int, block_n: int) -> tuple[Tensor, Tensor]:
    B, H, T, D = q.shape
    N = keys.shape[2]
    scores = torch.empty(B, H, T, k, device=q.device, dtype=torch.float32)
    idx = torch.empty(B, H, T, k, device=q.device, dtype=torch.int64)
    if T == 0:
        return scores, idx
    # The interpreter's tl.dot multiplies bf16 tiles as raw bits: there it upcasts (products of halves are exact in
    # fp32 either way, so only the summation order can differ).
    half_dot = q.dtype == keys.dtype and q.dtype != torch.float32 and not (INTERPRET and q.dtype == torch.bfloat16)
    meta = {"K": k, "KP": triton.next_power_of_2(k), "D": D, "BD": max(16, triton.next_power_of_2(D)),
            "HALF_DOT": half_dot}
    args = (q, keys, prio, order, scores, idx, T, N, H)
    if block_n:
        block_t = 32 if INTERPRET else 64
        _chunk_topk_kernel[(triton.cdiv(T, block_t), B * H)](*args, **meta, BLOCK_T=block_t, BLOCK_N=block_n,
                                                             num_warps=4)
    else:
        _chunk_topk_tuned[lambda m: (triton.cdiv(T, m["BLOCK_T"]), B * H)](*args, **meta)
    return scores, idx


@torch.library.custom_op("memzoo::chunk_topk", mutates_args=())
def _chunk_topk_op(q: Tensor, keys: Tensor, prio: Tensor, order: Tensor, k: int, block_n: int) -> tuple[Tensor, Tensor]:
    """Contiguous ``q [B, H, T, d]``, ``keys [B, H, N, d]``, ``prio``/``order`` int64 ``[B, N]`` (``chunk_priority``)
    -> (fp32 scores, int64 idx) ``[B, H, T, k]``; ``block_n = 0`` autotunes the tile sizes."""
    return _launch(q, keys, prio, order, k, block_n)


@_chunk_topk_op.register_fake
def _(q, keys, prio, order, k, block_n):
    B, H, T, _ = q.shape
    return q.new_empty(B, H, T, k, dtype=torch.float32), q.new_empty(B, H, T, k, dtype=torch.int64)


def chunk_topk_triton(q: Tensor, keys: Tensor, k: int, *, valid: Tensor | None = None, stamp: Tensor | None = None,
                      block_n: int | None = None) -> tuple[Tensor, Tensor]:
    """The Triton path of ``chunk_topk`` (inputs validated by the dispatcher); ``block_n`` a power of two >= 16."""
    if k > MAX_K:
        raise ValueError(f"the Triton path keeps the running top-k in registers: k must be <= {MAX_K}, got {k} "
                         "(use impl='ref')")
    if block_n is not None and (block_n < 16 or block_n & (block_n - 1)):
        raise ValueError(f"block_n must be a power of two >= 16 on the Triton path, got {block_n}")
    B, _, _, _ = q.shape
    N = keys.shape[2]
    prio, order = chunk_priority(stamp, valid, B, N, q.device)
    return _chunk_topk_op(q.detach().contiguous(), keys.detach().contiguous(), prio.contiguous(),
                          order.contiguous(), k, block_n or 0)
