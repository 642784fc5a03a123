"""Fused-recurrent gated linear attention (GLA) in Triton, for decoding and short prompts (forward only).

"Gated Linear Attention Transformers with Hardware-Efficient Training" (arXiv 2312.06635).  One program per
(V-tile, sequence, head) walks the tokens with its fp32 state tile in registers:

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T          o_t = scale * S_t^T q_t

The gradient with respect to g would need every S_t, so there is no backward: train with ``chunk_gla``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_utils import autotune_or_fixed
from ..utils import flatten_batch

__all__ = ["fused_recurrent_gla_triton"]


@autotune_or_fixed(
    configs=[triton.Config({"BV": bv}, num_warps=w) for bv in (16, 32, 64) for w in (1, 2, 4)],
    key=["H", "K", "V", "BK", "USE_H0", "STORE_HT"],
    default=triton.Config({"BV": 32}, num_warps=2),
)
@triton.jit
def _fused_recurrent_fwd_kernel(q, k, v, g, o, h0, ht, cu_seqlens, scale, H: tl.constexpr, K: tl.constexpr,
                                V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_H0: tl.constexpr,
                                STORE_HT: tl.constexpr):
    i_v, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.cast(tl.program_id(2), tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = tl.cast(i_n, tl.int64) * H * K * V + (i_h * K + o_k[:, None]) * V + o_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + p_kv, mask=m_kv, other=0)
    for i_s in range(0, eos - bos):
        i_t = bos + tl.cast(i_s, tl.int64)
        b_q = tl.load(q + (i_t * H + i_h) * K + o_k, mask=m_k, other=0).to(tl.float32)  # [BK]
        b_k = tl.load(k + (i_t * H + i_h) * K + o_k, mask=m_k, other=0).to(tl.float32)
        b_g = tl.load(g + (i_t * H + i_h) * K + o_k, mask=m_k, other=0).to(tl.float32)
        b_v = tl.load(v + (i_t * H + i_h) * V + o_v, mask=m_v, other=0).to(tl.float32)  # [BV]
        b_h = b_h * tl.exp(b_g)[:, None] + b_k[:, None] * b_v[None, :]  # [BK, BV]
        b_o = tl.sum(b_h * b_q[:, None], 0) * scale  # [BV]
        tl.store(o + (i_t * H + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if STORE_HT:
        tl.store(ht + p_kv, b_h, mask=m_kv)


# A torch.library custom op, so torch.compile sees one opaque call (with the fake below) instead of a graph break.
@torch.library.custom_op("memzoo::gla_recurrent_fwd", mutates_args=())
def _recurrent_fwd_op(q: Tensor, k: Tensor, v: Tensor, g: Tensor, h0: Tensor | None, cu: Tensor, scale: float,
                      want_final: bool) -> tuple[Tensor, Tensor]:
    """Packed inputs ``[1, T, H, ...]`` -> (o ``[1, T, H, V]``, ht fp32 ``[N, H, K, V]``, or ``[0, H, K, V]``)."""
    _, _, H, K = q.shape
    V = v.shape[-1]
    N = cu.numel() - 1
    BK = max(16, triton.next_power_of_2(K))
    o = torch.empty_like(v)
    ht = torch.empty(N if want_final else 0, H, K, V, device=q.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), N, H)
    _fused_recurrent_fwd_kernel[grid](q, k, v, g, o, h0, ht, cu, scale, H=H, K=K, V=V, BK=BK,
                                      USE_H0=h0 is not None, STORE_HT=want_final)
    return o, ht


@_recurrent_fwd_op.register_fake
def _(q, k, v, g, h0, cu, scale, want_final):
    _, _, H, K = q.shape
    return torch.empty_like(v), q.new_empty(cu.shape[0] - 1 if want_final else 0, H, K, v.shape[-1],
                                            dtype=torch.float32)


def fused_recurrent_gla_triton(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float | None = None, initial_state: Tensor | None = None,
    output_final_state: bool = False, cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Triton token loop; arguments and results as ``memzoo.kernels.gla.fused_recurrent_gla`` (inputs checked).

    Raises:
        RuntimeError: when gradients are being recorded for any input (this path has no backward).
    """
    inputs = (q, k, v, g, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        raise RuntimeError(
            "fused_recurrent_gla(impl='triton') has no backward; use chunk_gla for training, "
            "or run under torch.no_grad() for decoding"
        )
    K = q.shape[-1]
    scale = K**-0.5 if scale is None else float(scale)
    qf, cu = flatten_batch(q.contiguous(), cu_seqlens)
    kf, _ = flatten_batch(k.contiguous(), cu_seqlens)
    vf, _ = flatten_batch(v.contiguous(), cu_seqlens)
    gf, _ = flatten_batch(g.contiguous(), cu_seqlens)
    h0 = None if initial_state is None else initial_state.contiguous()
    o, ht = _recurrent_fwd_op(qf, kf, vf, gf, h0, cu, scale, output_final_state)
    return o.reshape(v.shape), (ht if output_final_state else None)
