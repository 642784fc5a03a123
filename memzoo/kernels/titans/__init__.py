"""Titans neural long-term memory ops: ``titans_linear`` (depth-1 memory) and ``titans_mlp`` (2-layer MLP memory).

Paper: "Titans: Learning to Memorize at Test Time" (arXiv 2501.00663).  Per head, gradients within a chunk of b
tokens are taken at the chunk-start weights W_t' (the paper's mini-batch gradient descent, eqs 16-18):

    S_t = eta_t S_{t-1} - theta_t grad 1/2 ||M_{W_t'}(k_t) - v_t||^2,    W_t = (1 - alpha_t) W_{t-1} + S_t,
    y_t = M_{W_t}(q_t)

``impl="auto"`` picks Triton for CUDA inputs of the linear memory (decay per head or per key channel) and of the MLP
memory (the sizes its kernel takes), and the chunked reference otherwise (CPU always gets the reference).
The Miras variants (``miras=Miras(error_map=..., retention=...)``, arXiv 2504.13173) of ``titans_linear`` run the
chunked reference: "auto" sends them there, and ``impl="triton"`` with a variant raises instead of computing plain
Titans.  The MLP kernel covers every variant the MLP memory has (the three error maps, the l2 and lq retentions).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import EMPTY, dispatch, with_empty_grads
from ..utils import check_log_gate, check_recurrence_inputs, resolve_dot_precision
from .mlp_chunk import _ref_walk, mlp_chunked, titans_mlp_chunk_ref, triton_walk
from .reference import (
    MIRAS_L2,
    Miras,
    titans_linear_chunk_ref,
    titans_linear_step_ref,
    titans_mlp_step_ref,
)

__all__ = [
    "Miras", "MIRAS_L2", "titans_linear", "titans_mlp", "titans_linear_chunk_ref", "titans_linear_step_ref",
    "titans_mlp_chunk_ref", "titans_mlp_step_ref",
]


def _check_common(q, k, v, theta, log_eta, log_gamma, start_pos, chunk_size, cu_seqlens, extra=None) -> int:
    gates = {"theta": (theta, "BTH"), "log_eta": (log_eta, "BTH"),
             "log_gamma": (log_gamma, "BTHK" if getattr(log_gamma, "dim", lambda: 0)() == 4 else "BTH")}
    gates.update(extra or {})
    for name, (g, _) in gates.items():
        if g is None:
            raise ValueError(f"{name} is required")
    n_seq = check_recurrence_inputs(q, k, v, gates, None, cu_seqlens)
    check_log_gate(log_eta, "log_eta")
    check_log_gate(log_gamma, "log_gamma")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(start_pos, Tensor) or tuple(start_pos.shape) != (n_seq,) or start_pos.is_floating_point():
        raise ValueError(f"start_pos must be an integer tensor [N={n_seq}], got {getattr(start_pos, 'shape', None)}")
    return n_seq


def _check_states(initial_state, shapes: list[tuple[int, ...]]) -> None:
    if not isinstance(initial_state, (tuple, list)) or len(initial_state) != len(shapes):
        raise ValueError(f"initial_state must be a tuple of {len(shapes)} tensors")
    for i, (s, want) in enumerate(zip(initial_state, shapes)):
        if not isinstance(s, Tensor) or tuple(s.shape) != want:
            raise ValueError(f"initial_state[{i}] must have shape {list(want)}, got {getattr(s, 'shape', s)}")
        if s.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"initial_state[{i}] must be float32 (or float64 for oracle checks), got {s.dtype}")


def _no_tokens(q: Tensor, v: Tensor, others: tuple[Tensor, ...], initial_state: tuple[Tensor, ...]
               ) -> tuple[Tensor, tuple[Tensor, ...]]:
    """T = 0: an empty ``[B, 0, H, V]`` output (zero gradients of the inputs' shapes) and the state passed through."""
    y = with_empty_grads(v.new_zeros(v.shape, dtype=q.dtype), q, v, *others)
    return y, tuple(s.clone() for s in initial_state)


def titans_linear(
    q: Tensor, k: Tensor, v: Tensor, theta: Tensor, log_eta: Tensor, log_gamma: Tensor,
    initial_state: tuple[Tensor, Tensor, Tensor], start_pos: Tensor, chunk_size: int = 16,
    cu_seqlens: Tensor | None = None, *, impl: str = "auto", miras: Miras = MIRAS_L2, precision: str | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Linear Titans memory ``W [K, V]`` with momentum and decay, exact chunked test-time learning.

    Args:
        q, k: ``[B, T, H, K]`` (the layer L2-normalises them); v: ``[B, T, H, V]``.
        theta: inner learning rate ``[B, T, H]`` (>= 0); log_eta: log momentum decay ``[B, T, H]`` (<= 0);
        log_gamma: log(1 - alpha) ``[B, T, H]`` or per key channel ``[B, T, H, K]`` (<= 0).
        initial_state: (W_base, W, S) fp32 ``[N, H, K, V]``: gradient base, weights, momentum.
        start_pos: ``[N]`` int in [0, chunk_size), position of each sequence's first token inside its current chunk.
        chunk_size: b; changes the results (train and decode with the same b).
        cu_seqlens: ``[N + 1]`` int offsets of packed sequences (B == 1); empty sequences allowed.
        impl: ``"auto"`` | ``"triton"`` | ``"ref"``.
        miras: error map and retention (``Miras``); anything but plain l2/l2 runs the chunked reference.
        precision: input precision of fp32 dots on the Triton path, ``"tf32"`` or ``"ieee"``; None reads
            ``$MEMZOO_DOT_PRECISION``, default ``"tf32"`` (bf16/fp16 inputs always run on tensor cores).

    Returns:
        y ``[B, T, H, V]`` in q's dtype and the final (W_base, W, S) in fp32 (fp64 for fp64 inputs).
    """
    n_seq = _check_common(q, k, v, theta, log_eta, log_gamma, start_pos, chunk_size, cu_seqlens)
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    _check_states(initial_state, [(n_seq, H, K, V)] * 3)
    precision = resolve_dot_precision(precision)
    if not isinstance(miras, Miras):
        raise TypeError(f"miras must be a Miras, got {type(miras).__name__}")
    if impl == "triton" and not miras.is_titans:
        raise ValueError(f"the Triton kernel implements the l2 error map and l2 retention only, got "
                         f"error_map={miras.error_map!r}, retention={miras.retention!r}; use impl='auto' or 'ref'")
    path = dispatch("titans_linear", impl, q, tokens=q.shape[1], triton=miras.is_titans)
    if path == EMPTY:
        return _no_tokens(q, v, (k, theta, log_eta, log_gamma), initial_state)
    if path == "triton":
        from .triton_chunk import titans_linear_triton

        return titans_linear_triton(q, k, v, theta, log_eta, log_gamma, initial_state, start_pos, chunk_size,
                                    cu_seqlens, precision)
    y, state = titans_linear_chunk_ref(q, k, v, theta, log_eta, log_gamma, initial_state, start_pos, chunk_size,
                                       cu_seqlens, miras=miras)
    return y.to(q.dtype), state


def titans_mlp(
    q: Tensor, k: Tensor, v: Tensor, theta1: Tensor, theta2: Tensor, log_eta: Tensor, log_gamma: Tensor,
    initial_state: tuple[Tensor, ...], start_pos: Tensor, chunk_size: int = 16, cu_seqlens: Tensor | None = None,
    *, impl: str = "auto", miras: Miras = MIRAS_L2, precision: str | None = None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """2-layer MLP Titans memory ``x + LN(gelu(x A2) A1)`` (expansion E = A2.shape[-1]), exact chunked dual form.

    Args as ``titans_linear`` with v ``[B, T, H, K]``, a learning rate per matrix (theta1 for A1, theta2 for A2),
    a per-head log_gamma ``[B, T, H]`` and initial_state (A1_base, A1, S1, A2_base, A2, S2) with A1 ``[N, H, E, K]``
    and A2 ``[N, H, K, E]``.  ``impl="triton"`` runs the chunk walk and reads in the Triton kernel (forward; the
    backward is the PyTorch one of the reference, fed with the chunk states the kernel stored); it needs a power-of-two
    chunk >= 16, K a power of two in [16, 256], E a multiple of 16 and fp32/bf16/fp16 inputs, and "auto" sends other
    inputs to the reference.  ``miras``: error map and retention; ``retention="kl"`` raises (linear memory only).
    """
    if not isinstance(miras, Miras):
        raise TypeError(f"miras must be a Miras, got {type(miras).__name__}")
    n_seq = _check_common(q, k, v, theta1, log_eta, log_gamma, start_pos, chunk_size, cu_seqlens,
                          {"theta2": (theta2, "BTH")})
    if log_gamma.dim() != 3:
        raise ValueError("titans_mlp takes a per-head log_gamma [B, T, H]")
    H, K = q.shape[2], q.shape[3]
    if v.shape[3] != K:
        raise ValueError(f"the MLP memory maps K to K: v must be [B, T, H, K={K}], got {tuple(v.shape)}")
    if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 6:
        raise ValueError("initial_state must be a tuple of 6 tensors (A1_base, A1, S1, A2_base, A2, S2)")
    E = initial_state[0].shape[-2]
    _check_states(initial_state, [(n_seq, H, E, K)] * 3 + [(n_seq, H, K, E)] * 3)
    precision = resolve_dot_precision(precision)
    if miras.retention == "kl":
        raise ValueError("retention='kl' is defined for the linear memory only")
    unsupported = _mlp_triton_refusal(q, K, E, chunk_size)
    if impl == "triton" and unsupported:
        raise ValueError(f"titans_mlp(impl='triton'): {unsupported}; use impl='auto' or 'ref'")
    path = dispatch("titans_mlp", impl, q, tokens=q.shape[1], auto_ref=unsupported is not None)
    if path == EMPTY:
        return _no_tokens(q, v, (k, theta1, theta2, log_eta, log_gamma), initial_state)
    walk = triton_walk(q.dtype, precision) if path == "triton" else _ref_walk
    y, state = mlp_chunked(q, k, v, theta1, theta2, log_eta, log_gamma, initial_state, start_pos, chunk_size,
                           cu_seqlens, miras, walk)
    return y.to(q.dtype), state


def _mlp_triton_refusal(q: Tensor, K: int, E: int, chunk_size: int) -> str | None:
    """Why the MLP kernel cannot run this call, or None."""
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"the kernel takes float32, bfloat16 or float16 inputs, got {q.dtype}"
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        return f"chunk_size must be a power of two >= 16, got {chunk_size}"
    if K < 16 or K > 256 or K & (K - 1):
        return f"the head dim K must be a power of two in [16, 256], got {K}"
    if E % 16:
        return f"the hidden width E must be a multiple of 16, got {E}"
    return None
