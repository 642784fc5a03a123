"""Exact chunk top-k retrieval for memory banks (LongMem-style chunk search).

"Augmenting Language Models with Long-Term Memory" (LongMem, arXiv 2306.07174).  Per query and head, the k chunks
whose key has the largest inner product with the query:

    s[t, n] = q_t . kc_n  (fp32, unscaled)        top-k over the valid n, by (s desc, stamp desc, index desc)

``impl="auto"`` runs the fused streaming kernel (``triton_topk.py``) on CUDA and the tiled PyTorch path
(``reference.chunk_topk_tiled``) elsewhere; both equal the full-matrix specification ``chunk_topk_naive`` exactly.
The selection is not differentiable: inputs are detached and the outputs carry no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import EMPTY, dispatch
from .reference import chunk_priority, chunk_topk_naive, chunk_topk_tiled

__all__ = ["chunk_topk", "chunk_topk_naive", "chunk_topk_tiled", "chunk_priority"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check(q: Tensor, keys: Tensor, k: int, valid: Tensor | None, stamp: Tensor | None, block_n: int | None) -> None:
    if not isinstance(q, Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a [B, H, T, d] tensor, got {getattr(q, 'shape', type(q).__name__)}")
    if not isinstance(keys, Tensor) or keys.dim() != 4:
        raise ValueError(f"keys must be a [B, H, N, d] tensor, got {getattr(keys, 'shape', type(keys).__name__)}")
    B, H, _, d = q.shape
    if keys.shape[:2] != (B, H) or keys.shape[3] != d:
        raise ValueError(f"keys must be [B={B}, H={H}, N, d={d}] to match q {tuple(q.shape)}, got {tuple(keys.shape)}")
    for name, x in (("q", q), ("keys", keys)):
        if x.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    n = keys.shape[2]
    if n >= 2**31:
        raise ValueError(f"keys may hold at most 2^31 - 1 chunks, got N={n}")
    for name, x, dtype in (("valid", valid, torch.bool), ("stamp", stamp, torch.int64)):
        if x is None:
            continue
        if not isinstance(x, Tensor) or x.shape != (B, n):
            raise ValueError(f"{name} must be a [B={B}, N={n}] tensor, got {getattr(x, 'shape', type(x).__name__)}")
        if x.dtype != dtype:
            raise TypeError(f"{name} must be {dtype}, got {x.dtype}")
    for name, x in (("keys", keys), ("valid", valid), ("stamp", stamp)):
        if x is not None and x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")
    if block_n is not None and (isinstance(block_n, bool) or not isinstance(block_n, int) or block_n < 1):
        raise ValueError(f"block_n must be an int >= 1 or None, got {block_n!r}")


def chunk_topk(q: Tensor, keys: Tensor, k: int, *, valid: Tensor | None = None, stamp: Tensor | None = None,
               impl: str = "auto", block_n: int | None = None) -> tuple[Tensor, Tensor]:
    """Exact top-k chunks per query by inner product, ties to the most recent chunk.

    Args:
        q: queries ``[B, H, T, d]``, fp32/fp16/bf16 (may require grad: it is detached, no gradient flows).
        keys: chunk keys ``[B, H, N, d]``, fp32/fp16/bf16 (need not match q's dtype); row b of q searches only
            row b of keys.
        k: chunks per query, >= 1 (may exceed the number of valid chunks).
        valid: bool ``[B, N]``, False for empty/evicted chunks; None = all valid.
        stamp: int64 ``[B, N]`` write stamps, larger = newer; None = index order (larger index = newer).
        impl: ``"auto"`` | ``"triton"`` | ``"ref"`` (``$MEMZOO_KERNEL_IMPL`` overrides ``"auto"``).
        block_n: chunk keys per tile (ref: default 4096; triton: a power of two >= 16, default autotuned).

    Returns:
        ``(scores, idx)``: ``scores`` fp32 ``[B, H, T, k]`` (raw q . key, products accumulated in fp32) sorted
        descending, ``idx`` int64 ``[B, H, T, k]`` chunk indices; where fewer than k chunks are valid the missing
        entries are ``idx = -1``, ``score = -inf``.  Equal scores order by larger stamp, then larger index.
    """
    _check(q, keys, k, valid, stamp, block_n)
    path = dispatch("chunk_topk", impl, q, tokens=q.shape[2])
    if path == EMPTY:
        B, H, T, _ = q.shape
        return (q.new_full((B, H, T, k), float("-inf"), dtype=torch.float32),
                q.new_full((B, H, T, k), -1, dtype=torch.int64))
    if path == "ref":
        return chunk_topk_tiled(q, keys, k, valid=valid, stamp=stamp, block_n=block_n)
    from .triton_topk import chunk_topk_triton

    return chunk_topk_triton(q, keys, k, valid=valid, stamp=stamp, block_n=block_n)
