"""Gated linear attention (GLA): linear attention whose memory forgets per key channel.

"Gated Linear Attention Transformers with Hardware-Efficient Training" (Yang, Wang, Shen, Panda, Kim;
arXiv 2312.06635).  Per head, with a memory S_t [K, V] and a data-dependent per-key decay
alpha_t = exp(g_t) in (0, 1)^K:

    S_t = diag(alpha_t) S_{t-1} + k_t v_t^T          o_t = S_t^T q_t / sqrt(K)

Built as in the paper and flash-linear-attention's layer: keys at half the model width
(``expand_k=0.5``), a low-rank gate g_t = logsigmoid(W2 W1 x_t + b) / 16 (the normaliser keeps decays
near 1), an optional short causal convolution on q, k, v, and a per-head RMSNorm of o gated by
SiLU(g_proj(x)) before ``o_proj``.  The chunked op runs training and prefill; decoding uses the fused
recurrent op.  Gates and norms are computed in fp32 whatever the parameter dtype.
Packed sequences (``cu_seqlens``) may start from a state with one row per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ...kernels import check_chunk_options
from ...kernels.gla import chunk_gla, fused_recurrent_gla
from ..init import keep_init
from .common import QKVMemoryMixer, QKVMemoryState, chunked_memory_flops, needs_grad

__all__ = ["GatedLinearAttentionConfig", "GLAState", "GatedLinearAttention"]


@dataclass(frozen=True)
class GatedLinearAttentionConfig:
    d_model: int = 256
    n_heads: int = 4
    # Total key width = expand_k * d_model, split over the heads (the paper halves it to save state).
    expand_k: float = 0.5
    # Total value width = expand_v * d_model, split over the heads.
    expand_v: float = 1.0
    # Rank of the gate projection d_model -> gate_low_rank_dim -> key width.
    gate_low_rank_dim: int = 16
    # Divides the log-sigmoid gate: larger values keep decays closer to 1 (slower forgetting).
    gate_logit_normalizer: float = 16.0
    # Short causal conv + SiLU on q, k, v (off in the paper; without it q, k, v are used as projected).
    use_short_conv: bool = False
    # Window of the short conv in tokens, the current one included.
    conv_size: int = 4
    # Output gate: RMSNorm(o) * SiLU(g_proj(x)) per head; False keeps the RMSNorm alone.
    use_gate: bool = True
    norm_eps: float = 1e-5
    # Chunk length of the chunked op (power of two in [16, 256]); results do not depend on it.
    chunk_size: int = 64
    # Kernel path: "auto" (Triton on CUDA, the PyTorch reference otherwise) | "triton" | "ref".
    impl: str = "auto"

    def __post_init__(self) -> None:
        if self.d_model <= 0 or self.n_heads <= 0:
            raise ValueError(f"d_model and n_heads must be positive, got {self.d_model}, {self.n_heads}")
        for name, expand, width in (("expand_k", self.expand_k, self.key_dim),
                                    ("expand_v", self.expand_v, self.value_dim)):
            if expand <= 0 or expand * self.d_model != width or width % self.n_heads:
                raise ValueError(
                    f"{name}={expand} times d_model={self.d_model} must be a positive integer "
                    f"divisible by n_heads={self.n_heads}"
                )
        if self.gate_low_rank_dim < 1:
            raise ValueError(f"gate_low_rank_dim must be >= 1, got {self.gate_low_rank_dim}")
        if self.gate_logit_normalizer <= 0:
            raise ValueError(f"gate_logit_normalizer must be positive, got {self.gate_logit_normalizer}")
        if self.conv_size < 1:
            raise ValueError(f"conv_size must be >= 1, got {self.conv_size}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        check_chunk_options(self.chunk_size, self.impl, max_chunk=256)

    @property
    def key_dim(self) -> int:
        return int(self.expand_k * self.d_model)

    @property
    def value_dim(self) -> int:
        return int(self.expand_v * self.d_model)

    @property
    def head_k(self) -> int:
        return self.key_dim // self.n_heads

    @property
    def head_v(self) -> int:
        return self.value_dim // self.n_heads


class GLAState(QKVMemoryState):
    """(conv_q, conv_k, conv_v, memory): the q/k/v conv tails and the fp32 linear-attention memory ``[B, H, K, V]``."""

    __slots__ = ()


class GatedLinearAttention(QKVMemoryMixer):
    """GLA token mixer: multi-head linear attention with a low-rank, per-key forget gate."""

    config_class = GatedLinearAttentionConfig
    state_class = GLAState
    silu_without_conv = False

    def __init__(self, config: GatedLinearAttentionConfig | None = None, /, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        c = self.config
        self.build_qkv(c.key_dim, c.value_dim)
        # Low rank keeps the gate cheap (d * r + r * key_dim parameters); the bias sets the initial forgetting
        # (nn.Linear's U(-1/sqrt(r), 1/sqrt(r)) spreads the key channels' decays), so the model's init keeps it.
        self.gk_proj = nn.Sequential(
            nn.Linear(c.d_model, c.gate_low_rank_dim, bias=False),
            nn.Linear(c.gate_low_rank_dim, c.key_dim, bias=True),
        )
        keep_init(self.gk_proj[1].bias)
        self.build_out(use_short_conv=c.use_short_conv, conv_size=c.conv_size, use_gate=c.use_gate,
                       norm_eps=c.norm_eps)

    def extra_flops_per_token(self, seq_len: int) -> int:
        return chunked_memory_flops(self.n_heads, self.head_k, self.head_v, self.config.chunk_size, seq_len)

    def gates(self, x: Tensor) -> Tensor:
        """Per-key log-decay ``[B, T, H, K]`` in fp32, in (-inf, 0)."""
        logits = self.gk_proj(x).float()
        return (F.logsigmoid(logits) / self.config.gate_logit_normalizer).unflatten(-1, (self.n_heads, self.head_k))

    def recur(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, memory: Tensor | None, cu_seqlens: Tensor | None,
              *, step: bool) -> tuple[Tensor, Tensor]:
        # The fused recurrent kernel is the decoding path; it has no backward, so training steps use the chunk op.
        op = fused_recurrent_gla if step and not needs_grad(self, x, memory) else chunk_gla
        return op(q, k, v, self.gates(x), initial_state=memory, output_final_state=True, cu_seqlens=cu_seqlens,
                  impl=self.config.impl, chunk_size=self.config.chunk_size)
