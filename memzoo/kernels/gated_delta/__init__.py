"""Gated delta rule ops: ``chunk_gated_delta_rule`` (training, prefill) and ``fused_recurrent_gated_delta_rule``
(decoding, short prompts), each dispatching between the PyTorch reference and Triton kernels.

Paper: "Gated Delta Networks: Improving Mamba2 with Delta Rule" (arXiv 2412.06464).  Recurrence, state S [K, V]:

    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T,      o_t = scale * S_t^T q_t

``impl="auto"`` picks Triton for CUDA inputs and the reference otherwise (CPU always gets the reference).
"""

from __future__ import annotations

from torch import Tensor

from .. import EMPTY, dispatch
from ..utils import check_log_gate, check_recurrence_inputs, no_tokens, resolve_dot_precision
from .reference import chunk_gated_delta_rule_ref, gated_delta_rule_step_ref

__all__ = [
    "chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule", "chunk_gated_delta_rule_ref",
    "gated_delta_rule_step_ref",
]


def _check(q, k, v, g, beta, initial_state, cu_seqlens) -> int:
    for name, x in (("g", g), ("beta", beta)):
        if x is None:
            raise ValueError(f"{name} is required: a [B, T, H] tensor")
    n_seq = check_recurrence_inputs(q, k, v, {"g": (g, "BTH"), "beta": (beta, "BTH")}, initial_state, cu_seqlens)
    check_log_gate(g)
    return n_seq


def chunk_gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float | None = None,
    initial_state: Tensor | None = None, output_final_state: bool = False, cu_seqlens: Tensor | None = None,
    use_qk_l2norm: bool = False, *, impl: str = "auto", chunk_size: int = 64, precision: str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Chunked gated delta rule (the training path: differentiable on every input).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (bf16/fp16/fp32, one dtype).
        g: log-decay ``[B, T, H]`` (<= 0); beta: write strength ``[B, T, H]`` in (0, 1).
        scale: output scale, default ``K ** -0.5``.
        initial_state: fp32 ``[N, H, K, V]`` or None (zeros).
        output_final_state: also return the state after the last token of every sequence.
        cu_seqlens: ``[N + 1]`` int offsets of packed sequences (then B == 1); empty sequences are allowed.
        use_qk_l2norm: L2-normalise q and k over K inside the op (eps 1e-6).
        impl: ``"auto"`` | ``"triton"`` | ``"ref"``.
        chunk_size: chunk length; the Triton path needs a power of two in [16, 64].
        precision: input precision of fp32 dots on the Triton path, ``"tf32"`` (tensor cores) or ``"ieee"``
            (exact fp32); None reads ``$MEMZOO_DOT_PRECISION``, default ``"tf32"``. bf16/fp16 inputs always run on
            tensor cores; the reference ignores it.

    Returns:
        o ``[B, T, H, V]`` in q's dtype; the fp32 final state ``[N, H, K, V]``, or None.
    """
    n_seq = _check(q, k, v, g, beta, initial_state, cu_seqlens)
    precision = resolve_dot_precision(precision)
    path = dispatch("chunk_gated_delta_rule", impl, q, tokens=q.shape[1], chunk_size=chunk_size)
    if path == EMPTY:
        return no_tokens(q, k, v, (g, beta), initial_state, output_final_state, n_seq)
    if path == "ref":
        return chunk_gated_delta_rule_ref(
            q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm, chunk_size
        )
    from .triton_chunk import chunk_gated_delta_rule_triton

    return chunk_gated_delta_rule_triton(
        q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm, chunk_size, precision
    )


def fused_recurrent_gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float | None = None,
    initial_state: Tensor | None = None, output_final_state: bool = False, cu_seqlens: Tensor | None = None,
    use_qk_l2norm: bool = False, *, impl: str = "auto", chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Token-by-token gated delta rule for decoding and short prompts; arguments as ``chunk_gated_delta_rule``
    (``chunk_size`` is accepted for a uniform signature and ignored).

    The Triton kernel has no backward (the gate gradient would need every intermediate state): it raises if any
    input requires grad; train with ``chunk_gated_delta_rule``.  ``impl="ref"`` runs the differentiable step loop.
    """
    n_seq = _check(q, k, v, g, beta, initial_state, cu_seqlens)
    path = dispatch("fused_recurrent_gated_delta_rule", impl, q, tokens=q.shape[1])
    if path == EMPTY:
        return no_tokens(q, k, v, (g, beta), initial_state, output_final_state, n_seq)
    if path == "ref":
        return gated_delta_rule_step_ref(
            q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm
        )
    from .triton_recurrent import fused_recurrent_gated_delta_rule_triton

    return fused_recurrent_gated_delta_rule_triton(
        q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm
    )
