"""Causal softmax attention: the baseline every memory layer in the zoo is compared with.

"Attention Is All You Need" (arXiv 1706.03762) with rotary positions (RoFormer, arXiv 2104.09864),
grouped-query heads (GQA, arXiv 2305.13245) and an optional sliding window (Longformer,
arXiv 2004.05150):

    o_t = sum_{s : 0 <= t - s < W} softmax_s(q_t . k_s / sqrt(d_head)) v_s        (W = inf: full causal)

The state is a KV cache of rotated keys and values with the absolute position of every slot
(-1 marks an empty slot), so chained segments, token-by-token decoding, packed sequences and
sliding windows all reduce to one visibility rule: key s is visible to query t iff
``0 <= pos_t - pos_s < W``.  Backend: flash-attn for fp16/bf16 on CUDA when installed (the
state-free and packed paths), otherwise ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..contract import Mixer
from ..init import residual_output
from ..rope import apply_rope, positions_from_cu_seqlens

__all__ = ["AttentionConfig", "AttentionState", "Attention"]

_BACKENDS = ("auto", "flash", "sdpa")


@dataclass(frozen=True)
class AttentionConfig:
    d_model: int = 256
    n_heads: int = 4
    # Key/value heads shared by groups of query heads: None = n_heads (MHA), 1 = multi-query.
    n_kv_heads: int | None = None
    # None = d_model // n_heads.
    d_head: int | None = None
    # Sliding window W: each token sees itself and the W - 1 tokens before it; None = full causal.
    window: int | None = None
    # Rotary base; None disables rotary embeddings (positions then come from outside, or none).
    rope_theta: float | None = 10_000.0
    bias: bool = False
    # Dropout on attention probabilities, training only.
    dropout: float = 0.0
    # "auto": flash-attn on CUDA fp16/bf16 when installed, else SDPA; "flash" | "sdpa" force one.
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.d_model <= 0 or self.n_heads <= 0:
            raise ValueError(f"d_model and n_heads must be positive, got {self.d_model}, {self.n_heads}")
        kv = self.kv_heads
        if kv <= 0 or self.n_heads % kv:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must be positive and divide n_heads={self.n_heads}")
        if self.d_head is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads} (or set d_head)")
        if self.head_dim <= 0 or (self.rope_theta is not None and self.head_dim % 2):
            raise ValueError(f"d_head={self.head_dim} must be positive, and even when rotary embeddings are on")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be None or >= 1, got {self.window}")
        if self.rope_theta is not None and self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be positive or None, got {self.rope_theta}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads if self.d_head is None else self.d_head


class AttentionState(NamedTuple):
    k: Tensor  # [B, L, H_kv, D_h] rotated keys of the cached tokens
    v: Tensor  # [B, L, H_kv, D_h]
    pos_k: Tensor  # [B, L] int64 absolute position of each slot, -1 = empty
    pos: Tensor  # [B] int64 position of the next token


# Looked up once at import (cheap: no import of flash-attn itself), so torch.compile sees a constant.
_HAS_FLASH = importlib.util.find_spec("flash_attn") is not None


def _flash_attn() -> Any:
    import flash_attn

    return flash_attn


class Attention(Mixer):
    """Causal multi-head attention with RoPE, GQA, sliding window and a KV-cache state."""

    config_class = AttentionConfig

    def __init__(self, config: AttentionConfig | None = None, /, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        c = self.config
        self.n_heads, self.n_kv_heads, self.d_head = c.n_heads, c.kv_heads, c.head_dim
        self.window = c.window
        self.q_proj = nn.Linear(c.d_model, self.n_heads * self.d_head, bias=c.bias)
        self.k_proj = nn.Linear(c.d_model, self.n_kv_heads * self.d_head, bias=c.bias)
        self.v_proj = nn.Linear(c.d_model, self.n_kv_heads * self.d_head, bias=c.bias)
        self.o_proj = residual_output(nn.Linear(self.n_heads * self.d_head, c.d_model, bias=c.bias))

    def init_state(self, batch_size: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> AttentionState:
        kv = torch.zeros(batch_size, 0, self.n_kv_heads, self.d_head, device=device, dtype=dtype)
        return AttentionState(
            k=kv, v=kv.clone(),
            pos_k=torch.zeros(batch_size, 0, device=device, dtype=torch.int64),
            pos=torch.zeros(batch_size, device=device, dtype=torch.int64),
        )

    def state_size(self, seq_len: int | None = None) -> int:
        if self.window is not None:
            slots = self.window - 1 if seq_len is None else min(seq_len, self.window - 1)
        elif seq_len is None:
            raise ValueError("Attention.state_size needs seq_len: its KV cache grows with the context")
        else:
            slots = seq_len
        return 2 * self.n_kv_heads * self.d_head * slots

    def extra_flops_per_token(self, seq_len: int) -> int:
        # q.k and p.v: 2 matmuls x 2 FLOPs x H x d_head per visible key, x3 for forward + backward
        # (the usual 12 H d T convention, without the causal discount).
        keys = seq_len if self.window is None else min(seq_len, self.window)
        return 12 * self.n_heads * self.d_head * keys

    def reset_state(self, state: AttentionState, mask: Tensor) -> AttentionState:
        if mask.dim() != 1 or mask.dtype != torch.bool or mask.shape[0] != state.pos.shape[0]:
            raise ValueError(f"mask must be a bool tensor [B={state.pos.shape[0]}], got {tuple(mask.shape)}")
        return state._replace(
            pos_k=state.pos_k.masked_fill(mask[:, None], -1), pos=state.pos.masked_fill(mask, 0)
        )

    def _forward(self, x: Tensor, state: AttentionState | None, *,
                 cu_seqlens: Tensor | None) -> tuple[Tensor, AttentionState]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.d_head)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.d_head)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.d_head)
        if cu_seqlens is not None:
            if state is not None:
                raise ValueError("Attention does not take an initial state together with cu_seqlens")
            doc, pos = positions_from_cu_seqlens(cu_seqlens, T)
            q, k = self._rope(q, pos[None]), self._rope(k, pos[None])
            o = self._attend_packed(q, k, v, cu_seqlens, doc)
            new_state = self._packed_state(k, v, cu_seqlens, pos)
        else:
            pos0 = state.pos if state is not None else torch.zeros(B, dtype=torch.int64, device=x.device)
            pos_q = pos0[:, None] + torch.arange(T, device=x.device)  # [B, T]
            q, k = self._rope(q, pos_q), self._rope(k, pos_q)
            if state is None or state.k.shape[1] == 0:
                # Nothing cached: plain causal attention inside the chunk (the fast path).
                o = self._attend_causal(q, k, v)
                k_all, v_all, pos_all = k, v, pos_q
            else:
                k_all = torch.cat((state.k.to(k.dtype), k), dim=1)  # [B, L+T, H_kv, D_h]
                v_all = torch.cat((state.v.to(v.dtype), v), dim=1)
                pos_all = torch.cat((state.pos_k, pos_q), dim=1)  # [B, L+T]
                o = self._sdpa(q, k_all, v_all, mask=self._visible(pos_q, pos_all)[:, None])
            new_state = self._trim(AttentionState(k_all, v_all, pos_all, pos_q[:, -1] + 1))
        return self.o_proj(o.reshape(B, T, self.n_heads * self.d_head)), new_state

    def _rope(self, x: Tensor, positions: Tensor) -> Tensor:
        theta = self.config.rope_theta
        return x if theta is None else apply_rope(x, positions, theta)

    def _visible(self, pos_q: Tensor, pos_k: Tensor) -> Tensor:
        """``[..., T, S]`` bool: key s is visible to query t (causal, in window, slot not empty)."""
        dist = pos_q[..., :, None] - pos_k[..., None, :]
        mask = (pos_k[..., None, :] >= 0) & (dist >= 0)
        if self.window is not None:
            mask &= dist < self.window
        return mask

    def _dropout_p(self) -> float:
        return self.config.dropout if self.training else 0.0

    def _use_flash(self, q: Tensor) -> bool:
        backend = self.config.backend
        if backend == "sdpa":
            return False
        ok = _HAS_FLASH and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        if backend == "flash" and not ok:
            raise RuntimeError(
                "Attention(backend='flash') needs flash-attn installed and fp16/bf16 CUDA inputs, "
                f"got device={q.device} dtype={q.dtype}, flash-attn installed={_HAS_FLASH}"
            )
        return ok and self.d_head <= 256

    def _flash_window(self) -> tuple[int, int]:
        return (-1, -1) if self.window is None else (self.window - 1, 0)

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None,
              is_causal: bool = False) -> Tensor:
        """SDPA on ``[B, T, H, D]`` tensors; ``mask`` is bool, true = attend."""
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            dropout_p=self._dropout_p(), is_causal=is_causal, scale=1.0 / math.sqrt(self.d_head),
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return o.transpose(1, 2)

    def _attend_causal(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self._use_flash(q):
            return _flash_attn().flash_attn_func(
                q, k, v, dropout_p=self._dropout_p(), softmax_scale=1.0 / math.sqrt(self.d_head),
                causal=True, window_size=self._flash_window(),
            )
        if self.window is None:
            return self._sdpa(q, k, v, is_causal=True)
        t = torch.arange(q.shape[1], device=q.device)
        return self._sdpa(q, k, v, mask=self._visible(t, t))

    def _attend_packed(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, doc: Tensor) -> Tensor:
        if self._use_flash(q):
            cu = cu_seqlens.to(torch.int32)
            max_len = int((cu[1:] - cu[:-1]).max())
            o = _flash_attn().flash_attn_varlen_func(
                q[0], k[0], v[0], cu, cu, max_len, max_len, dropout_p=self._dropout_p(),
                softmax_scale=1.0 / math.sqrt(self.d_head), causal=True, window_size=self._flash_window(),
            )
            return o[None]
        t = torch.arange(q.shape[1], device=q.device)
        mask = self._visible(t, t) & (doc[:, None] == doc[None, :])  # [T, T]
        return self._sdpa(q, k, v, mask=mask)

    def _packed_state(self, k: Tensor, v: Tensor, cu_seqlens: Tensor, pos: Tensor) -> AttentionState:
        """One right-aligned cache row per packed sequence, gathered without a host sync."""
        T = k.shape[1]
        keep = T if self.window is None else min(T, self.window - 1)
        cu = cu_seqlens.to(torch.int64)
        starts, ends = cu[:-1], cu[1:]  # [N]
        src = ends[:, None] - keep + torch.arange(keep, device=k.device)  # [N, keep]
        valid = src >= starts[:, None]
        src = src.clamp(min=0)
        fill = valid[:, :, None, None]
        return AttentionState(
            k=torch.where(fill, k[0][src], 0), v=torch.where(fill, v[0][src], 0),
            pos_k=torch.where(valid, pos[src], -1), pos=ends - starts,
        )

    def _trim(self, state: AttentionState) -> AttentionState:
        """Keep only the W - 1 newest slots: all the next query can see."""
        if self.window is None or state.k.shape[1] <= self.window - 1:
            return state
        start = state.k.shape[1] - (self.window - 1)
        return AttentionState(state.k[:, start:], state.v[:, start:], state.pos_k[:, start:], state.pos)
