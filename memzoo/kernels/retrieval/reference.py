"""Exact chunk top-k retrieval in plain PyTorch: the specification and the tiled production path.

LongMem ("Augmenting Language Models with Long-Term Memory", arXiv 2306.07174) retrieves, per query and head, the
chunks of the memory bank whose key (the mean of the chunk's token keys) has the largest inner product with the
query:

    s[t, n] = q_t . kc_n  (fp32, unscaled)        top-k over the valid n, by (s desc, stamp desc)

Ties in score go to the larger write stamp (the most recent chunk), then to the larger index, so the result is a
deterministic function of the inputs.  Missing entries (fewer than k valid chunks) are idx = -1, score = -inf.

``chunk_topk_naive`` is the specification: the whole [T, N] score matrix and stable sorts.  ``chunk_topk_tiled``
streams tiles of chunk keys and keeps a running top-k per query; it orders candidates by one int64 key per
(query, chunk) that encodes the whole order (see ``README.md``), so ``torch.topk`` alone implements the tie rule.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["chunk_topk_naive", "chunk_topk_tiled", "chunk_priority", "KEY_MIN"]

# The key of a missing candidate (invalid chunk, padding): below every real key, whose low half is >= 1.
KEY_MIN = -(2**63)
_LOW = 0xFFFFFFFF
_NO_SIGN = 0x7FFFFFFF


def chunk_priority(stamp: Tensor | None, valid: Tensor | None, batch: int, n: int, device: torch.device
                   ) -> tuple[Tensor, Tensor]:
    """Rank the chunks of each row by recency, the tie-break order.

    Args:
        stamp: int64 ``[B, N]`` write stamps (larger = newer) or None (index order).
        valid: bool ``[B, N]`` or None (all valid).

    Returns:
        ``prio`` int64 ``[B, N]``: N - rank for a valid chunk (the newest chunk, rank 0, gets N; the larger index
        wins among equal stamps), 0 for an invalid one; ``order`` int64 ``[B, N]``: the chunk index of each rank.
    """
    if stamp is None:
        order = torch.arange(n - 1, -1, -1, device=device).expand(batch, n)
        prio = torch.arange(1, n + 1, device=device).expand(batch, n)
    else:
        # A stable descending sort of the reversed row puts equal stamps in descending index order.
        pos = torch.argsort(stamp.flip(-1), dim=-1, descending=True, stable=True)
        order = n - 1 - pos  # [B, N]
        rank = torch.zeros_like(order).scatter_(1, order, torch.arange(n, device=device).expand(batch, n))
        prio = n - rank
    if valid is not None:
        prio = torch.where(valid, prio, 0)
    return prio, order


def score_keys(s: Tensor, prio: Tensor) -> Tensor:
    """One int64 per candidate whose integer order is (score, recency) order: the score's fp32 bits mapped to a
    monotone int32 (sign-magnitude to two's complement) in the high half, ``prio`` in the low half.

    Args:
        s: fp32 scores ``[..., n]``; prio: int64 broadcastable to ``s`` (0 marks a missing candidate).
    """
    # -0.0 and +0.0 compare equal as floats: give them one bit pattern so they tie as well.
    s = torch.where(s == 0, 0.0, s)
    bits = s.view(torch.int32)
    bits = bits ^ ((bits >> 31) & _NO_SIGN)
    key = (bits.to(torch.int64) << 32) | prio
    return torch.where(prio > 0, key, KEY_MIN)


def decode_keys(key: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:
    """Invert ``score_keys``: int64 ``[B, H, T, k]`` keys -> (fp32 scores, int64 chunk indices), -inf/-1 if missing."""
    B, H, T, k = key.shape
    n = order.shape[-1]
    found = key != KEY_MIN
    hi = (key >> 32).to(torch.int32)
    scores = (hi ^ ((hi >> 31) & _NO_SIGN)).view(torch.float32)
    rank = (n - (key & _LOW)).clamp(0, max(n - 1, 0))
    if n == 0:
        idx = torch.full_like(key, -1)
    else:
        idx = torch.gather(order[:, None, None, :].expand(B, H, T, n), -1, rank)
    scores = torch.where(found, scores, float("-inf"))
    return scores, torch.where(found, idx, -1)


@torch.no_grad()
def chunk_topk_naive(q: Tensor, keys: Tensor, k: int, *, valid: Tensor | None = None, stamp: Tensor | None = None
                     ) -> tuple[Tensor, Tensor]:
    """The specification: every score, then stable sorts by index, stamp, score and validity (last key first).

    Args:
        q: ``[B, H, T, d]``; keys: chunk keys ``[B, H, N, d]``; k: entries per query (>= 1).
        valid: bool ``[B, N]`` or None; stamp: int64 ``[B, N]`` or None (index order).

    Returns:
        ``(scores, idx)``: fp32 and int64 ``[B, H, T, k]``, best first; -inf / -1 where fewer than k chunks are valid.
    """
    B, H, T, _ = q.shape
    n = keys.shape[2]
    with torch.autocast(q.device.type, enabled=False):  # fp32 scores even inside an autocast region
        s = torch.matmul(q.detach().float(), keys.detach().float().transpose(-1, -2))  # [B, H, T, N]
    s = torch.where(s == 0, 0.0, s)
    if stamp is None:
        stamp = torch.arange(n, device=q.device).expand(B, n)
    if valid is None:
        valid = torch.ones(B, n, dtype=torch.bool, device=q.device)
    shape = (B, H, T, n)
    perm = torch.arange(n - 1, -1, -1, device=q.device).expand(shape)
    for key in (stamp[:, None, None, :].expand(shape), s, valid[:, None, None, :].expand(shape).to(torch.int8)):
        order = torch.sort(torch.gather(key, -1, perm), dim=-1, descending=True, stable=True).indices
        perm = torch.gather(perm, -1, order)
    perm = perm[..., :k]
    ok = torch.gather(valid[:, None, None, :].expand(shape), -1, perm)
    scores = torch.where(ok, torch.gather(s, -1, perm), float("-inf"))
    idx = torch.where(ok, perm, -1)
    if perm.shape[-1] < k:
        pad = k - perm.shape[-1]
        scores = torch.cat([scores, scores.new_full((B, H, T, pad), float("-inf"))], -1)
        idx = torch.cat([idx, idx.new_full((B, H, T, pad), -1)], -1)
    return scores, idx


@torch.no_grad()
def chunk_topk_tiled(q: Tensor, keys: Tensor, k: int, *, valid: Tensor | None = None, stamp: Tensor | None = None,
                     block_n: int | None = None, block_t: int | None = None) -> tuple[Tensor, Tensor]:
    """Streaming top-k over tiles of ``block_n`` chunk keys (and ``block_t`` queries), equal to ``chunk_topk_naive``.

    Per tile: fp32 scores and a float ``torch.topk`` of k + 1.  Where the (k+1)-th score is below the k-th, the
    row's k best are one set, and only they become order keys (``score_keys``); a row with a tie across that
    boundary turns all its tile scores into keys.  The tile's k keys merge with the running top-k by one
    ``torch.topk`` over 2k int64 keys.  Extra memory is O(B H block_t (k + block_n)); the [T, N] score matrix never
    exists.

    Args:
        q, keys, k, valid, stamp: as ``chunk_topk_naive``.
        block_n: chunk keys per tile (default 4096).
        block_t: queries per tile (default: as many as keep a tile under 2^22 scores).

    Returns:
        ``(scores, idx)`` fp32 / int64 ``[B, H, T, k]``.
    """
    B, H, T, _ = q.shape
    n = keys.shape[2]
    block_n = min(block_n or 4096, max(n, 1))
    block_t = block_t or max(1, min(T, 2**22 // (B * H * block_n)))
    prio, order = chunk_priority(stamp, valid, B, n, q.device)
    q, keys = q.detach(), keys.detach()
    if T == 0:
        return q.new_empty(B, H, 0, k, dtype=torch.float32), q.new_empty(B, H, 0, k, dtype=torch.int64)
    compiling = torch.compiler.is_compiling()
    out = []
    for t0 in range(0, T, block_t):
        q_blk = q[:, :, t0:t0 + block_t].float()  # [B, H, bt, d]
        top = torch.full((*q_blk.shape[:3], 0), KEY_MIN, dtype=torch.int64, device=q.device)
        for n0 in range(0, n, block_n):
            # fp32 scores even inside an autocast region (a bf16 product would round ranks away and break score_keys).
            with torch.autocast(q.device.type, enabled=False):
                s = torch.matmul(q_blk, keys[:, :, n0:n0 + block_n].float().transpose(-1, -2))  # [B, H, bt, bn]
            p = prio[:, None, None, n0:n0 + block_n].expand(s.shape)  # [B, H, bt, bn]
            if valid is not None:
                s.masked_fill_(p == 0, float("-inf"))
            kk = min(k, s.shape[-1])
            if compiling:
                # Data-dependent row selection does not trace: every tile takes the general form.
                cand = torch.topk(score_keys(s, p), kk, dim=-1).values
            else:
                vals, pos = torch.topk(s, min(k + 1, s.shape[-1]), dim=-1)  # [B, H, bt, k + 1]
                cand = score_keys(vals[..., :kk], torch.gather(p, -1, pos[..., :kk]))  # [B, H, bt, kk]
                # The float top-k takes an arbitrary subset of the scores equal to the k-th, so a row's k best are one
                # set only if its (k+1)-th score is strictly smaller (this also rejects a -inf boundary, where valid
                # and invalid chunks mix, and -0.0 against +0.0).  The few other rows order all their keys.
                if vals.shape[-1] > k:
                    rows = (~(vals[..., k] < vals[..., k - 1])).flatten().nonzero().flatten()
                    if rows.numel():
                        p_rows = prio[rows // (H * s.shape[2]), n0:n0 + block_n]  # [rows, bn]
                        keys_rows = score_keys(s.reshape(-1, s.shape[-1])[rows], p_rows)
                        cand.view(-1, kk)[rows] = torch.topk(keys_rows, kk, dim=-1).values
            cand = torch.cat([top, cand], -1)
            top = torch.topk(cand, min(k, cand.shape[-1]), dim=-1).values
        if top.shape[-1] < k:
            top = torch.cat([top, top.new_full((*top.shape[:3], k - top.shape[-1]), KEY_MIN)], -1)
        out.append(top)
    return decode_keys(torch.cat(out, 2), order)
