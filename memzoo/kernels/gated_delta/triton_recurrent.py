"""Fused recurrent gated delta rule: one Triton kernel walks the tokens of a sequence with the fp32 state tile in
registers; for decoding and short prompts.  Forward only (use ``chunk_gated_delta_rule`` to train).

Paper: "Gated Delta Networks: Improving Mamba2 with Delta Rule" (arXiv 2412.06464).  Recurrence, state S [K, V]:

    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T,      o_t = scale * S_t^T q_t
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_utils import autotune_or_fixed
from ..utils import flatten_batch

__all__ = ["fused_recurrent_gated_delta_rule_triton"]


@autotune_or_fixed(
    [triton.Config({"BV": bv}, num_warps=w) for bv in (16, 32, 64) for w in (1, 2, 4)],
    key=["H", "K", "V"],
    default=triton.Config({"BV": 32}, num_warps=2),
)
@triton.jit
def _recurrent_fwd_kernel(
    q, k, v, g, beta, o, h0, ht, cu_seqlens, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, USE_QK_L2NORM: tl.constexpr,
):
    i_v, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n64 = tl.cast(i_n, tl.int64)
    bos = tl.load(cu_seqlens + i_n64).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n64 + 1).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = tl.cast(i_v, tl.int64) * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_state = (i_n64 * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
    if USE_INITIAL_STATE:
        b_h = tl.load(h0 + o_state, mask=m_kv, other=0.0).to(tl.float32)  # [BK, BV]
    else:
        b_h = tl.zeros([BK, BV], dtype=tl.float32)  # [BK, BV]
    for i_t in range(0, eos - bos):
        i_th = (bos + tl.cast(i_t, tl.int64)) * H + i_h
        b_q = tl.load(q + i_th * K + o_k, mask=m_k, other=0.0).to(tl.float32)  # [BK]
        b_k = tl.load(k + i_th * K + o_k, mask=m_k, other=0.0).to(tl.float32)  # [BK]
        b_v = tl.load(v + i_th * V + o_v, mask=m_v, other=0.0).to(tl.float32)  # [BV]
        b_g = tl.load(g + i_th).to(tl.float32)
        b_beta = tl.load(beta + i_th).to(tl.float32)
        if USE_QK_L2NORM:
            b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + 1e-6)
            b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + 1e-6)
        b_h *= tl.exp(b_g)
        # The delta rule: the value stored under k moves towards v by a step of beta.
        b_err = b_beta * (b_v - tl.sum(b_h * b_k[:, None], 0))  # [BV]
        b_h += b_k[:, None] * b_err[None, :]
        b_o = scale * tl.sum(b_h * b_q[:, None], 0)  # [BV]
        tl.store(o + i_th * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if STORE_FINAL_STATE:
        tl.store(ht + o_state, b_h, mask=m_kv)


@torch.library.custom_op("memzoo::gated_delta_recurrent_fwd", mutates_args=())
def _recurrent_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, h0: Tensor | None, cu: Tensor, scale: float,
    output_final_state: bool, use_qk_l2norm: bool,
) -> tuple[Tensor, Tensor]:
    """Packed inputs ``[1, T, H, ...]`` -> (o ``[1, T, H, V]``, ht fp32 ``[N, H, K, V]``, or ``[0]`` if not asked)."""
    _, T, H, K = q.shape
    V = v.shape[-1]
    n_seq = cu.numel() - 1
    o = torch.empty_like(v, dtype=q.dtype)
    ht = q.new_empty(n_seq if output_final_state else 0, H, K, V, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), n_seq, H)
    _recurrent_fwd_kernel[grid](
        q, k, v, g, beta, o, h0, ht, cu, scale,
        H=H, K=K, V=V, BK=triton.next_power_of_2(K),
        USE_INITIAL_STATE=h0 is not None, STORE_FINAL_STATE=output_final_state, USE_QK_L2NORM=use_qk_l2norm,
    )
    return o, ht


@_recurrent_fwd_op.register_fake
def _(q, k, v, g, beta, h0, cu, scale, output_final_state, use_qk_l2norm):
    _, T, H, K = q.shape
    n_seq = cu.shape[0] - 1 if output_final_state else 0
    return torch.empty_like(v, dtype=q.dtype), q.new_empty(n_seq, H, K, v.shape[-1], dtype=torch.float32)


def fused_recurrent_gated_delta_rule_triton(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float | None = None,
    initial_state: Tensor | None = None, output_final_state: bool = False, cu_seqlens: Tensor | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The Triton path of ``fused_recurrent_gated_delta_rule`` (inputs already validated by the dispatcher)."""
    tensors = {"q": q, "k": k, "v": v, "g": g, "beta": beta, "initial_state": initial_state}
    needs_grad = [name for name, x in tensors.items() if x is not None and x.requires_grad]
    if needs_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"fused_recurrent_gated_delta_rule (impl='triton') is forward-only, but {', '.join(needs_grad)} "
            "require grad: train with chunk_gated_delta_rule, or run this under torch.no_grad()"
        )
    B, T, H, K = q.shape
    if K > 256:
        raise ValueError(f"the recurrent kernel keeps a [K, BV] state tile in registers: K must be <= 256, got {K}")
    if scale is None:
        scale = K ** -0.5
    (q, cu), (k, _), (v, _), (g, _), (beta, _) = (flatten_batch(x.contiguous(), cu_seqlens) for x in (q, k, v, g, beta))
    h0 = None if initial_state is None else initial_state.contiguous()
    o, ht = _recurrent_fwd_op(q, k, v, g, beta, h0, cu, float(scale), output_final_state, use_qk_l2norm)
    return o.reshape(B, T, H, v.shape[-1]), (ht if output_final_state else None)
