"""Titans memory as context (MAC): attention over [persistent || retrieved memory || segment], paper order.

"Titans: Learning to Memorize at Test Time" (Behrouz, Zhong, Mirrokni; arXiv 2501.00663), section 4.1, eqs 21-25.
The sequence is cut into segments S^(t) of C tokens; per segment, with M_{t-1} the memory before it:

    1. h_t = M*_{t-1}(q_t),  q_t = S^(t) W_Q                     (read only, no update)
    2. y_t = Attn([P || h_t || S^(t)])                            (queries: the segment tokens)
    3. M_t = write(M_{t-1}; u_t),  u_t = x_t + y_t                (the memory learns from the attention output)
    4. o_t = RMSNorm(y_t) * sigmoid(RMSNorm(M*_t(u_t)))            (token-level read after each token's own write)

u_t is the residual stream after the attention (``memory_input="residual"``); eq 24 read literally writes the bare
y_t (``memory_input="attention"``), which at small scale never learned to recall across segments (docs/titans.md).

Mask: P is visible to every query; segment token j sees h_i and x_i of its segment for i <= j.  h_i is computed
from token i's query, so a fully visible h block would leak future tokens into the past (and could not be decoded);
causal h keeps training and decoding identical.  Rotary positions are segment-local (h_i at i, x_i at C + i), P has
none.  Step 3 and 4 are one ``TitansMemory`` pass over y, which writes token by token and reads after the write, so
o_i never sees y_j for j > i.  The state holds the memory, the segment-start read weights, the rotated keys/values
of the current segment's h and x tokens and the offset in the segment; at a segment boundary the read weights roll
to the current memory, so a split anywhere and token-by-token decoding are exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from ...kernels.utils import l2norm
from ..block import RMSNorm
from ..init import residual_output
from ..state import cat_states, index_state
from .titans import TitansState
from .titans_arch import TitansHybrid, TitansHybridConfig

__all__ = ["TitansMACConfig", "TitansMACState", "TitansMAC", "MEMORY_INPUTS"]

MEMORY_INPUTS = ("attention", "residual")


@dataclass(frozen=True)
class TitansMACConfig(TitansHybridConfig):
    # C: tokens per segment (paper: 512); the attention span is N_p + 2 C keys at most.
    segment_len: int = 512
    # Old option names, accepted with a DeprecationWarning for one release.
    _renamed_fields: ClassVar[dict[str, str]] = {"segment": "segment_len"}
    # What step 3 writes to the memory (and step 4 reads it with): "residual", x_t + y_t (the residual stream after
    # the attention), or "attention", the bare attention output y_t (eq 24 read literally).  A 2-layer MAC trained
    # on the passkey with "attention" never learned to recall across a segment (exact match 0.00), with "residual"
    # it reached 1.00 at twice the training length: docs/titans.md.
    memory_input: str = "residual"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.segment_len < 1:
            raise ValueError(f"segment_len must be >= 1, got {self.segment_len}")
        if self.memory_input not in MEMORY_INPUTS:
            raise ValueError(f"memory_input must be one of {MEMORY_INPUTS}, got {self.memory_input!r}")


class TitansMACState(NamedTuple):
    memory: TitansState  # the neural memory after the last written token
    read: tuple[Tensor, ...]  # memory weights at the current segment's start: (W,) or (A1, A2), fp32
    hk: Tensor  # [B, C-1, H, Dh] rotated keys of the current segment's retrieved tokens h
    hv: Tensor  # [B, C-1, H, Dh]
    xk: Tensor  # [B, C-1, H, Dh] rotated keys of the current segment's input tokens
    xv: Tensor  # [B, C-1, H, Dh]
    seg_pos: Tensor  # [B] int64: tokens already seen in the current segment


class TitansMAC(TitansHybrid):
    """Titans memory as context (paper section 4.1), decodable token by token."""

    config_class = TitansMACConfig

    def __init__(self, config: TitansMACConfig | None = None, /, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        c, mem = self.config, self.memory
        H, D = mem.n_heads, mem.head_dim
        # W_Q of step 1 (the retrieval query) and the map of the memory's per-head read-out into token space.
        self.h_q_proj = nn.Linear(c.d_model, H * D, bias=False)
        # Drawn at the residual-output std (init_std / sqrt(2 n_layers)), as every o_proj was before init marks:
        # the draw under which all three seeds of the MAC passkey study learned (docs/titans.md); at the full
        # init_std seed 0 of the same run never did.
        self.h_o_proj = residual_output(nn.Linear(H * D, c.d_model, bias=False))
        self.norm_y = RMSNorm(c.d_model, c.norm_eps)
        self.norm_m = RMSNorm(c.d_model, c.norm_eps)

    def init_state(self, batch_size: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> TitansMACState:
        memory = self.memory.init_state(batch_size, device=device, dtype=dtype)
        buf = torch.zeros(batch_size, self.config.segment_len - 1, self.attn.n_heads, self.attn.d_head,
                          device=device, dtype=dtype)
        seg_pos = torch.zeros(batch_size, dtype=torch.int64, device=device)
        return TitansMACState(memory, self.memory.weights(memory), buf, buf.clone(), buf.clone(), buf.clone(), seg_pos)

    def state_size(self, seq_len: int | None = None) -> int:
        slots = self.config.segment_len - 1 if seq_len is None else min(seq_len, self.config.segment_len - 1)
        return 2 * self.memory.state_size() + 4 * self.config.d_model * slots

    def extra_flops_per_token(self, seq_len: int) -> int:
        keys = self.config.n_persistent + 2 * min(seq_len, self.config.segment_len)
        return self.memory.extra_flops_per_token(seq_len) + 12 * self.config.d_model * keys

    def retrieve(self, read: tuple[Tensor, ...], x: Tensor) -> Tensor:
        """Step 1: h = M*(l2norm(x W_Q)) at the weights ``read``, no update; ``x`` ``[B, L, D]`` -> ``[B, L, D]``."""
        B, L, _ = x.shape
        H, D = self.memory.n_heads, self.memory.head_dim
        q = l2norm(self.h_q_proj(x).to(read[0].dtype).view(B, L, H, D))
        r = self.memory.read(q, read)
        return self.h_o_proj(r.to(x.dtype).reshape(B, L, H * D))

    def write_read(self, x: Tensor, y: Tensor, memory: TitansState) -> tuple[Tensor, TitansState]:
        """Steps 3 and 4 for the segment tokens ``x`` and their attention output ``y`` (both ``[B, L, D]``)."""
        u = y if self.config.memory_input == "attention" else x + y
        m, memory = self.memory(u, memory)
        return self.norm_y(y) * torch.sigmoid(self.norm_m(m)), memory

    def _step(self, x_t: Tensor, state: TitansMACState) -> tuple[Tensor, TitansMACState]:
        """One token per row without a host sync: rows may sit at different segment offsets."""
        B, C = x_t.shape[0], self.config.segment_len
        x = x_t[:, None]  # [B, 1, D]
        o = state.seg_pos  # [B]
        h = self.retrieve(state.read, x)
        kh, vh = self.attn.key_value(h, o[:, None])
        kx, vx = self.attn.key_value(x, C + o[:, None])
        q = self.attn.query(x, C + o[:, None])
        bufs = (state.hk, state.hv, state.xk, state.xv)
        k = torch.cat((bufs[0].to(kh.dtype), kh, bufs[2].to(kx.dtype), kx), 1)  # [B, 2C, H, Dh]
        v = torch.cat((bufs[1].to(vh.dtype), vh, bufs[3].to(vx.dtype), vx), 1)
        seen = torch.arange(C - 1, device=x.device)[None] < o[:, None]  # [B, C-1]
        new = seen.new_ones(B, 1)
        mask = torch.cat((seen, new, seen, new), 1)[:, None]  # [B, 1, 2C]
        y = self.attn.attend(q, k, v, mask)
        out, memory = self.write_read(x, y, state.memory)
        done = o + 1 == C  # [B]: this token completes its segment
        if C > 1:
            slot = o.clamp(max=C - 2)[:, None, None, None].expand(B, 1, *kh.shape[2:])
            keep = (~done)[:, None, None, None]
            bufs = tuple(torch.where(keep, b.scatter(1, slot, n.to(b.dtype)), torch.zeros_like(b))
                         for b, n in zip(bufs, (kh, vh, kx, vx)))
        rolled = self.memory.weights(memory)
        read = tuple(torch.where(done.view(B, *[1] * (r.dim() - 1)), w, r) for w, r in zip(rolled, state.read))
        return out[:, 0], TitansMACState(memory, read, *bufs, torch.where(done, 0, o + 1))

    def _dense(self, x: Tensor, state: TitansMACState, fresh: bool = False) -> tuple[Tensor, TitansMACState]:
        if fresh:
            return self._dense_aligned(x, state, 0)
        offsets = state.seg_pos.tolist()
        if len(set(offsets)) > 1:
            # Rows at different offsets roll at different tokens: run them one by one (exact, rare: only after
            # packed prefills of unequal lengths).
            rows = [self._dense_aligned(x[i:i + 1], index_state(state, torch.tensor([i], device=x.device)), offsets[i])
                    for i in range(x.shape[0])]
            return torch.cat([y for y, _ in rows], 0), cat_states([s for _, s in rows])
        return self._dense_aligned(x, state, offsets[0])

    def _dense_aligned(self, x: Tensor, state: TitansMACState, o: int | None = None) -> tuple[Tensor, TitansMACState]:
        B, T, _ = x.shape
        C = self.config.segment_len
        o = int(state.seg_pos[0]) if o is None else o
        memory, read = state.memory, state.read
        bufs = [state.hk, state.hv, state.xk, state.xv]
        outs, t = [], 0
        while t < T:
            L = min(T - t, C - o)
            xs = x[:, t:t + L]
            rel = torch.arange(L, device=x.device)[None]
            h = self.retrieve(read, xs)
            kh, vh = self.attn.key_value(h, o + rel)
            kx, vx = self.attn.key_value(xs, C + o + rel)
            q = self.attn.query(xs, C + o + rel)
            k = torch.cat((bufs[0][:, :o].to(kh.dtype), kh, bufs[2][:, :o].to(kx.dtype), kx), 1)
            v = torch.cat((bufs[1][:, :o].to(vh.dtype), vh, bufs[3][:, :o].to(vx.dtype), vx), 1)
            causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
            seen = causal.new_ones(L, o)
            mask = torch.cat((seen, causal, seen, causal), 1).expand(B, L, 2 * (o + L))
            y = self.attn.attend(q, k, v, mask)
            out, memory = self.write_read(xs, y, memory)
            outs.append(out)
            if o + L == C:
                # Segment complete: the next segment retrieves from the memory written with this one's y.
                read, bufs, o = self.memory.weights(memory), [torch.zeros_like(b) for b in bufs], 0
            else:
                new = (kh, vh, kx, vx)
                bufs = [torch.cat((b[:, :o], n.to(b.dtype), b[:, o + L:]), 1) for b, n in zip(bufs, new)]
                o += L
            t += L
        seg_pos = torch.full_like(state.seg_pos, o)
        return torch.cat(outs, 1), TitansMACState(memory, read, *bufs, seg_pos)
