"""Gated linear attention (GLA) ops: chunked (training, prefill) and fused-recurrent (decoding).

"Gated Linear Attention Transformers with Hardware-Efficient Training" (arXiv 2312.06635).  With a per-key
log-decay g_t <= 0 and a state S of shape [K, V]:

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T          o_t = scale * S_t^T q_t

``chunk_simple_gla`` is the scalar-decay special case (one g per head, broadcast over K).  Every op takes
flash-linear-attention's arguments and dispatches with ``resolve_impl``: "ref" runs ``reference.py`` (CPU tensors
with impl="auto" always do), "triton" the kernels in ``triton_chunk.py`` / ``triton_recurrent.py``.
"""

from __future__ import annotations

from torch import Tensor

from .. import EMPTY, dispatch
from ..utils import check_log_gate, check_recurrence_inputs, no_tokens
from .reference import chunk_gla_ref, gla_step_ref

__all__ = ["chunk_gla", "fused_recurrent_gla", "chunk_simple_gla", "chunk_gla_ref", "gla_step_ref"]

# The chunk length of every GLA op (the recurrent one switches to the chunked reference beyond it).
MAX_CHUNK = 256


def _check(op, q, k, v, g, layout, scale, initial_state, cu_seqlens, impl, chunk_size) -> tuple[str, int]:
    """Validate the inputs; return the path (``dispatch``) and the number of sequences."""
    if g is None:
        raise ValueError("g (the log-decay gate) is required")
    n_seq = check_recurrence_inputs(q, k, v, {"g": (g, layout)}, initial_state, cu_seqlens)
    check_log_gate(g)
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return dispatch(op, impl, q, tokens=q.shape[1], chunk_size=chunk_size, max_chunk=MAX_CHUNK), n_seq


def chunk_gla(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float | None = None, initial_state: Tensor | None = None,
    output_final_state: bool = False, cu_seqlens: Tensor | None = None, *, impl: str = "auto", chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Chunked gated linear attention (training and prefill).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``, one dtype (fp32/fp16/bf16); any T.
        g: per-key log-decay ``[B, T, H, K]`` (<= 0), any floating dtype.
        scale: query scale, defaults to ``K ** -0.5``.
        initial_state: fp32 ``[N, H, K, V]`` or None (zeros).
        output_final_state: also return the fp32 final state ``[N, H, K, V]``.
        cu_seqlens: ``[N+1]`` int offsets of packed sequences (then B == 1); empty sequences are allowed and keep
            their initial state.
        impl: "auto" | "triton" | "ref" (see ``memzoo.kernels.resolve_impl``).
        chunk_size: a power of two in [16, 256].

    Returns:
        ``(o, final_state)``: o ``[B, T, H, V]`` in q's dtype; final_state None unless ``output_final_state``.
    """
    path, n_seq = _check("chunk_gla", q, k, v, g, "BTHK", scale, initial_state, cu_seqlens, impl, chunk_size)
    if path == EMPTY:
        return no_tokens(q, k, v, (g,), initial_state, output_final_state, n_seq)
    if path == "ref":
        return chunk_gla_ref(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size)
    from .triton_chunk import chunk_gla_triton

    return chunk_gla_triton(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size)


def fused_recurrent_gla(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float | None = None, initial_state: Tensor | None = None,
    output_final_state: bool = False, cu_seqlens: Tensor | None = None, *, impl: str = "auto", chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Token-by-token gated linear attention for decoding and short prompts; arguments as ``chunk_gla``.

    The Triton path has no backward (it raises when an input requires grad: train with ``chunk_gla``).  The
    reference path is autograd-able: the step loop for ``T <= chunk_size``, the chunked reference beyond.
    """
    path, n_seq = _check("fused_recurrent_gla", q, k, v, g, "BTHK", scale, initial_state, cu_seqlens, impl,
                         chunk_size)
    if path == EMPTY:
        return no_tokens(q, k, v, (g,), initial_state, output_final_state, n_seq)
    if path == "ref":
        ref = gla_step_ref if q.shape[1] <= chunk_size else chunk_gla_ref
        return ref(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    from .triton_recurrent import fused_recurrent_gla_triton

    return fused_recurrent_gla_triton(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def chunk_simple_gla(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float | None = None, initial_state: Tensor | None = None,
    output_final_state: bool = False, cu_seqlens: Tensor | None = None, *, impl: str = "auto", chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """``chunk_gla`` with one log-decay per head, ``g: [B, T, H]``, broadcast over the key dimension."""
    path, n_seq = _check("chunk_simple_gla", q, k, v, g, "BTH", scale, initial_state, cu_seqlens, impl, chunk_size)
    if path == EMPTY:
        return no_tokens(q, k, v, (g,), initial_state, output_final_state, n_seq)
    g_k = g.unsqueeze(-1).expand(*g.shape, q.shape[-1])
    if path == "ref":
        return chunk_gla_ref(q, k, v, g_k, scale, initial_state, output_final_state, cu_seqlens, chunk_size)
    from .triton_chunk import chunk_gla_triton

    return chunk_gla_triton(
        q, k, v, g_k.contiguous(), scale, initial_state, output_final_state, cu_seqlens, chunk_size
    )
