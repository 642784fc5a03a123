"""Gated DeltaNet: a linear-attention memory written by the delta rule under a data-dependent decay.

"Gated Delta Networks: Improving Mamba2 with Delta Rule" (Yang, Kautz, Hatamizadeh; arXiv 2412.06464).
Per head, with a fast-weight memory S_t [K, V], L2-normalised q_t, k_t, a decay alpha_t = exp(g_t) in
(0, 1) and a write strength beta_t in (0, 1):

    S_t = alpha_t S_{t-1} + beta_t k_t (v_t - alpha_t S_{t-1}^T k_t)^T          o_t = S_t^T q_t / sqrt(K)

Built as commonly done (the paper, flash-linear-attention's layer): q/k/v projections,
a short causal convolution + SiLU on each, beta = sigmoid(b_proj(x)), the Mamba-2 decay
g = -exp(A_log) * softplus(a_proj(x) + dt_bias), and a per-head RMSNorm of o gated by
SiLU(g_proj(x)) before ``o_proj``.  The chunked op runs training and prefill; decoding uses the
fused recurrent op.  Gates and norms are computed in fp32 whatever the parameter dtype.
Packed sequences (``cu_seqlens``) may start from a state with one row per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...kernels import check_chunk_options
from ...kernels.gated_delta import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

# HeadDims and GatedRMSNorm are re-exported from here for code written before ``common`` held them.
from .common import (
    GatedRMSNorm,
    HeadDims,
    QKVMemoryMixer,
    QKVMemoryState,
    chunked_memory_flops,
    init_mamba2_decay,
    needs_grad,
)

__all__ = ["HeadDims", "GatedDeltaNetConfig", "GatedDeltaState", "GatedDeltaNet", "GatedRMSNorm"]


@dataclass(frozen=True)
class GatedDeltaNetConfig(HeadDims):
    d_model: int = 256
    n_heads: int = 4
    # Query/key head dimension; None = d_model // n_heads.
    d_head: int | None = None
    # Value head dimension = expand_v * d_head (the paper widens values, not keys); must come out whole.
    expand_v: float = 2.0
    # Short causal conv + SiLU on q, k, v; without it q, k, v still pass through SiLU.
    use_short_conv: bool = True
    # Window of the short conv in tokens, the current one included.
    conv_size: int = 4
    # Output gate: RMSNorm(o) * SiLU(g_proj(x)) per head; False keeps the RMSNorm alone.
    use_gate: bool = True
    norm_eps: float = 1e-5
    # Chunk length of the chunked op (power of two >= 16 for the Triton path); results do not depend on it.
    chunk_size: int = 64
    # Kernel path: "auto" (Triton on CUDA, the PyTorch reference otherwise) | "triton" | "ref".
    impl: str = "auto"

    def __post_init__(self) -> None:
        self.check_head_dims()
        if self.conv_size < 1:
            raise ValueError(f"conv_size must be >= 1, got {self.conv_size}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        check_chunk_options(self.chunk_size, self.impl)


class GatedDeltaState(QKVMemoryState):
    """(conv_q, conv_k, conv_v, memory): the q/k/v conv tails and the fp32 delta-rule memory ``[B, H, K, V]``."""

    __slots__ = ()


class GatedDeltaNet(QKVMemoryMixer):
    """Gated DeltaNet token mixer: multi-head delta-rule memory with a Mamba-2 decay and an output gate."""

    config_class = GatedDeltaNetConfig
    state_class = GatedDeltaState
    silu_without_conv = True

    def __init__(self, config: GatedDeltaNetConfig | None = None, /, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        c = self.config
        self.build_qkv(c.n_heads * c.head_k, c.n_heads * c.head_v)
        self.a_proj = nn.Linear(c.d_model, c.n_heads, bias=False)
        self.b_proj = nn.Linear(c.d_model, c.n_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(c.n_heads))
        self.dt_bias = nn.Parameter(torch.empty(c.n_heads))
        # Decay parameters are not shrunk by weight decay (the trainer reads this flag).
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        self.build_out(use_short_conv=c.use_short_conv, conv_size=c.conv_size, use_gate=c.use_gate,
                       norm_eps=c.norm_eps)
        self.reset_decay_parameters()

    def reset_decay_parameters(self) -> None:
        """Mamba-2's init: A ~ U(0, 16), dt ~ log-U[1e-3, 1e-1] stored through the inverse softplus."""
        init_mamba2_decay(self.A_log, self.dt_bias)

    def extra_flops_per_token(self, seq_len: int) -> int:
        return chunked_memory_flops(self.n_heads, self.head_k, self.head_v, self.config.chunk_size, seq_len, wy=True)

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Log-decay g <= 0 and write strength beta in (0, 1), both fp32 ``[B, T, H]``."""
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        beta = torch.sigmoid(self.b_proj(x).float())
        return g, beta

    def recur(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, memory: Tensor | None, cu_seqlens: Tensor | None,
              *, step: bool) -> tuple[Tensor, Tensor]:
        g, beta = self.gates(x)
        # The fused recurrent kernel is the decoding path; it has no backward, so training steps use the chunk op.
        op = fused_recurrent_gated_delta_rule if step and not needs_grad(self, x, memory) else chunk_gated_delta_rule
        return op(q, k, v, g, beta, initial_state=memory, output_final_state=True, cu_seqlens=cu_seqlens,
                  use_qk_l2norm=True, impl=self.config.impl, chunk_size=self.config.chunk_size)
