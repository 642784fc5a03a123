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

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...kernels import check_chunk_options
from ...kernels.gated_delta import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
from ..contract import Mixer
from .conv import ShortConvolution

__all__ = ["HeadDims", "GatedDeltaNetConfig", "GatedDeltaState", "GatedDeltaNet", "GatedRMSNorm"]

# Mamba-2's initialisation: A ~ U(0, 16) per head, dt ~ log-uniform in [DT_MIN, DT_MAX].
_A_INIT_RANGE = (0.0, 16.0)
_DT_MIN, _DT_MAX, _DT_FLOOR = 1e-3, 1e-1, 1e-4


class HeadDims:
    """``head_k`` / ``head_v`` of configs with ``d_model``, ``n_heads``, ``d_head`` (None = d_model //
    n_heads) and ``expand_v`` (value width per head = expand_v * head_k)."""

    @property
    def head_k(self) -> int:
        return self.d_model // self.n_heads if self.d_head is None else self.d_head

    @property
    def head_v(self) -> int:
        return int(self.expand_v * self.head_k)


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
        if self.d_model <= 0 or self.n_heads <= 0:
            raise ValueError(f"d_model and n_heads must be positive, got {self.d_model}, {self.n_heads}")
        if self.d_head is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads} (or set d_head)")
        if self.head_k <= 0:
            raise ValueError(f"d_head must be positive, got {self.head_k}")
        if self.expand_v <= 0 or self.expand_v * self.head_k != self.head_v:
            raise ValueError(f"expand_v={self.expand_v} times d_head={self.head_k} must be a positive integer")
        if self.conv_size < 1:
            raise ValueError(f"conv_size must be >= 1, got {self.conv_size}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        check_chunk_options(self.chunk_size, self.impl)



class GatedDeltaState(NamedTuple):
    conv_q: Tensor | None  # [B, W-1, H*K] last inputs of the q conv (None without short conv)
    conv_k: Tensor | None  # [B, W-1, H*K]
    conv_v: Tensor | None  # [B, W-1, H*V]
    memory: Tensor  # [B, H, K, V] fp32


class GatedRMSNorm(nn.Module):
    """Per-head RMSNorm with an optional SiLU gate, in fp32: ``rmsnorm(o) * weight * silu(gate)``."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, o: Tensor, gate: Tensor | None) -> Tensor:
        """``o`` ``[..., dim]``, ``gate`` like ``o`` or None; returns ``o``'s dtype."""
        of = o.float()
        y = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        if gate is not None:
            y = y * F.silu(gate.float())
        return y.to(o.dtype)


def short_convs(use: bool, dims: tuple[int, ...], size: int) -> list[ShortConvolution | None]:
    """One SiLU short conv per stream of width ``dims[i]``, or ``None`` each when disabled."""
    return [ShortConvolution(d, size, activation="silu") if use else None for d in dims]


def apply_short_convs(convs: tuple[ShortConvolution | None, ...], xs: tuple[Tensor, ...],
                      tails: tuple[Tensor | None, ...], cu_seqlens: Tensor | None, *, step: bool,
                      silu_without_conv: bool) -> tuple[list[Tensor], list[Tensor | None]]:
    """Run each stream (``[B, T, C]``, or ``[B, C]`` when ``step``) through its conv, carrying its tail.

    Without convs the streams pass through SiLU (or unchanged) and the tails stay ``None``.
    """
    outs, new_tails = [], []
    for conv, x, tail in zip(convs, xs, tails):
        if conv is None:
            y = F.silu(x) if silu_without_conv else x
        else:
            y, tail = conv.step(x, tail) if step else conv(x, tail, cu_seqlens)
        outs.append(y)
        new_tails.append(tail)
    return outs, new_tails


def chunked_memory_flops(n_heads: int, head_k: int, head_v: int, chunk_size: int, seq_len: int,
                         wy: bool = False) -> int:
    """Training FLOPs per token of a chunked matrix-memory op beyond the layer's projections.

    Per head: reading and writing the [K, V] chunk state (two K x V products), the intra-chunk
    attention over up to ``chunk_size`` keys (q.k and A.v), and with ``wy`` the delta rule's
    k.k products of the WY transform; x3 for forward + backward.
    """
    c = min(chunk_size, seq_len)
    per_head = 2 * 2 * head_k * head_v + 2 * c * (head_k + head_v) + (2 * c * head_k if wy else 0)
    return 3 * n_heads * per_head


def needs_grad(module: nn.Module, *tensors: Tensor | None) -> bool:
    """Whether autograd must see this call: the fused recurrent kernels have no backward."""
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors) or any(p.requires_grad for p in module.parameters())


class GatedDeltaNet(Mixer):
    """Gated DeltaNet token mixer: multi-head delta-rule memory with a Mamba-2 decay and an output gate."""

    config_class = GatedDeltaNetConfig

    def __init__(self, config: GatedDeltaNetConfig | None = None, /, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        c = self.config
        self.n_heads, self.head_k, self.head_v = c.n_heads, c.head_k, c.head_v
        key_dim, value_dim = c.n_heads * c.head_k, c.n_heads * c.head_v
        self.q_proj = nn.Linear(c.d_model, key_dim, bias=False)
        self.k_proj = nn.Linear(c.d_model, key_dim, bias=False)
        self.v_proj = nn.Linear(c.d_model, value_dim, bias=False)
        self.a_proj = nn.Linear(c.d_model, c.n_heads, bias=False)
        self.b_proj = nn.Linear(c.d_model, c.n_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(c.n_heads))
        self.dt_bias = nn.Parameter(torch.empty(c.n_heads))
        # Decay parameters are not shrunk by weight decay (the trainer reads this flag).
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        self.q_conv, self.k_conv, self.v_conv = short_convs(c.use_short_conv, (key_dim, key_dim, value_dim),
                                                            c.conv_size)
        self.g_proj = nn.Linear(c.d_model, value_dim, bias=False) if c.use_gate else None
        self.o_norm = GatedRMSNorm(c.head_v, c.norm_eps)
        self.o_proj = nn.Linear(value_dim, c.d_model, bias=False)
        self.reset_decay_parameters()

    @torch.no_grad()
    def reset_decay_parameters(self) -> None:
        """Mamba-2's init: A ~ U(0, 16), dt ~ log-U[1e-3, 1e-1] stored through the inverse softplus."""
        A = torch.empty_like(self.A_log, dtype=torch.float32).uniform_(*_A_INIT_RANGE).clamp_min(1e-4)
        self.A_log.copy_(A.log())
        u = torch.rand_like(self.dt_bias, dtype=torch.float32)
        dt = torch.exp(u * (math.log(_DT_MAX) - math.log(_DT_MIN)) + math.log(_DT_MIN)).clamp_min(_DT_FLOOR)
        # softplus(dt_bias) = dt  <=>  dt_bias = dt + log(1 - exp(-dt)).
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def init_state(self, batch_size: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> GatedDeltaState:
        tails = (
            None if conv is None else conv.init_tail(batch_size, device=device, dtype=dtype)
            for conv in (self.q_conv, self.k_conv, self.v_conv)
        )
        memory = torch.zeros(batch_size, self.n_heads, self.head_k, self.head_v, device=device, dtype=torch.float32)
        return GatedDeltaState(*tails, memory)

    def state_size(self, seq_len: int | None = None) -> int:
        """Floats of the delta-rule memory, H * K * V per sequence; the short-conv tails
        (3 * (W - 1) channels' worth of recent inputs) are not counted."""
        return self.n_heads * self.head_k * self.head_v

    def extra_flops_per_token(self, seq_len: int) -> int:
        return chunked_memory_flops(self.n_heads, self.head_k, self.head_v, self.config.chunk_size, seq_len, wy=True)

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Log-decay g <= 0 and write strength beta in (0, 1), both fp32 ``[B, T, H]``."""
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        beta = torch.sigmoid(self.b_proj(x).float())
        return g, beta

    def _forward(self, x: Tensor, state: GatedDeltaState | None, *,
                 cu_seqlens: Tensor | None) -> tuple[Tensor, GatedDeltaState]:
        return self._mix(x, state, cu_seqlens, step=False)

    def _step(self, x_t: Tensor, state: GatedDeltaState | None) -> tuple[Tensor, GatedDeltaState]:
        y, state = self._mix(x_t[:, None], state, None, step=True)
        return y[:, 0], state

    def _mix(self, x: Tensor, state: GatedDeltaState | None, cu_seqlens: Tensor | None,
             *, step: bool) -> tuple[Tensor, GatedDeltaState]:
        B, T, _ = x.shape
        H, K, V = self.n_heads, self.head_k, self.head_v
        tails = (None,) * 3 if state is None else state[:3]
        convs = (self.q_conv, self.k_conv, self.v_conv)
        qkv = (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        if step:
            qkv = tuple(t[:, 0] for t in qkv)
        (q, k, v), new_tails = apply_short_convs(convs, qkv, tails, cu_seqlens, step=step, silu_without_conv=True)
        g, beta = self.gates(x)
        memory = None if state is None else state.memory.float()
        # The fused recurrent kernel is the decoding path; it has no backward, so training steps use the chunk op.
        op = fused_recurrent_gated_delta_rule if step and not needs_grad(self, x, memory) else chunk_gated_delta_rule
        o, memory = op(
            q.reshape(B, T, H, K), k.reshape(B, T, H, K), v.reshape(B, T, H, V), g, beta,
            initial_state=memory, output_final_state=True, cu_seqlens=cu_seqlens, use_qk_l2norm=True,
            impl=self.config.impl, chunk_size=self.config.chunk_size,
        )  # [B, T, H, V], [N, H, K, V]
        gate = None if self.g_proj is None else self.g_proj(x).view(B, T, H, V)
        y = self.o_proj(self.o_norm(o, gate).reshape(B, T, H * V))
        return y, GatedDeltaState(*new_tails, memory)
