"""Pieces shared by the linear-memory mixers (Gated DeltaNet, GLA, MoM, Titans).

Head sizes of a config, the per-head gated RMSNorm in front of ``o_proj``, the q/k/v short convolutions,
Mamba-2's decay initialisation, the FLOP count of a chunked matrix memory, and ``QKVMemoryMixer``: the
skeleton of a layer that projects q/k/v, runs one chunked op over an fp32 ``[H, K, V]`` memory and reads it
out through the gated norm (Gated DeltaNet and GLA differ only in their gates and op).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..contract import Mixer
from ..init import residual_output
from .conv import ShortConvolution

__all__ = [
    "HeadDims", "GatedRMSNorm", "short_convs", "apply_short_convs", "chunked_memory_flops", "needs_grad",
    "init_mamba2_decay", "QKVMemoryState", "QKVMemoryMixer",
]

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

    def check_head_dims(self) -> None:
        """Raise a ``ValueError`` unless the heads split into positive whole widths (for ``__post_init__``)."""
        if self.d_model <= 0 or self.n_heads <= 0:
            raise ValueError(f"d_model and n_heads must be positive, got {self.d_model}, {self.n_heads}")
        if self.d_head is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads} (or set d_head)")
        if self.head_k <= 0:
            raise ValueError(f"d_head must be positive, got {self.head_k}")
        if self.expand_v <= 0 or self.expand_v * self.head_k != self.head_v:
            raise ValueError(f"expand_v={self.expand_v} times d_head={self.head_k} must be a positive integer")


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


@torch.no_grad()
def init_mamba2_decay(A_log: Tensor, dt_bias: Tensor) -> None:
    """Mamba-2's decay init in place: A ~ U(0, 16) stored as log A, dt ~ log-U[1e-3, 1e-1] stored through the
    inverse softplus (the layer computes g = -exp(A_log) * softplus(a + dt_bias))."""
    A = torch.empty_like(A_log, dtype=torch.float32).uniform_(*_A_INIT_RANGE).clamp_min(1e-4)
    A_log.copy_(A.log())
    u = torch.rand_like(dt_bias, dtype=torch.float32)
    dt = torch.exp(u * (math.log(_DT_MAX) - math.log(_DT_MIN)) + math.log(_DT_MIN)).clamp_min(_DT_FLOOR)
    # softplus(dt_bias) = dt  <=>  dt_bias = dt + log(1 - exp(-dt)).
    dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))


class QKVMemoryState(NamedTuple):
    """The state of a ``QKVMemoryMixer``; each layer subclasses it so that another layer's state is refused."""

    conv_q: Tensor | None  # [B, W-1, H*K] last inputs of the q conv (None without short conv)
    conv_k: Tensor | None  # [B, W-1, H*K]
    conv_v: Tensor | None  # [B, W-1, H*V]
    memory: Tensor  # [B, H, K, V] fp32


class QKVMemoryMixer(Mixer):
    """A mixer that projects q/k/v (optionally through short convs), runs one op over an fp32 memory
    ``[B, H, K, V]`` and returns ``o_proj(GatedRMSNorm(o) * SiLU(g_proj(x)))``.

    Subclasses call ``build_qkv`` then ``build_out`` in ``__init__`` and implement ``recur``: the op on the
    head-split q/k/v.  Class attributes: ``state_class``, a subclass of ``QKVMemoryState``, and
    ``silu_without_conv``, whether q/k/v pass through SiLU when there are no convs.
    """

    state_class: ClassVar[type[QKVMemoryState]]
    silu_without_conv: ClassVar[bool]

    def build_qkv(self, key_dim: int, value_dim: int) -> None:
        """The q/k/v projections (widths over all heads); call ``build_out`` after the layer's gate parameters."""
        c = self.config
        self.n_heads, self.head_k, self.head_v = c.n_heads, key_dim // c.n_heads, value_dim // c.n_heads
        self.q_proj = nn.Linear(c.d_model, key_dim, bias=False)
        self.k_proj = nn.Linear(c.d_model, key_dim, bias=False)
        self.v_proj = nn.Linear(c.d_model, value_dim, bias=False)

    def build_out(self, *, use_short_conv: bool, conv_size: int, use_gate: bool, norm_eps: float) -> None:
        """The short convs on q/k/v, the output gate, the per-head norm and ``o_proj``."""
        key_dim, value_dim = self.n_heads * self.head_k, self.n_heads * self.head_v
        self.q_conv, self.k_conv, self.v_conv = short_convs(use_short_conv, (key_dim, key_dim, value_dim), conv_size)
        self.g_proj = nn.Linear(self.d_model, value_dim, bias=False) if use_gate else None
        self.o_norm = GatedRMSNorm(self.head_v, norm_eps)
        self.o_proj = residual_output(nn.Linear(value_dim, self.d_model, bias=False))

    def init_state(self, batch_size: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> Any:
        tails = (
            None if conv is None else conv.init_tail(batch_size, device=device, dtype=dtype)
            for conv in (self.q_conv, self.k_conv, self.v_conv)
        )
        memory = torch.zeros(batch_size, self.n_heads, self.head_k, self.head_v, device=device, dtype=torch.float32)
        return self.state_class(*tails, memory)

    def state_size(self, seq_len: int | None = None) -> int:
        """Floats of the matrix memory, H * K * V per sequence; the short-conv tails (3 * (W - 1) channels'
        worth of recent inputs) are not counted."""
        return self.n_heads * self.head_k * self.head_v

    def recur(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, memory: Tensor | None, cu_seqlens: Tensor | None,
              *, step: bool) -> tuple[Tensor, Tensor]:
        """The memory op on ``q, k [B, T, H, K]``, ``v [B, T, H, V]`` (gates come from ``x [B, T, D]``) from
        ``memory`` (fp32 ``[N, H, K, V]`` or None); returns ``o [B, T, H, V]`` and the final memory."""
        raise NotImplementedError

    def _forward(self, x: Tensor, state: Any, *, cu_seqlens: Tensor | None) -> tuple[Tensor, Any]:
        return self._mix(x, state, cu_seqlens, step=False)

    def _step(self, x_t: Tensor, state: Any) -> tuple[Tensor, Any]:
        y, state = self._mix(x_t[:, None], state, None, step=True)
        return y[:, 0], state

    def _mix(self, x: Tensor, state: Any, cu_seqlens: Tensor | None, *, step: bool) -> tuple[Tensor, Any]:
        B, T, _ = x.shape
        H, K, V = self.n_heads, self.head_k, self.head_v
        tails = (None,) * 3 if state is None else state[:3]
        convs = (self.q_conv, self.k_conv, self.v_conv)
        qkv = (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        if step:
            qkv = tuple(t[:, 0] for t in qkv)
        (q, k, v), new_tails = apply_short_convs(convs, qkv, tails, cu_seqlens, step=step,
                                                 silu_without_conv=self.silu_without_conv)
        memory = None if state is None else state.memory.float()
        o, memory = self.recur(x, q.reshape(B, T, H, K), k.reshape(B, T, H, K), v.reshape(B, T, H, V), memory,
                               cu_seqlens, step=step)  # [B, T, H, V], [N, H, K, V]
        gate = None if self.g_proj is None else self.g_proj(x).view(B, T, H, V)
        y = self.o_proj(self.o_norm(o, gate).reshape(B, T, H * V))
        return y, self.state_class(*new_tails, memory)
