"""Shared pieces of the chunked-recurrence ops: input checks, varlen chunk tables, debug mode, small math.

Imports no Triton (the reference paths and the CPU install must not need it); Triton-only
helpers live in ``memzoo.kernels.triton_utils``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from . import with_empty_grads

__all__ = [
    "DEBUG_ENV_VAR", "debug_checks", "check_cu_seqlens", "check_recurrence_inputs", "l2norm", "check_log_gate",
    "no_tokens", "chunk_table",
    "flatten_batch", "seq_boundaries", "DOT_PRECISION_ENV_VAR", "DOT_PRECISIONS", "resolve_dot_precision",
]

# Value checks that would synchronise a CUDA device (e.g. "all log-gates <= 0") run only when this is "1".
DEBUG_ENV_VAR = "MEMZOO_DEBUG"


# Input precision of fp32 ``tl.dot``s in the Triton kernels: "tf32" (tensor cores, the default) or "ieee" (exact
# fp32 on the FMA units, ~15x slower on an H100; for exactness tests). bf16/fp16 inputs always run on tensor cores.
DOT_PRECISION_ENV_VAR = "MEMZOO_DOT_PRECISION"
DOT_PRECISIONS = ("tf32", "ieee")


def resolve_dot_precision(precision: str | None) -> str:
    """``precision`` if given, else ``$MEMZOO_DOT_PRECISION``, else ``"tf32"``; one of ``DOT_PRECISIONS``."""
    if precision is None:
        precision = os.environ.get(DOT_PRECISION_ENV_VAR, "tf32")
    if precision not in DOT_PRECISIONS:
        raise ValueError(f"precision (or ${DOT_PRECISION_ENV_VAR}) must be one of {DOT_PRECISIONS}, got {precision!r}")
    return precision


def debug_checks() -> bool:
    return os.environ.get(DEBUG_ENV_VAR, "0") == "1" and not torch.compiler.is_compiling()


def check_cu_seqlens(cu_seqlens: Tensor, batch_size: int, seq_len: int) -> None:
    """Validate packed-sequence offsets ``[N+1]`` for an input of shape ``[batch_size, seq_len, ...]``.

    Value checks (starts at 0, ends at ``seq_len``, non-decreasing) run only on CPU tensors and
    outside torch.compile, so that a CUDA training step never waits on the host.
    """
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"cu_seqlens must be a tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.numel() < 2:
        raise TypeError(
            f"cu_seqlens must be a 1-D int32/int64 tensor [N+1] with N >= 1, "
            f"got shape {tuple(cu_seqlens.shape)} {cu_seqlens.dtype}"
        )
    if batch_size != 1:
        raise ValueError(f"with cu_seqlens the batch must be packed into B=1, got B={batch_size}")
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != seq_len:
            raise ValueError(
                f"cu_seqlens must start at 0 and end at the sequence length {seq_len}, "
                f"got {cu_seqlens[0].item()}..{cu_seqlens[-1].item()}"
            )
        if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError("cu_seqlens must be non-decreasing")


def check_recurrence_inputs(
    q: Tensor, k: Tensor, v: Tensor, gates: dict[str, tuple[Tensor | None, str]],
    initial_state: Tensor | None, cu_seqlens: Tensor | None,
) -> int:
    """Validate the fla-style op inputs before any launch; return N, the number of sequences.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``, all of one floating dtype and device.
        gates: name -> (tensor or None, expected layout), layout ``"BTH"`` (scalar per head) or
            ``"BTHK"`` (per key dimension).
        initial_state: ``None`` or fp32 ``[N, H, K, V]``.
        cu_seqlens: ``None`` or ``[N+1]`` int offsets (then B must be 1).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, T, H, D], got {getattr(t, 'shape', type(t).__name__)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B={B}, T={T}, H={H}, V], got {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError("q, k, v must be on one device")
    for name, (g, layout) in gates.items():
        if g is None:
            continue
        want = (B, T, H) if layout == "BTH" else (B, T, H, K)
        if not isinstance(g, Tensor) or tuple(g.shape) != want:
            raise ValueError(f"{name} must have shape {list(want)} ({layout}), got {getattr(g, 'shape', g)}")
        if not g.is_floating_point() or g.device != q.device:
            raise TypeError(f"{name} must be a floating tensor on {q.device}, got {g.dtype} on {g.device}")
    N = B
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T)
        N = cu_seqlens.numel() - 1
        if cu_seqlens.device != q.device:
            raise ValueError(f"cu_seqlens must be on {q.device}, got {cu_seqlens.device}")
        if debug_checks() and bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError("cu_seqlens must be non-decreasing")
    if initial_state is not None:
        want = (N, H, K, v.shape[-1])
        if not isinstance(initial_state, Tensor) or tuple(initial_state.shape) != want:
            raise ValueError(
                f"initial_state must be [N={N}, H={H}, K={K}, V={v.shape[-1]}], "
                f"got {getattr(initial_state, 'shape', initial_state)}"
            )
        if initial_state.dtype != torch.float32:
            raise TypeError(f"initial_state must be float32 (states are fp32), got {initial_state.dtype}")
    return N


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dimension."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def check_log_gate(g: Tensor | None, name: str = "g") -> None:
    """In debug mode only (it syncs): log-decays must be finite and <= 0."""
    if g is not None and debug_checks() and not bool(((g <= 0) & torch.isfinite(g)).all()):
        raise ValueError(f"{name} must be a log-decay: finite and <= 0 everywhere")


def no_tokens(q: Tensor, k: Tensor, v: Tensor, gates: tuple[Tensor | None, ...], initial_state: Tensor | None,
              output_final_state: bool, n_seq: int) -> tuple[Tensor, Tensor | None]:
    """The result of an fla-style op on T = 0 tokens: ``o`` ``[B, 0, H, V]`` in q's dtype, and the state passed
    through (a copy of ``initial_state``, zeros without one); every input gets a gradient of its own shape."""
    o = v.new_zeros(v.shape, dtype=q.dtype)
    o = with_empty_grads(o, q, k, v, *gates)
    if not output_final_state:
        return o, None
    if initial_state is not None:
        return o, initial_state.clone()
    return o, q.new_zeros(n_seq, q.shape[2], q.shape[3], v.shape[3], dtype=torch.float32)


def flatten_batch(x: Tensor, cu_seqlens: Tensor | None) -> tuple[Tensor, Tensor]:
    """View ``[B, T, ...]`` as one packed sequence ``[1, B*T, ...]`` with offsets, so every kernel
    runs in varlen mode only.  With ``cu_seqlens`` given, ``x`` is returned as is."""
    if cu_seqlens is not None:
        return x, cu_seqlens.to(torch.int64)
    B, T = x.shape[:2]
    cu = torch.arange(B + 1, device=x.device, dtype=torch.int64) * T
    return x.reshape(1, B * T, *x.shape[2:]), cu


def seq_boundaries(cu_seqlens: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """Per token: the index of its sequence and its position inside it (``[total]`` int64 each)."""
    t = torch.arange(total, device=cu_seqlens.device)
    cu = cu_seqlens.to(torch.int64)
    seq = torch.bucketize(t, cu[1:], right=True)
    return seq, t - cu[seq]


def chunk_table(cu_seqlens: Tensor, total: int, chunk_size: int) -> Tensor:
    """The (sequence, chunk) pair of every program of a chunk-parallel grid, built on the device.

    The grid has the static size ``ceil(total / chunk_size) + N`` (an upper bound on the number of
    chunks over N sequences), so no host sync is needed; surplus rows hold ``(-1, -1)`` and their
    programs exit at once.  Empty sequences get no chunks.

    Returns:
        ``[ceil(total / chunk_size) + N, 2]`` int32.
    """
    cu = cu_seqlens.to(torch.int64)
    n_seq = cu.numel() - 1
    lengths = cu[1:] - cu[:-1]  # [N]
    n_chunks = (lengths + chunk_size - 1) // chunk_size  # [N]
    ends = n_chunks.cumsum(0)  # [N]
    rows = -(-total // chunk_size) + n_seq
    i = torch.arange(rows, device=cu.device)
    seq = torch.bucketize(i, ends, right=True)  # [rows]
    valid = seq < n_seq
    seq_c = seq.clamp(max=max(n_seq - 1, 0))
    chunk = i - (ends[seq_c] - n_chunks[seq_c])
    table = torch.stack((torch.where(valid, seq, -1), torch.where(valid, chunk, -1)), dim=1)
    return table.to(torch.int32)
