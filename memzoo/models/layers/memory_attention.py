"""Memory-augmented attention: local causal attention plus attention over retrieved past keys/values.

The SideNet memory layer of LongMem ("Augmenting Language Models with Long-Term Memory", Wang et al.,
arXiv 2306.07174).  For query t of head h, with K tokens retrieved from a memory bank:

    (1) A_loc = softmax(rope(q) rope(K_loc)^T / sqrt(d_h) + causal mask) V_loc          (as in ``Attention``)
    (2) A_mem = softmax_k(q . k_ret_k / sqrt(d_h)) v_ret                              (no positions: q un-rotated)
    (3) out   = W_o[(1 - sigma(g_h)) A_loc + sigma(g_h) A_mem]                        g_h = 0 at init

The retrieved keys/values are a frozen backbone's raw (un-rotated) layer-m k/v; the layer does not
re-project them.  A query with no valid retrieved token (empty bank) takes A_mem = 0 and weight 0, so
its output is exactly A_loc.  With grouped-query heads, query head h reads bank head h // (H / H_kv).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import Attention, AttentionConfig, AttentionState

__all__ = ["MemoryAugmentedAttention", "memory_attention"]


def memory_attention(q: Tensor, keys: Tensor, values: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """A_mem: each query attends over its own K retrieved tokens only, scale 1/sqrt(D).

    One SDPA call with the B*H rows as the batch, the T queries as "heads" and K keys each, so no
    ``[B, H, T, K]`` score tensor is built outside the kernel and CUDA grid limits are not hit by B*H*T.
    It runs in the promoted dtype of ``q`` and ``keys`` (bf16 models stay bf16; SDPA accumulates in fp32).

    Args:
        q: ``[B, H, T, D]`` un-rotated queries.
        keys, values: ``[B, H, T, K, D]`` the K tokens retrieved for each query.
        valid: ``[B, H, T, K]`` bool, true where a retrieved slot holds a real token.

    Returns:
        ``(A_mem [B, H, T, D], has_memory [B, H, T] bool)``; rows without a valid slot are exactly 0.
    """
    B, H, T, K, D = keys.shape
    dtype = torch.promote_types(q.dtype, keys.dtype)
    has_memory = valid.any(dim=-1)  # [B, H, T]
    # Rows with nothing valid attend to every slot (finite, no NaN); their output is zeroed below.
    mask = (valid | ~has_memory[..., None]).reshape(B * H, T, 1, K)
    out = F.scaled_dot_product_attention(
        q.to(dtype).reshape(B * H, T, 1, D), keys.to(dtype).reshape(B * H, T, K, D),
        values.to(dtype).reshape(B * H, T, K, D), attn_mask=mask, scale=1.0 / math.sqrt(D),
    )
    return out.reshape(B, H, T, D) * has_memory[..., None], has_memory


class MemoryAugmentedAttention(Attention):
    """``Attention`` whose heads also read retrieved memory, mixed by a per-head sigmoid gate.

    ``forward(x, state=None, *, retrieved=None, bank=None)``: pass either ``retrieved`` (an object with
    ``keys``/``values`` ``[B, H_kv, T, K, D]`` and ``valid`` ``[B, H_kv, T, K]``, e.g. a bank search
    result for the un-rotated queries of this layer) or ``bank`` (anything with ``search(q, n_chunks)``,
    queried here with this layer's un-rotated ``q_proj(x)``).  With neither, or with ``memory_off`` set,
    the layer is plain local ``Attention`` (the gate is forced to 0).  The local KV cache state is the
    ``Attention`` state, so within-segment decoding and chained calls work as for ``Attention``.

    After each call ``last_stats`` holds detached scalar tensors: the mean gate sigma(g), the memory mass
    (the mean over queries of sigma(g_h) for queries with a valid retrieved token; 0 without memory) and
    the fraction of queries with a valid retrieved token.
    """

    def __init__(self, config: AttentionConfig | None = None, /, n_chunks: int = 16, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        if n_chunks < 1:
            raise ValueError(f"n_chunks must be >= 1, got {n_chunks}")
        self.n_chunks = n_chunks
        # g_h: sigma(0) = 0.5, the paper's starting mix.
        self.gate = nn.Parameter(torch.zeros(self.n_heads))
        self.gate._no_weight_decay = True
        # Force the gate to 0 (local attention only): the memory-free baseline with the same parameters.
        self.memory_off = False
        self.last_stats: dict[str, Tensor] = {}

    @classmethod
    def from_attention(cls, attention: Attention, n_chunks: int = 16) -> MemoryAugmentedAttention:
        """A memory layer initialised from ``attention``: same config, q/k/v/o weights copied, gate 0."""
        if not isinstance(attention, Attention):
            raise TypeError(f"attention must be an Attention layer, got {type(attention).__name__}")
        ref = attention.q_proj.weight
        layer = cls(attention.config, n_chunks=n_chunks).to(device=ref.device, dtype=ref.dtype)
        missing, unexpected = layer.load_state_dict(attention.state_dict(), strict=False)
        if set(missing) != {"gate"} or unexpected:
            raise ValueError(f"cannot initialise from {type(attention).__name__}: missing {missing}, "
                             f"unexpected {unexpected}")
        with torch.no_grad():
            layer.gate.zero_()
        return layer

    def forward(self, x: Tensor, state: AttentionState | None = None, *, retrieved: Any = None, bank: Any = None,
                cu_seqlens: Tensor | None = None) -> tuple[Tensor, AttentionState]:
        """Mix ``x`` ``[B, T, D]``: local attention (carrying the KV cache ``state``) plus retrieved memory.

        Returns:
            ``(y [B, T, D], state)``.
        """
        if cu_seqlens is not None:
            raise ValueError("MemoryAugmentedAttention does not take cu_seqlens: memory is per batch row")
        if retrieved is not None and bank is not None:
            raise ValueError("pass at most one of retrieved and bank")
        self._check_x(x, "x", rank=3)
        self.check_state(state, x.shape[0], device=x.device)
        return self._mixed(x, state, retrieved, bank)

    def step(self, x_t: Tensor, state: AttentionState, *, retrieved: Any = None,
             bank: Any = None) -> tuple[Tensor, AttentionState]:
        """One token ``[B, D]``; exact, equal to ``forward`` on T = 1 (``retrieved`` shaped with T = 1)."""
        self._check_x(x_t, "x_t", rank=2)
        y, state = self.forward(x_t[:, None], state, retrieved=retrieved, bank=bank)
        return y[:, 0], state

    def _forward(self, x: Tensor, state: AttentionState | None, *,
                 cu_seqlens: Tensor | None) -> tuple[Tensor, AttentionState]:
        if cu_seqlens is not None:
            raise ValueError("MemoryAugmentedAttention does not take cu_seqlens: memory is per batch row")
        return self._mixed(x, state, None, None)

    def _mixed(self, x: Tensor, state: AttentionState | None, retrieved: Any,
               bank: Any) -> tuple[Tensor, AttentionState]:
        B, T, _ = x.shape
        H, H_kv, d = self.n_heads, self.n_kv_heads, self.d_head
        q_raw = self.q_proj(x).view(B, T, H, d)
        k = self.k_proj(x).view(B, T, H_kv, d)
        v = self.v_proj(x).view(B, T, H_kv, d)
        pos0 = state.pos if state is not None else torch.zeros(B, dtype=torch.int64, device=x.device)
        pos_q = pos0[:, None] + torch.arange(T, device=x.device)  # [B, T]
        q, k = self._rope(q_raw, pos_q), self._rope(k, pos_q)
        if state is None or state.k.shape[1] == 0:
            o = self._attend_causal(q, k, v)  # [B, T, H, d]
            k_all, v_all, pos_all = k, v, pos_q
        else:
            k_all = torch.cat((state.k.to(k.dtype), k), dim=1)
            v_all = torch.cat((state.v.to(v.dtype), v), dim=1)
            pos_all = torch.cat((state.pos_k, pos_q), dim=1)
            o = self._sdpa(q, k_all, v_all, mask=self._visible(pos_q, pos_all)[:, None])
        new_state = self._trim(AttentionState(k_all, v_all, pos_all, pos_q[:, -1] + 1))

        use_memory = not self.memory_off and (retrieved is not None or bank is not None)
        if use_memory:
            g = H // H_kv
            ct = torch.promote_types(x.dtype, torch.float32)
            if bank is not None:
                # Search with fp32 un-rotated queries, grouped under their bank head: [B, H_kv, g*T, d]
                # (query head h = kv * g + j reads bank head kv).
                q_mem = q_raw.detach().float().permute(0, 2, 1, 3).reshape(B, H_kv, g * T, d)
                retrieved = bank.search(q_mem, n_chunks=self.n_chunks)
            keys, values, valid = self._check_retrieved(retrieved, B, T)
            K = keys.shape[-2]
            if g > 1:
                keys = keys.reshape(B, H_kv, 1 if keys.shape[2] == T else g, T, K, d)
                values = values.reshape(B, H_kv, 1 if values.shape[2] == T else g, T, K, d)
                valid = valid.reshape(B, H_kv, 1 if valid.shape[2] == T else g, T, K)
                keys, values = keys.expand(B, H_kv, g, T, K, d), values.expand(B, H_kv, g, T, K, d)
                valid = valid.expand(B, H_kv, g, T, K)
            keys, values, valid = keys.reshape(B, H, T, K, d), values.reshape(B, H, T, K, d), valid.reshape(B, H, T, K)
            a_mem, has_memory = memory_attention(q_raw.transpose(1, 2), keys, values, valid)  # [B, H, T, d]
            weight = torch.sigmoid(self.gate.to(ct))[None, :, None] * has_memory  # [B, H, T]
            o_loc = o.transpose(1, 2).to(ct)  # [B, H, T, d]
            # (1 - w) A_loc + w A_mem written as A_loc + w (A_mem - A_loc): exactly A_loc where w = 0.
            o = (o_loc + weight[..., None] * (a_mem - o_loc)).transpose(1, 2).to(o.dtype)
            # Detached tensors, not floats: reading them is the caller's host sync, not every forward's.
            with torch.no_grad():
                self.last_stats = {"gate": torch.sigmoid(self.gate.detach().float()).mean(),
                                   "memory_mass": weight.detach().float().mean(),
                                   "retrieved_fraction": has_memory.float().mean()}
        else:
            zero = torch.zeros((), device=x.device)
            self.last_stats = {"gate": zero, "memory_mass": zero, "retrieved_fraction": zero}
        return self.o_proj(o.reshape(B, T, H * d)), new_state

    def _check_retrieved(self, retrieved: Any, B: int, T: int) -> tuple[Tensor, Tensor, Tensor]:
        """``keys``/``values`` ``[B, H_kv, T or g*T, K, d]``, ``valid`` ``[B, H_kv, T or g*T, K]``."""
        keys, values, valid = (getattr(retrieved, name, None) for name in ("keys", "values", "valid"))
        if not all(isinstance(t, Tensor) for t in (keys, values, valid)):
            raise TypeError("retrieved must have tensor fields keys, values and valid (a bank search result)")
        H_kv, d, g = self.n_kv_heads, self.d_head, self.n_heads // self.n_kv_heads
        ok = (keys.dim() == 5 and keys.shape[:2] == (B, H_kv) and keys.shape[2] in (T, g * T)
              and keys.shape[-1] == d and values.shape == keys.shape and valid.shape == keys.shape[:-1]
              and valid.dtype == torch.bool)
        if not ok:
            raise ValueError(f"retrieved keys/values must be [B={B}, H_kv={H_kv}, T={T} (or g*T={g * T}), K, "
                             f"d_head={d}] with a bool valid [B, H_kv, T, K], got keys {tuple(keys.shape)}, "
                             f"values {tuple(values.shape)}, valid {tuple(valid.shape)} {valid.dtype}")
        return keys, values, valid
