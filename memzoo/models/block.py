"""The pre-norm residual block shared by every memzoo model: x + mixer(norm(x)), x + mlp(norm(x))."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .contract import Mixer
from .init import residual_output

__all__ = ["RMSNorm", "SwiGLU", "Block", "FFN_KINDS", "build_ffn"]


class RMSNorm(nn.Module):
    """Root-mean-square norm (arXiv 1910.07467): x / rms(x) * weight, computed in fp32."""

    def __init__(self, d_model: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class SwiGLU(nn.Module):
    """Gated MLP (arXiv 2002.05202): down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = residual_output(nn.Linear(d_ff, d_model, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# The kinds of channel mixer (the ``Block``'s MLP slot) that ``ModelConfig.ffn`` names.
FFN_KINDS = ("swiglu", "dkvb")


def build_ffn(kind: str, d_model: int, d_ff: int, opts: dict[str, Any] | None = None) -> nn.Module:
    """The channel mixer ``kind``: ``"swiglu"`` (width ``d_ff``, no options) or ``"dkvb"`` (a discrete key-value
    bottleneck per token, ``opts`` are ``DKVBConfig`` fields; see ``memzoo.models.wrappers.dkvb``)."""
    if kind == "swiglu":
        if opts:
            raise ValueError(f"ffn_opts apply to ffn='dkvb' only, got {sorted(opts)} for ffn='swiglu'")
        return SwiGLU(d_model, d_ff)
    if kind == "dkvb":
        from .wrappers.dkvb import DKVBFeedForward

        return DKVBFeedForward(d_model, **(opts or {}))
    raise ValueError(f"ffn must be one of {FFN_KINDS}, got {kind!r}")


class Block(nn.Module):
    """Pre-norm residual block around one token mixer and an optional channel mixer (``d_ff=0``: none): a SwiGLU
    MLP, or with ``ffn="dkvb"`` a discrete key-value bottleneck (``build_ffn``)."""

    def __init__(self, mixer: Mixer, d_ff: int, norm_eps: float = 1e-5, *, ffn: str = "swiglu",
                 ffn_opts: dict[str, Any] | None = None) -> None:
        super().__init__()
        d = mixer.d_model
        self.mixer_norm = RMSNorm(d, norm_eps)
        self.mixer = mixer
        self.mlp_norm = RMSNorm(d, norm_eps) if d_ff else None
        self.mlp = build_ffn(ffn, d, d_ff, ffn_opts) if d_ff else None

    def forward(self, x: Tensor, state: Any = None, *, cu_seqlens: Tensor | None = None,
                **mixer_kwargs: Any) -> tuple[Tensor, Any]:
        """``mixer_kwargs`` go to the mixer (e.g. ``bank=`` for a ``MemoryAugmentedAttention``)."""
        y, state = self.mixer(self.mixer_norm(x), state, cu_seqlens=cu_seqlens, **mixer_kwargs)
        return self._mlp(x + y), state

    def step(self, x_t: Tensor, state: Any) -> tuple[Tensor, Any]:
        """One token ``[B, D]`` through the mixer's exact ``step``."""
        y, state = self.mixer.step(self.mixer_norm(x_t), state)
        return self._mlp(x_t + y), state

    def _mlp(self, x: Tensor) -> Tensor:
        return x if self.mlp is None else x + self.mlp(self.mlp_norm(x))
