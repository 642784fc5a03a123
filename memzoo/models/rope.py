"""Rotary position embeddings (RoFormer, arXiv 2104.09864), half-split ("NeoX") layout.

For a head vector split into halves (x1, x2) and frequencies w_i = theta^(-2i/d):
    rope(x, p) = [x1 * cos(p w) - x2 * sin(p w),  x2 * cos(p w) + x1 * sin(p w)]
so <rope(q, p), rope(k, s)> depends on p - s only.  Positions are explicit per token, which lets
cached decoding, chained segments and packed sequences (positions restart per document) share
one code path.  The tables are computed on the fly (no buffers: meta-device friendly).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["apply_rope", "positions_from_cu_seqlens"]


def apply_rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotate ``x`` by its positions.

    Args:
        x: ``[B, T, H, D]`` with D even.
        positions: ``[B, T]`` (or ``[1, T]``) integer positions.
        theta: the base of the frequency ladder.

    Returns:
        ``[B, T, H, D]`` in the dtype of ``x``; the rotation is computed in fp32.
    """
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)  # [D/2]
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos, sin = angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]  # [B, T, 1, D/2]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def positions_from_cu_seqlens(cu_seqlens: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """Per-token document index and position inside its document, without a host sync.

    Args:
        cu_seqlens: ``[N+1]`` offsets, ``cu_seqlens[0] == 0`` and ``cu_seqlens[-1] == seq_len``.

    Returns:
        ``(doc [T], pos [T])``, both int64.
    """
    t = torch.arange(seq_len, device=cu_seqlens.device)
    cu = cu_seqlens.to(torch.int64)
    doc = torch.bucketize(t, cu[1:], right=True)  # [T]
    return doc, t - cu[doc]
