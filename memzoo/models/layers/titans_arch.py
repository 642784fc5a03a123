"""Titans architectures: memory as a gate (MAG) and memory as a layer (MAL), with persistent memory.

"Titans: Learning to Memorize at Test Time" (Behrouz, Zhong, Mirrokni; arXiv 2501.00663), section 4.  Both
combine the neural memory ``TitansMemory`` (the LMM, registry name ``titans``) with sliding-window attention (SWA)
whose keys start with N_p learned persistent tokens P (eq 19, visible to every query):

    MAG (4.2):  x~ = P || x,  o = RMSNorm(SWA*(x~)) * sigmoid(RMSNorm(M(x~)))       (outputs at P dropped)
    MAL (4.3):  m = M(P || x),  o = m + SWA*(RMSNorm(x + m))                         (memory, then SWA)

M(P || x) is realised with ``prime_memory=True`` by priming the memory state with P: ``init_state`` runs the memory
over P once, so every sequence starts from the memory that has already read the persistent tokens (off by default,
see the config; the attention always has the persistent prefix).  SWA* attends to P (no rotary
position: they belong to no position) and to the tokens s with 0 <= t - s < window.  The state is the memory state
plus a fixed-size KV cache of the window - 1 newest tokens (slot positions, -1 = empty), so any split and
token-by-token decoding are exact.  MAC lives in ``titans_arch_mac.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..block import RMSNorm
from ..contract import Mixer, renamed_options
from ..init import residual_output
from ..rope import apply_rope
from ..state import tree_map
from .titans import TitansConfig, TitansMemory, TitansState

__all__ = ["TitansMAGConfig", "TitansMALConfig", "TitansMAG", "TitansMAL", "TitansSWAState", "PersistentAttention"]


@dataclass(frozen=True)
class TitansHybridConfig:
    d_model: int = 256
    # Attention heads (head width d_model // n_heads, even for rotary positions).
    n_heads: int = 4
    # N_p learned persistent tokens prepended to the attention keys (paper: 128); 0 disables them.
    n_persistent: int = 128
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    # TitansConfig overrides for the neural memory (d_model is set from this config).
    memory: dict[str, Any] = field(default_factory=dict)
    # MAG/MAL: let the memory read P before every sequence (the paper's M(P || x)).  Off by default: N_p sequential
    # memory updates ahead of each sequence make the outputs ~100x more sensitive to fp32 rounding at N_p = 128
    # (split-vs-full gradients and save/load bit-equality then fail), and cost N_p memory tokens per sequence.
    prime_memory: bool = False

    def __post_init__(self) -> None:
        if self.d_model <= 0 or self.n_heads <= 0 or self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be a positive multiple of n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"the head width d_model // n_heads = {self.d_model // self.n_heads} must be even (RoPE)")
        if self.n_persistent < 0:
            raise ValueError(f"n_persistent must be >= 0, got {self.n_persistent}")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ValueError(f"rope_theta and norm_eps must be positive, got {self.rope_theta}, {self.norm_eps}")
        if not isinstance(self.memory, dict) or "d_model" in self.memory:
            raise ValueError(f"memory must be a dict of TitansConfig options without d_model, got {self.memory!r}")
        self.memory_config()

    def memory_config(self) -> TitansConfig:
        try:
            return TitansConfig(d_model=self.d_model, **renamed_options("memory", TitansConfig, self.memory))
        except TypeError as e:
            raise ValueError(f"bad memory options: {e}") from None


@dataclass(frozen=True)
class TitansMAGConfig(TitansHybridConfig):
    # Sliding window W of the attention branch (paper: 2048).
    window: int = 2048

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")


@dataclass(frozen=True)
class TitansMALConfig(TitansMAGConfig):
    pass


class PersistentAttention(nn.Module):
    """Multi-head softmax attention whose keys always begin with the persistent tokens P.

    The caller supplies rotated queries/keys and a bool mask over the non-persistent keys; P is visible to all.
    """

    def __init__(self, d_model: int, n_heads: int, n_persistent: int, rope_theta: float) -> None:
        super().__init__()
        self.n_heads, self.d_head, self.rope_theta = n_heads, d_model // n_heads, rope_theta
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d_model, d_model, bias=False) for _ in range(4))
        residual_output(self.o_proj)
        self.persistent = nn.Parameter(torch.randn(n_persistent, d_model) * d_model ** -0.5)
        self.persistent._no_weight_decay = True

    def _heads(self, t: Tensor) -> Tensor:
        return t.view(*t.shape[:-1], self.n_heads, self.d_head)

    def query(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotated queries ``[B, T, H, Dh]`` of ``x`` ``[B, T, D]`` at integer ``positions`` ``[B or 1, T]``."""
        return apply_rope(self._heads(self.q_proj(x)), positions, self.rope_theta)

    def key_value(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        return apply_rope(self._heads(self.k_proj(x)), positions, self.rope_theta), self._heads(self.v_proj(x))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """``q`` ``[B, T, H, Dh]``, ``k, v`` ``[B, S, H, Dh]``, ``mask`` ``[B, T, S]`` -> ``[B, T, D]``."""
        B, T = q.shape[:2]
        p = self.persistent.to(q.dtype)
        pk = self._heads(self.k_proj(p)).expand(B, -1, -1, -1)  # [B, Np, H, Dh]
        pv = self._heads(self.v_proj(p)).expand(B, -1, -1, -1)
        k, v = torch.cat((pk, k.to(q.dtype)), 1), torch.cat((pv, v.to(q.dtype)), 1)
        mask = torch.cat((mask.new_ones(B, T, pk.shape[1]), mask), 2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask[:, None], scale=1.0 / math.sqrt(self.d_head))
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


class TitansSWAState(NamedTuple):
    memory: TitansState  # the neural memory (primed with P)
    k: Tensor  # [B, W-1, H, Dh] rotated keys of the newest tokens
    v: Tensor  # [B, W-1, H, Dh]
    pos_k: Tensor  # [B, W-1] int64 absolute position of each slot, -1 = empty
    pos: Tensor  # [B] int64 position of the next token


class TitansMAGState(TitansSWAState):
    """TitansMAG's state: a type of its own so that a TitansMAL state (same fields) is refused by name."""

    __slots__ = ()


class TitansMALState(TitansSWAState):
    """TitansMAL's state (see ``TitansMAGState``)."""

    __slots__ = ()


class TitansHybrid(Mixer):
    """Shared parts: the memory, the persistent attention and state priming.  Packed sequences run one by one
    (``Mixer.forward_each_sequence``)."""

    packs_by_loop = True

    def __init__(self, config: Any = None, /, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        c = self.config
        self.memory = TitansMemory(c.memory_config())
        self.attn = PersistentAttention(c.d_model, c.n_heads, c.n_persistent, c.rope_theta)

    def primed_memory(self, batch_size: int, device: Any, dtype: torch.dtype | None) -> TitansState:
        """The memory state after reading P (x~ = P || x), shared by all ``batch_size`` rows."""
        prime = self.config.prime_memory and self.config.n_persistent
        # Priming runs where the parameters live; the state then moves to ``device``.
        home = self.attn.persistent.device if prime else device
        state = self.memory.init_state(1, device=home, dtype=dtype)
        if prime:
            # Read P at (at least) fp32 whatever the layer's dtype: N_p low-precision updates in a row would drift
            # the memory far more than one pass over the input does.
            acc = torch.promote_types(self.attn.persistent.dtype, torch.float32)
            params = {n: t.to(acc) for n, t in self.memory.named_parameters()}
            start = tree_map(lambda t: t.to(acc) if t.is_floating_point() else t, state)
            p = self.attn.persistent.to(acc)[None]
            _, primed = torch.func.functional_call(self.memory, params, (p, start))
            # The conv tails go back to the layer's dtype; the memory weights are fp32 (or fp64) anyway.
            tails = (None if t is None else t.to(ref.dtype) for t, ref in zip(primed[:3], state[:3]))
            state = primed._replace(**dict(zip(("conv_q", "conv_k", "conv_v"), tails)))
            if device is not None:
                state = tree_map(lambda t: t.to(device), state)
        return tree_map(lambda t: t.expand(batch_size, *t.shape[1:]), state)

    def _forward(self, x: Tensor, state: Any, *, cu_seqlens: Tensor | None) -> tuple[Tensor, Any]:
        if state is None:
            return self._dense(x, self.init_state(x.shape[0], device=x.device, dtype=x.dtype), fresh=True)
        return self._dense(x, state)

    def _dense(self, x: Tensor, state: Any, fresh: bool = False) -> tuple[Tensor, Any]:
        """One batch of whole rows from ``state``; ``fresh``: the state is ``init_state`` (no offsets to read)."""
        raise NotImplementedError


class _SlidingWindowHybrid(TitansHybrid):
    state_class: type[TitansSWAState] = TitansSWAState

    def init_state(self, batch_size: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> TitansSWAState:
        slots, H, Dh = self.config.window - 1, self.attn.n_heads, self.attn.d_head
        kv = torch.zeros(batch_size, slots, H, Dh, device=device, dtype=dtype)
        return self.state_class(
            self.primed_memory(batch_size, device, dtype), kv, kv.clone(),
            torch.full((batch_size, slots), -1, dtype=torch.int64, device=device),
            torch.zeros(batch_size, dtype=torch.int64, device=device),
        )

    def state_size(self, seq_len: int | None = None) -> int:
        slots = self.config.window - 1 if seq_len is None else min(seq_len, self.config.window - 1)
        return self.memory.state_size() + 2 * self.config.d_model * slots

    def extra_flops_per_token(self, seq_len: int) -> int:
        keys = min(seq_len, self.config.window) + self.config.n_persistent
        return self.memory.extra_flops_per_token(seq_len) + 12 * self.config.d_model * keys

    def swa(self, x: Tensor, state: TitansSWAState) -> tuple[Tensor, TitansSWAState]:
        """SWA* over ``x`` ``[B, T, D]`` continuing the cache in ``state``; returns the output and the new cache."""
        T = x.shape[1]
        pos_q = state.pos[:, None] + torch.arange(T, device=x.device)  # [B, T]
        q = self.attn.query(x, pos_q)
        k, v = self.attn.key_value(x, pos_q)
        k_all, v_all = torch.cat((state.k.to(k.dtype), k), 1), torch.cat((state.v.to(v.dtype), v), 1)
        pos_all = torch.cat((state.pos_k, pos_q), 1)  # [B, W-1+T]
        dist = pos_q[:, :, None] - pos_all[:, None, :]
        mask = (pos_all[:, None, :] >= 0) & (dist >= 0) & (dist < self.config.window)
        y = self.attn.attend(q, k_all, v_all, mask)
        keep = self.config.window - 1
        start = k_all.shape[1] - keep
        return y, state._replace(k=k_all[:, start:], v=v_all[:, start:], pos_k=pos_all[:, start:], pos=pos_q[:, -1] + 1)


class TitansMAG(_SlidingWindowHybrid):
    """Titans memory as a gate: SWA* and the neural memory in parallel over P || x, combined by a normalised gate."""

    config_class = TitansMAGConfig
    state_class = TitansMAGState

    def __init__(self, config: TitansMAGConfig | None = None, /, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.norm_y = RMSNorm(self.config.d_model, self.config.norm_eps)
        self.norm_m = RMSNorm(self.config.d_model, self.config.norm_eps)

    def _dense(self, x: Tensor, state: TitansSWAState, fresh: bool = False) -> tuple[Tensor, TitansSWAState]:
        m, memory = self.memory(x, state.memory)
        y, state = self.swa(x, state)
        # The paper's gate: both branches normalised with learned vector weights, then a non-linearity.
        return self.norm_y(y) * torch.sigmoid(self.norm_m(m)), state._replace(memory=memory)


class TitansMAL(_SlidingWindowHybrid):
    """Titans memory as a layer: the neural memory over P || x, then SWA* over its (normed, residual) output.

    The block supplies one pre-norm and one residual; the memory sub-layer's residual and the attention's pre-norm
    live here so the mixer is the two sub-layers of the paper.  The attention's persistent prefix is P itself
    (at the P positions the memory output is a function of the parameters only, so this is a reparametrisation).
    """

    config_class = TitansMALConfig
    state_class = TitansMALState

    def __init__(self, config: TitansMALConfig | None = None, /, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.norm = RMSNorm(self.config.d_model, self.config.norm_eps)

    def _dense(self, x: Tensor, state: TitansSWAState, fresh: bool = False) -> tuple[Tensor, TitansSWAState]:
        m, memory = self.memory(x, state.memory)
        y, state = self.swa(self.norm(x + m), state)
        return m + y, state._replace(memory=memory)
