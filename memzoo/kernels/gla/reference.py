"""Gated linear attention (GLA) in plain PyTorch: the specification and the fast CPU path.

"Gated Linear Attention Transformers with Hardware-Efficient Training" (arXiv 2312.06635).  With a
per-key log-decay g_t <= 0 and a state S of shape [K, V]:

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T          o_t = scale * S_t^T q_t

``gla_step_ref`` is that loop, one token at a time.  ``chunk_gla_ref`` is the chunked form: with the
chunk-local cumulative gate b_t = g_1 + ... + g_t and the chunk-start state h,

    o_t = scale * [ (q_t * exp(b_t))^T h + sum_{j <= t} A_tj v_j ],   A_tj = sum_k q_tk k_jk exp(b_tk - b_jk)
    h'  = diag(exp(b_C)) h + sum_j (k_j * exp(b_C - b_j)) v_j^T

A is built by nested sub-chunks so that no exponent is ever positive: between different sub-blocks the gates are
re-based to the first row n of the later sub-block (q_t exp(b_t - b_n) and k_j exp(b_n - b_j), both <= 1), and
inside the smallest sub-blocks every exp(b_t - b_j) with j <= t is formed elementwise.  Imports no Triton.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils import seq_boundaries

__all__ = ["gla_step_ref", "chunk_gla_ref"]

# Nested sub-chunk sizes of the intra-chunk attention; the smallest is formed elementwise ([s, s, K] per block).
_SUB_CHUNKS = (16, 4)


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def gla_step_ref(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float | None = None, initial_state: Tensor | None = None,
    output_final_state: bool = False, cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The GLA recurrence token by token (slow; the specification the other paths are tested against).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; g: per-key log-decay ``[B, T, H, K]`` (<= 0).
        scale: defaults to ``K ** -0.5``.
        initial_state: fp32 ``[N, H, K, V]`` or None (zeros).
        cu_seqlens: ``[N+1]`` offsets of packed sequences (B == 1), or None (N = B).

    Returns:
        o ``[B, T, H, V]`` in q's dtype, and the fp32 final state ``[N, H, K, V]`` (None unless asked).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    dt = _acc_dtype(q)
    if cu_seqlens is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        bounds = cu_seqlens.tolist()
        spans = [(0, bounds[n], bounds[n + 1]) for n in range(len(bounds) - 1)]
    outs, finals = [], []
    for n, (b, start, end) in enumerate(spans):
        S = q.new_zeros(H, K, V, dtype=dt) if initial_state is None else initial_state[n].to(dt)  # [H, K, V]
        for t in range(start, end):
            decay = g[b, t].to(dt).exp()  # [H, K]
            S = decay[..., None] * S + k[b, t].to(dt)[..., None] * v[b, t].to(dt)[:, None, :]
            outs.append(scale * torch.einsum("hkv,hk->hv", S, q[b, t].to(dt)))  # [H, V]
        finals.append(S)
    o = torch.stack(outs).reshape(B, T, H, V) if outs else q.new_zeros(B, T, H, V, dtype=dt)
    final = torch.stack(finals).float() if output_final_state else None
    return o.to(q.dtype), final


def _intra_chunk(q: Tensor, k: Tensor, v: Tensor, b: Tensor) -> Tensor:
    """sum_{j <= t} A_tj v_j inside each chunk, with re-based exponents.

    Args:
        q, k, b: ``[..., C, K]`` (b the chunk-local cumulative log-gate); v: ``[..., C, V]``.
    """
    C = q.shape[-2]
    o = torch.zeros_like(v)
    size = C
    for s in _SUB_CHUNKS:
        if s >= size or size % s:
            continue
        m = size // s
        blocks = (C // size, m, s)
        qb, kb, bb, vb = (x.unflatten(-2, blocks) for x in (q, k, b, v))  # [..., C/size, m, s, D]
        anchor = bb[..., :1, :]  # [..., C/size, m, 1, K] first row of each sub-block
        q_rb = qb * torch.exp(bb - anchor)
        # k_J re-based to the anchor of a later sub-block I > J; pairs with J >= I are masked to exp(-inf) = 0.
        diff = anchor.unsqueeze(-3) - bb.unsqueeze(-4)  # [..., C/size, m(I), m(J), s, K]
        later = torch.ones(m, m, dtype=torch.bool, device=q.device).tril(-1)[:, :, None, None]
        k_rb = kb.unsqueeze(-4) * torch.exp(diff.masked_fill(~later, float("-inf")))
        A = q_rb.unsqueeze(-3) @ k_rb.transpose(-1, -2)  # [..., C/size, m, m, s, s]
        o = o + torch.einsum("...ijts,...jsv->...itv", A, vb).reshape(o.shape)
        size = s
    blocks = (C // size, size)
    qb, kb, bb, vb = (x.unflatten(-2, blocks) for x in (q, k, b, v))  # [..., C/size, size, D]
    diff = bb.unsqueeze(-2) - bb.unsqueeze(-3)  # [..., C/size, t, j, K]
    causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()[:, :, None]
    kd = kb.unsqueeze(-3) * torch.exp(diff.masked_fill(~causal, float("-inf")))  # [..., C/size, t, j, K]
    A = (kd @ qb.unsqueeze(-1)).squeeze(-1)  # [..., C/size, t, j]
    return o + (A @ vb).reshape(o.shape)


def _unpack(xs: list[Tensor], cu_seqlens: Tensor) -> tuple[list[Tensor], tuple[Tensor, Tensor]]:
    """Packed ``[1, T, ...]`` -> padded ``[N, T_max, ...]`` (zeros: g = 0, k = v = 0 is an exact identity step)."""
    T = xs[0].shape[1]
    n_seq = cu_seqlens.numel() - 1
    seq, pos = seq_boundaries(cu_seqlens, T)
    t_max = max(int((cu_seqlens[1:] - cu_seqlens[:-1]).max()), 1)
    padded = [x.new_zeros(n_seq, t_max, *x.shape[2:]).index_put((seq, pos), x[0]) for x in xs]
    return padded, (seq, pos)


def chunk_gla_ref(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float | None = None, initial_state: Tensor | None = None,
    output_final_state: bool = False, cu_seqlens: Tensor | None = None, chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """The chunked GLA forward, batched over every chunk of every sequence; same arguments and
    results as ``gla_step_ref``.  Autograd through it keeps one state per chunk, not per token."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    dt = _acc_dtype(q)
    xs = [x.to(dt) for x in (q, k, v, g)]
    index = None
    if cu_seqlens is not None:
        xs, index = _unpack(xs, cu_seqlens)
    N, Tp = xs[0].shape[:2]
    C = chunk_size
    NT = max(-(-Tp // C), 1)
    # Zero padding to whole chunks is an exact identity update (g = 0, k = v = 0) and leaves the final state alone.
    xs = [F.pad(x, (0, 0, 0, 0, 0, NT * C - Tp)).unflatten(1, (NT, C)).permute(0, 3, 1, 2, 4) for x in xs]
    qc, kc, vc, gc = xs  # [N, H, NT, C, D]
    b = gc.cumsum(-2)  # [N, H, NT, C, K]
    b_last = b[..., -1, :]  # [N, H, NT, K]
    o_intra = _intra_chunk(qc, kc, vc, b)  # [N, H, NT, C, V]
    k_dec = kc * torch.exp(b_last.unsqueeze(-2) - b)
    updates = k_dec.transpose(-1, -2) @ vc  # [N, H, NT, K, V]
    decay = torch.exp(b_last).unsqueeze(-1)  # [N, H, NT, K, 1]
    h = q.new_zeros(N, H, K, V, dtype=dt) if initial_state is None else initial_state.to(dt)
    starts = []
    for n in range(NT):
        starts.append(h)
        h = decay[:, :, n] * h + updates[:, :, n]
    h_start = torch.stack(starts, dim=2)  # [N, H, NT, K, V]
    o = scale * ((qc * torch.exp(b)) @ h_start + o_intra)  # [N, H, NT, C, V]
    o = o.permute(0, 2, 3, 1, 4).reshape(N, NT * C, H, V)[:, :Tp]
    if index is not None:
        o = o[index].unsqueeze(0)
    final = h.float() if output_final_state else None
    return o.to(q.dtype), final
