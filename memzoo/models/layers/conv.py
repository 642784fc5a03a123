"""Short causal depthwise convolution: the local token mixing in front of linear-attention layers.

Used on the q/k/v streams of Gated DeltaNet, GLA, Mamba-2 and friends ("Gated Delta Networks:
Improving Mamba2 with Delta Rule", arXiv 2412.06464).  Channel c of the output is

    y_t[c] = act( sum_{j=0}^{W-1} w[c, j] x_{t-W+1+j}[c] + b[c] )        (x_s = 0 before the sequence start)

The carried state ("tail") is the last W - 1 inputs, right-aligned, so that feeding a sequence in
pieces of any length (also shorter than W - 1) equals one pass.  With packed sequences
(``cu_seqlens``) the window never reaches across a boundary and the tail is one row per sequence.
Everything is vectorised over W shifted copies of the input; there is no per-sequence Python loop
and no host synchronisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...kernels.utils import seq_boundaries

__all__ = ["ShortConvolution"]

_ACTIVATIONS = (None, "silu")


class ShortConvolution(nn.Module):
    """Depthwise causal conv1d over ``[B, T, C]`` with kernel size ``kernel_size`` and a carried tail.

    Args:
        channels: C, the number of channels (each convolved with its own kernel).
        kernel_size: W, the window length including the current token.
        activation: ``"silu"`` or ``None``.
        bias: add a learned per-channel bias before the activation.
    """

    def __init__(self, channels: int, kernel_size: int = 4, activation: str | None = "silu",
                 bias: bool = False) -> None:
        super().__init__()
        if channels <= 0 or kernel_size <= 0:
            raise ValueError(f"channels and kernel_size must be positive, got {channels}, {kernel_size}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
        self.channels, self.kernel_size, self.activation = channels, kernel_size, activation
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))  # [C, W], w[:, -1] hits the current token
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The init nn.Conv1d uses for a depthwise kernel (fan-in = W).
        bound = 1.0 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"{self.channels}, kernel_size={self.kernel_size}, activation={self.activation}, bias={bias}"

    def init_tail(self, batch_size: int, *, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> Tensor:
        """Zeros ``[batch_size, W-1, C]``: the tail of fresh sequences."""
        return torch.zeros(batch_size, self.kernel_size - 1, self.channels, device=device, dtype=dtype)

    def forward(self, x: Tensor, tail: Tensor | None = None,
                cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Convolve a sequence (or packed sequences) and return the tail that continues it.

        Args:
            x: ``[B, T, C]``.
            tail: ``None`` (fresh) or ``[N, W-1, C]``, the last W - 1 inputs of each sequence
                (N = B, or the number of packed sequences with ``cu_seqlens``).
            cu_seqlens: optional ``[N+1]`` int offsets of packed sequences (B must be 1).

        Returns:
            ``(y [B, T, C] in x's dtype, new_tail [N, W-1, C])``; rows of sequences shorter than
            W - 1 are completed from ``tail`` (zeros when fresh).
        """
        B, T, C = x.shape
        W = self.kernel_size
        n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
        if C != self.channels or T == 0:
            raise ValueError(f"x must be [B, T >= 1, C={self.channels}], got {tuple(x.shape)}")
        if tail is not None and tuple(tail.shape) != (n_seq, W - 1, C):
            raise ValueError(f"tail must be [N={n_seq}, W-1={W - 1}, C={C}], got {tuple(tail.shape)}")
        if tail is not None:
            tail = tail.to(x.dtype)
        if cu_seqlens is None:
            xx = torch.cat((tail if tail is not None else x.new_zeros(B, W - 1, C), x), dim=1)  # [B, W-1+T, C]
            # Shift d pairs token t with input t - d, read from the tail when t - d < 0.
            shifted = [xx[:, W - 1 - d:W - 1 - d + T] for d in range(W)]
            return self._combine(shifted, x.dtype), xx[:, T:]
        return self._forward_packed(x, tail, cu_seqlens)

    def _forward_packed(self, x: Tensor, tail: Tensor | None, cu_seqlens: Tensor) -> tuple[Tensor, Tensor]:
        _, T, C = x.shape
        W = self.kernel_size
        if x.shape[0] != 1:
            raise ValueError(f"with cu_seqlens the batch must be packed into B=1, got {tuple(x.shape)}")
        seq, pos = seq_boundaries(cu_seqlens, T)  # [T], [T]: sequence of each token, position inside it
        flat = x[0]  # [T, C]
        shifted = [flat]
        for d in range(1, W):
            prev = F.pad(flat, (0, 0, d, 0))[:T]  # [T, C]: input t - d of the packed stream
            inside = (pos >= d)[:, None]
            if tail is None:
                shifted.append(torch.where(inside, prev, 0.0))
            else:
                # Before its sequence start, token t - d is slot W - 1 + pos - d of that sequence's tail.
                from_tail = tail[seq, (W - 1 + pos - d).clamp(min=0, max=W - 2)]  # [T, C]
                shifted.append(torch.where(inside, prev, from_tail))
        y = self._combine([s[None] for s in shifted], x.dtype)
        cu = cu_seqlens.to(torch.int64)
        starts, ends = cu[:-1], cu[1:]  # [N]
        offsets = torch.arange(W - 1, device=x.device)
        src = ends[:, None] - (W - 1) + offsets  # [N, W-1] packed index of each tail slot
        inside = (src >= starts[:, None])[:, :, None]
        prev = flat[src.clamp(min=0, max=max(T - 1, 0))]  # [N, W-1, C]
        if tail is None:
            new_tail = torch.where(inside, prev, 0.0)
        else:
            # A sequence shorter than W - 1 keeps the newest part of its incoming tail in front.
            keep = (ends - starts)[:, None] + offsets  # [N, W-1]
            new_tail = torch.where(inside, prev, tail.gather(1, keep.clamp(max=W - 2)[:, :, None].expand(-1, -1, C)))
        return y, new_tail

    def _combine(self, shifted: list[Tensor], dtype: torch.dtype) -> Tensor:
        """``act(sum_d w[:, W-1-d] * shifted[d] + b)``; the same summation order on every path."""
        W = self.kernel_size
        w = self.weight.to(dtype)
        y = shifted[0] * w[:, W - 1]
        for d in range(1, W):
            y = y + shifted[d] * w[:, W - 1 - d]
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return F.silu(y) if self.activation == "silu" else y

    def step(self, x_t: Tensor, tail: Tensor | None) -> tuple[Tensor, Tensor]:
        """One token per row: ``x_t`` ``[B, C]``, ``tail`` ``[B, W-1, C]`` -> ``(y_t [B, C], new_tail)``."""
        B, C = x_t.shape
        W = self.kernel_size
        if tail is None:
            tail = self.init_tail(B, device=x_t.device, dtype=x_t.dtype)
        window = torch.cat((tail.to(x_t.dtype), x_t[:, None]), dim=1)  # [B, W, C], oldest first
        y = self._combine([window[:, W - 1 - d] for d in range(W)], x_t.dtype)
        return y, window[:, 1:]
