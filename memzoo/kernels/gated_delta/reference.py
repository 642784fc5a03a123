"""Gated delta rule in plain PyTorch: the per-step specification and the chunked CPU fast path.

Paper: "Gated Delta Networks: Improving Mamba2 with Delta Rule" (Yang, Kautz, Hatamizadeh, arXiv 2412.06464);
chunking: "Parallelizing Linear Transformers with the Delta Rule over Sequence Length" (arXiv 2406.06484).
Recurrence, state S_t [K, V], log-decay g_t <= 0, write strength beta_t in (0, 1):

    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T,      o_t = scale * S_t^T q_t

Both functions take fla-style inputs (q, k [B, T, H, K], v [B, T, H, V], g, beta [B, T, H], fp32 states
[N, H, K, V]) and are differentiable by autograd.  Packed sequences (``cu_seqlens``) are unpacked into a padded
batch whose padding (g = 0, beta = 0, q = k = v = 0) is an exact identity update, so no loop runs per sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..utils import l2norm, seq_boundaries

__all__ = ["gated_delta_rule_step_ref", "chunk_gated_delta_rule_ref", "wy_transform", "l2norm"]


def wy_transform(k: Tensor, v: Tensor, G: Tensor, beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Steps 1-2 of the chunked form for a batch of chunks (any leading dims ``...``).

    Args:
        k: ``[..., C, K]``; v: ``[..., C, V]``; G: in-chunk cumulative log-decay ``[..., C]``; beta: ``[..., C]``.

    Returns:
        decay ``[..., C, C]`` = exp(G_i - G_j) on and below the diagonal, 0 above; w ``[..., C, K]``; u ``[..., C, V]``.
    """
    C = k.shape[-2]
    causal = torch.ones(C, C, dtype=torch.bool, device=k.device).tril()
    # Mask the exponent, not the exponential: exp of the upper triangle (G_i - G_j > 0) overflows for strong
    # decays and inf * 0 would turn gradients into NaN.
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    strict = ((k @ k.transpose(-1, -2)) * decay * beta[..., :, None]).masked_fill(~causal.tril(-1), 0.0)
    lower = strict + torch.eye(C, dtype=k.dtype, device=k.device)
    rhs = torch.cat(((beta * G.exp())[..., None] * k, beta[..., None] * v), -1)
    wu = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
    return decay, wu[..., : k.shape[-1]], wu[..., k.shape[-1]:]


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _prepare(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm):
    """Cast to the accumulation dtype and unpack packed sequences into ``[N, T_max, H, D]`` (zero padded)."""
    acc = _acc_dtype(q)
    q, k, v, g, beta = (x.to(acc) for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    B, T, H, K = q.shape
    V = v.shape[-1]
    layout = None
    if cu_seqlens is not None:
        cu = cu_seqlens.to(torch.int64)
        n_seq = cu.numel() - 1
        # The reference may sync: it needs the longest sequence for the padded batch.
        t_max = int((cu[1:] - cu[:-1]).max()) if T > 0 else 0
        seq, pos = seq_boundaries(cu, T)
        layout = (seq, pos)

        def unpack(x):
            out = x.new_zeros((n_seq, t_max, *x.shape[2:]))
            out[seq, pos] = x[0]
            return out

        q, k, v, g, beta = (unpack(x) for x in (q, k, v, g, beta))
        B = n_seq
    h0 = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    return q, k, v, g, beta, float(scale), h0, layout


def _finish(o: Tensor, h: Tensor, layout, out_dtype: torch.dtype, output_final_state: bool):
    if layout is not None:
        seq, pos = layout
        o = o[seq, pos].unsqueeze(0)
    return o.to(out_dtype), (h.float() if output_final_state else None)


def gated_delta_rule_step_ref(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float | None = None,
    initial_state: Tensor | None = None, output_final_state: bool = False, cu_seqlens: Tensor | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The recurrence one token at a time: the specification every other path is tested against.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; g (log-decay, <= 0), beta: ``[B, T, H]``.
        scale: output scale, default ``K ** -0.5``.
        initial_state: fp32 ``[N, H, K, V]`` or None (zeros).
        output_final_state: return the state after the last token.
        cu_seqlens: ``[N + 1]`` offsets of packed sequences (then B == 1).
        use_qk_l2norm: L2-normalise q and k over K first (eps 1e-6).

    Returns:
        o ``[B, T, H, V]`` in q's dtype, and the fp32 final state ``[N, H, K, V]`` or None.
    """
    out_dtype = q.dtype
    q, k, v, g, beta, scale, h, layout = _prepare(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm)
    outs = []
    for t in range(q.shape[1]):
        decay = g[:, t].exp()[..., None, None]  # [B, H, 1, 1]
        k_t, v_t, b_t = k[:, t], v[:, t], beta[:, t, :, None]  # [B, H, K], [B, H, V], [B, H, 1]
        h = decay * h
        # The delta rule: move the value stored under k_t towards v_t by a step of beta_t.
        err = v_t - torch.einsum("bhkv,bhk->bhv", h, k_t)  # [B, H, V]
        h = h + torch.einsum("bhk,bhv->bhkv", k_t, b_t * err)
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", h, q[:, t]))
    o = torch.stack(outs, 1) if outs else v.new_zeros(v.shape)
    return _finish(o, h, layout, out_dtype, output_final_state)


def chunk_gated_delta_rule_ref(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float | None = None,
    initial_state: Tensor | None = None, output_final_state: bool = False, cu_seqlens: Tensor | None = None,
    use_qk_l2norm: bool = False, chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """The chunked (WY / UT transform) form: all chunks at once, then one short loop over chunks for the states.

    Same arguments and returns as ``gated_delta_rule_step_ref``, plus ``chunk_size`` (any positive int).
    Inside a chunk with start state S and in-chunk cumulative log-decay G_i (G resets every chunk):

        1. A = (I + strict_tril(diag(beta) (K K^T) * exp(G_i - G_j)))^-1
        2. W = A diag(beta exp(G)) K,  U = A diag(beta) V
        3. D = U - W S                                  (the corrected values written by the chunk)
        4. S' = exp(G_last) S + (K * exp(G_last - G))^T D
        5. O = scale [exp(G) * (Q S) + tril(Q K^T * exp(G_i - G_j)) D]

    Every exponent is a difference G_i - G_j with i >= j (or G_i itself, measured from the chunk start), so
    strong decays cannot overflow.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    out_dtype = q.dtype
    q, k, v, g, beta, scale, h, layout = _prepare(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm)
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    NC = -(-T // C)
    pad = NC * C - T

    def chunked(x):
        # [B, T, H, ...] -> [B, H, NC, C, ...], zero padded (an identity update, see the module docstring).
        x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 3) + (0, 0, 0, pad))
        return x.reshape(B, NC, C, H, *x.shape[3:]).transpose(1, 3).transpose(2, 3)

    q, k, v = chunked(q), chunked(k), chunked(v)  # [B, H, NC, C, D]
    beta = chunked(beta)  # [B, H, NC, C]
    G = chunked(g).cumsum(-1)  # [B, H, NC, C]
    decay, w, u = wy_transform(k, v, G, beta)
    g_last = G[..., -1]  # [B, H, NC]
    k_tail = k * (g_last[..., None] - G).exp()[..., None]  # [B, H, NC, C, K]
    starts = []
    # unbind, not indexing per chunk: the backward of one select per chunk would zero-fill a full-size
    # gradient every chunk (quadratic in the number of chunks).
    steps = zip(u.unbind(2), w.unbind(2), k_tail.transpose(-1, -2).unbind(2), g_last.exp().unbind(2))
    for u_c, w_c, kt_c, gl_c in steps:
        starts.append(h)
        h = gl_c[..., None, None] * h + kt_c @ (u_c - w_c @ h)  # [B, H, K, V]
    if NC == 0:
        o = v.new_zeros(B, H, 0, C, V)
    else:
        s = torch.stack(starts, 2)  # [B, H, NC, K, V]
        d = u - w @ s
        o = scale * (G.exp()[..., None] * (q @ s) + ((q @ k.transpose(-1, -2)) * decay) @ d)
    o = o.permute(0, 2, 3, 1, 4).reshape(B, NC * C, H, V)[:, :T]
    return _finish(o, h, layout, out_dtype, output_final_state)
