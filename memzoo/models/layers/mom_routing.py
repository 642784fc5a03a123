"""Routing helpers of the Mixture-of-Memories layer (``mom.py``): the top-k router, the counting sort
that packs tokens into (memory, sequence) segments, and the router's auxiliary losses.

Everything is vectorised and free of host synchronisation: segment sizes stay on the device, the
packed length is static (every token contributes exactly ``k`` routed slots plus one shared slot).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["RoutePlan", "route", "plan_segments", "balance_loss", "z_loss"]


class RoutePlan(NamedTuple):
    pos: Tensor  # [L, S] packed position of each (token, slot); slot k (when present) is the shared memory
    src: Tensor  # [L * S] token of each packed position
    mem: Tensor  # [L * S] memory of each packed position
    cu_seqlens: Tensor  # [Mt * N + 1] int64 offsets of the segments, memory-major: segment m * N + n


def route(logits: Tensor, topk: int) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 softmax over memories, top-k, weights renormalised over the chosen k.

    Args:
        logits: ``[L, M]`` router logits (any float dtype; the softmax runs in fp32).

    Returns:
        ``probs [L, M]`` fp32, ``weights [L, k]`` fp32, ``idx [L, k]`` int64.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    top, idx = probs.topk(topk, dim=-1)
    return probs, top / top.sum(-1, keepdim=True), idx


def plan_segments(sel: Tensor, seq: Tensor, cu_seqlens: Tensor, n_mem: int) -> RoutePlan:
    """Counting sort of (token, memory) pairs into segments keyed ``m * N + n``, time order kept inside each.

    Args:
        sel: ``[L, S]`` int64 memories of each token (distinct per row; the shared memory included as a column).
        seq: ``[L]`` sequence of each token.
        cu_seqlens: ``[N + 1]`` token offsets of the N sequences (empty ones allowed).
        n_mem: Mt, the number of memories including the shared one.

    Returns:
        A ``RoutePlan``; empty segments are kept (their offsets repeat), so the plan has a static shape.
    """
    L, S = sel.shape
    n_seq = cu_seqlens.numel() - 1
    hit = torch.zeros(L, n_mem, dtype=torch.int64, device=sel.device).scatter_(1, sel, 1)  # [L, Mt]
    # Pairs of memory m before token t in the flat stream, minus those before t's sequence start = rank in segment.
    before = hit.cumsum(0) - hit  # [L, Mt]
    starts = cu_seqlens[:-1].to(torch.int64).clamp(max=max(L - 1, 0))
    rank = before - before[starts][seq]  # [L, Mt]
    key = sel * n_seq + seq[:, None]  # [L, S]
    counts = torch.zeros(n_mem * n_seq, dtype=torch.int64, device=sel.device)
    counts.index_add_(0, key.flatten(), torch.ones_like(key.flatten()))
    ends = counts.cumsum(0)
    pos = (ends - counts)[key] + rank.gather(1, sel)  # [L, S]
    tokens = torch.arange(L, device=sel.device).repeat_interleave(S)
    src = torch.empty_like(tokens).scatter_(0, pos.flatten(), tokens)
    mem = torch.empty_like(tokens).scatter_(0, pos.flatten(), sel.flatten())
    return RoutePlan(pos, src, mem, F.pad(ends, (1, 0)))


def balance_loss(probs: Tensor, idx: Tensor) -> Tensor:
    """Switch-Transformer load balance for one layer: ``M * sum_m load_m * P_m``.

    ``load_m`` is the fraction of tokens that chose memory m in any of their k slots (fla's per-slot
    fractions summed over slots) and ``P_m`` the mean router probability.  Uniform routing gives k,
    the minimum over balanced assignments.
    """
    M = probs.shape[-1]
    return M * (memory_load(idx, M) * probs.mean(0)).sum()


def memory_load(idx: Tensor, n_memories: int) -> Tensor:
    """Fraction of tokens routed to each memory, ``[M]`` fp32 (sums to k)."""
    hit = torch.zeros(idx.shape[0], n_memories, device=idx.device).scatter_(1, idx, 1.0)
    return hit.mean(0)


def z_loss(logits: Tensor) -> Tensor:
    """Router z-loss (ST-MoE): ``mean(logsumexp(logits)^2)``, keeping the logits small."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()
