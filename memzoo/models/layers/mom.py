"""Mixture-of-Memories (MoM): M linear memories, each written and read only by the tokens routed to it.

"Linear Sequence Modeling with Mixture-of-Memories" (Du, Sun, Lan, Hu, Cheng; arXiv 2502.13685).
A router picks k of M memories per token, (w, idx) = topk(softmax(x W_r)), w renormalised.  Memory m
advances only on its routed tokens, with its own k/v/beta/decay projections and the shared query;
with the default Gated DeltaNet rule (per head, state S [K, V]):

    S^m_t = e^{g_t} S^m_{t-1} + beta_t k_t (v_t - e^{g_t} S^{m T}_{t-1} k_t)^T     (t routed to m)
    o_t = sum_j w_{t,j} S^{idx_{t,j} T}_t q_t / sqrt(K)  +  S^{sh T}_t q_t / sqrt(K)

The shared memory sees every token with weight 1.  Then y = o_proj(RMSNorm_head(o) * SiLU(g_proj(x))).
``update_rule`` swaps the rule: "gla" (per-key decay, no delta) or "linear_attn" (no decay).

Short convolution (decided here, as the reference's inference path): q, k and v are convolved in each
memory's routed order, so the window of token t in memory m holds the last W routed tokens of m in
the same sequence; every (sequence, memory) pair carries its own tail, the shared memory one over the
plain sequence.  Training, prefill and decoding all see exactly this; nothing leaks between memories,
batch rows or packed sequences.  The conv weights are shared by all memories (only the inputs differ).

Two exact paths (``path``): "varlen" counting-sorts tokens into (memory, sequence) segments and runs
one varlen chunk call over all of them; "dense" runs every memory over every token with beta = 0 and
decay 1 (and k = 0 for the non-delta rules) where a token is not routed, the oracle.  Both share the
routed conv above.  The state is ``[B, Mt, H, K, V]`` fp32 (Mt = M + shared, the shared one last).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...kernels import check_chunk_options
from ...kernels.gated_delta import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
from ...kernels.gla import chunk_gla, chunk_simple_gla, fused_recurrent_gla
from ...kernels.utils import flatten_batch, seq_boundaries
from ..contract import Mixer
from ..init import residual_output
from .common import (
    GatedRMSNorm,
    HeadDims,
    apply_short_convs,
    chunked_memory_flops,
    init_mamba2_decay,
    needs_grad,
    short_convs,
)
from .mom_routing import balance_loss, memory_load, plan_segments, route, z_loss

__all__ = ["MoMConfig", "MoMState", "MixtureOfMemories"]

UPDATE_RULES = ("gated_delta", "gla", "linear_attn")
PATHS = ("varlen", "dense")


@dataclass(frozen=True)
class MoMConfig(HeadDims):
    d_model: int = 256
    n_heads: int = 4
    # Query/key head dimension; None = d_model // n_heads.
    d_head: int | None = None
    # Value head dimension = expand_v * d_head (the paper's MoM keeps it at 1).
    expand_v: float = 1.0
    # M, the routed memories, and k, how many each token writes to and reads from.
    num_memories: int = 4
    topk: int = 2
    # An extra memory fed by every token and read with weight 1.
    shared_mem: bool = True
    # Update rule of every memory: "gated_delta" | "gla" | "linear_attn" (the first two as the mixers of those names).
    update_rule: str = "gated_delta"
    # "varlen" (packed segments, the fast path) | "dense" (masked full-length memories, the oracle).
    path: str = "varlen"
    # Short causal conv + SiLU on q, k, v in routed order; without it q, k, v pass through SiLU for the delta rule.
    use_short_conv: bool = True
    conv_size: int = 4
    use_gate: bool = True
    norm_eps: float = 1e-5
    # Weight of the per-layer Switch balance loss and of the router z-loss (0 turns a loss off).
    aux_loss_scale: float = 0.01
    z_loss_scale: float = 0.0
    # GLA rule: log-decay = logsigmoid(.) / this (larger keeps decays nearer 1).
    gate_logit_normalizer: float = 16.0
    chunk_size: int = 64
    impl: str = "auto"
    # Old option names, accepted with a DeprecationWarning for one release.
    _renamed_fields: ClassVar[dict[str, str]] = {"backend": "update_rule"}

    def __post_init__(self) -> None:
        self.check_head_dims()
        if self.num_memories < 1:
            raise ValueError(f"num_memories must be >= 1, got {self.num_memories}")
        if not 1 <= self.topk <= self.num_memories:
            raise ValueError(f"topk must be in [1, num_memories={self.num_memories}], got {self.topk}")
        if self.update_rule == "gated_deltanet":
            warnings.warn("MoM update_rule 'gated_deltanet' is now 'gated_delta' (the mixer's name); the old value "
                          "will be removed in the next release", DeprecationWarning, stacklevel=3)
            object.__setattr__(self, "update_rule", "gated_delta")
        if self.update_rule not in UPDATE_RULES:
            raise ValueError(f"update_rule must be one of {UPDATE_RULES}, got {self.update_rule!r}")
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {self.path!r}")
        if self.conv_size < 1 or self.norm_eps <= 0 or self.gate_logit_normalizer <= 0:
            raise ValueError("conv_size must be >= 1; norm_eps and gate_logit_normalizer positive")
        if self.aux_loss_scale < 0 or self.z_loss_scale < 0:
            raise ValueError(f"loss scales must be >= 0, got {self.aux_loss_scale}, {self.z_loss_scale}")
        check_chunk_options(self.chunk_size, self.impl)


    @property
    def n_slots(self) -> int:
        """Memories per memory bank including the shared one (Mt)."""
        return self.num_memories + int(self.shared_mem)


class MoMState(NamedTuple):
    conv_q: Tensor | None  # [B, Mt, W-1, H*K] last pre-conv routed inputs per memory (None without short conv)
    conv_k: Tensor | None  # [B, Mt, W-1, H*K]
    conv_v: Tensor | None  # [B, Mt, W-1, H*V]
    memory: Tensor  # [B, Mt, H, K, V] fp32, the shared memory last


class MixtureOfMemories(Mixer):
    """MoM token mixer: top-k routed linear memories plus a shared one, mixed by the router weights."""

    config_class = MoMConfig

    def __init__(self, config: MoMConfig | None = None, /, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        c = self.config
        H, K, V = self.n_heads, self.head_k, self.head_v = c.n_heads, c.head_k, c.head_v
        # Per-memory columns: k | v | beta (delta rule) | decay input (H for the delta rule, H*K for GLA).
        self.n_gate = {"gated_delta": 2 * H, "gla": H * K, "linear_attn": 0}[c.update_rule]
        self.router = nn.Linear(c.d_model, c.num_memories, bias=False)
        self.q_proj = nn.Linear(c.d_model, H * K, bias=False)
        self.mem_proj = nn.Parameter(torch.empty(c.n_slots, c.d_model, H * K + H * V + self.n_gate))
        nn.init.uniform_(self.mem_proj, -c.d_model ** -0.5, c.d_model ** -0.5)
        if c.update_rule == "gated_delta":
            # One Mamba-2 decay parameterisation shared by all memories, as the reference.
            self.A_log = nn.Parameter(torch.empty(H))
            self.dt_bias = nn.Parameter(torch.empty(H))
            self.A_log._no_weight_decay = self.dt_bias._no_weight_decay = True
            init_mamba2_decay(self.A_log, self.dt_bias)
        self.q_conv, self.k_conv, self.v_conv = short_convs(c.use_short_conv, (H * K, H * K, H * V), c.conv_size)
        self.g_proj = nn.Linear(c.d_model, H * V, bias=False) if c.use_gate else None
        self.o_norm = GatedRMSNorm(V, c.norm_eps)
        self.o_proj = residual_output(nn.Linear(H * V, c.d_model, bias=False))
        self.last_load: Tensor | None = None

    def init_state(self, batch_size: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> MoMState:
        Mt = self.config.n_slots
        tails = (None if conv is None else conv.init_tail(batch_size * Mt, device=device, dtype=dtype)
                 .unflatten(0, (batch_size, Mt)) for conv in (self.q_conv, self.k_conv, self.v_conv))
        memory = torch.zeros(batch_size, Mt, self.n_heads, self.head_k, self.head_v, device=device,
                             dtype=torch.float32)
        return MoMState(*tails, memory)

    def state_size(self, seq_len: int | None = None) -> int:
        """(M + shared) * H * K * V floats; the conv tails are not counted."""
        return self.config.n_slots * self.n_heads * self.head_k * self.head_v

    def extra_flops_per_token(self, seq_len: int) -> int:
        """Each token runs the chunked op in its k routed memories and the shared one (routing and the
        gather/scatter are memory traffic, not counted)."""
        c = self.config
        per_memory = chunked_memory_flops(self.n_heads, self.head_k, self.head_v, c.chunk_size, seq_len,
                                          wy=c.update_rule == "gated_delta")
        return (c.topk + int(c.shared_mem)) * per_memory

    def num_activated_parameters(self) -> int:
        """All parameters but the projections of the M - k memories a token does not use."""
        unused = (self.config.num_memories - self.config.topk) * self.mem_proj[0].numel()
        return sum(p.numel() for p in self.parameters()) - unused

    def _project(self, x: Tensor) -> Tensor:
        """Every memory's k/v/gate projection of every token: ``[L, D] -> [L, Mt, P]`` in one GEMM.

        A grouped GEMM would cost (k + 1) instead of Mt token-projections; CPU torch has none that
        trains (``torch._grouped_mm`` needs CUDA), so both paths project densely and the varlen path gathers.
        """
        Mt, D, P = self.mem_proj.shape
        return (x @ self.mem_proj.permute(1, 0, 2).reshape(D, Mt * P).to(x.dtype)).view(-1, Mt, P)

    def _split(self, p: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Projection columns -> pre-conv k, v and the fp32 log-decay g and beta (None where unused)."""
        H, K, V = self.n_heads, self.head_k, self.head_v
        k, v, rest = p.split((H * K, H * V, self.n_gate), dim=-1)
        if self.config.update_rule == "gated_delta":
            b, a = rest.float().chunk(2, dim=-1)
            g = -self.A_log.float().exp() * F.softplus(a + self.dt_bias.float())
            return k, v, g, torch.sigmoid(b)
        if self.config.update_rule == "gla":
            return k, v, (F.logsigmoid(rest.float()) / self.config.gate_logit_normalizer).unflatten(-1, (H, K)), None
        return k, v, None, None

    def _convs(self, streams: tuple[Tensor, ...], tails: tuple[Tensor | None, ...], cu: Tensor | None,
               *, step: bool) -> tuple[list[Tensor], list[Tensor | None]]:
        """Short conv + SiLU per stream on ``[1, L, C]`` packed segments (or ``[N, C]`` tokens when ``step``)."""
        return apply_short_convs((self.q_conv, self.k_conv, self.v_conv), streams, tails, cu, step=step,
                                 silu_without_conv=self.config.update_rule == "gated_delta")

    def _recur(self, q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None,
               h0: Tensor | None, cu: Tensor | None, *, step: bool) -> tuple[Tensor, Tensor]:
        """The update rule's op on ``[B, T, H, *]`` inputs; the fused recurrent kernel when decoding without grad."""
        c = self.config
        fused = step and not needs_grad(self, q, h0)
        kw = dict(initial_state=h0, output_final_state=True, cu_seqlens=cu, impl=c.impl, chunk_size=c.chunk_size)
        if c.update_rule == "gated_delta":
            op = fused_recurrent_gated_delta_rule if fused else chunk_gated_delta_rule
            return op(q, k, v, g, beta, use_qk_l2norm=True, **kw)
        if c.update_rule == "gla":
            return (fused_recurrent_gla if fused else chunk_gla)(q, k, v, g, **kw)
        if fused:
            return fused_recurrent_gla(q, k, v, q.new_zeros(q.shape, dtype=torch.float32), **kw)
        return chunk_simple_gla(q, k, v, q.new_zeros(q.shape[:3], dtype=torch.float32), **kw)

    def _router(self, x: Tensor, *, record: bool) -> tuple[Tensor, Tensor]:
        """Route tokens ``[L, D]``; record the aux losses and the load. Returns ``weights [L, k]``, ``idx [L, k]``."""
        c = self.config
        logits = F.linear(x.float(), self.router.weight.float())  # [L, M]
        probs, w, idx = route(logits, c.topk)
        if record:
            self.last_load = memory_load(idx, c.num_memories).detach()
            if c.aux_loss_scale > 0:
                self.record_aux_loss("balance", c.aux_loss_scale * balance_loss(probs, idx))
            if c.z_loss_scale > 0:
                self.record_aux_loss("z_loss", c.z_loss_scale * z_loss(logits))
        return w.to(x.dtype), idx

    def _slots(self, idx: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        """Append the shared memory (index M, weight 1) to each token's routed memories and weights."""
        if not self.config.shared_mem:
            return idx, w
        return F.pad(idx, (0, 1), value=self.config.num_memories), F.pad(w, (0, 1), value=1.0)

    def _forward(self, x: Tensor, state: MoMState | None, *, cu_seqlens: Tensor | None) -> tuple[Tensor, MoMState]:
        B, T, D = x.shape
        H, K, V, Mt = self.n_heads, self.head_k, self.head_v, self.config.n_slots
        xf, cu = flatten_batch(x, cu_seqlens)  # [1, L, D], [N + 1]
        tok, N = xf[0], cu.numel() - 1
        w, idx = self._router(tok, record=True)
        sel, wts = self._slots(idx, w)  # [L, S]
        plan = plan_segments(sel, seq_boundaries(cu, tok.shape[0])[0], cu, Mt)
        q, proj = self.q_proj(tok), self._project(tok)  # [L, H*K], [L, Mt, P]
        # Segment m * N + n of the kernels is row n, memory m of the [N, Mt, ...] state.
        tails = (None,) * 3 if state is None else tuple(
            None if t is None else t.transpose(0, 1).flatten(0, 1) for t in state[:3])
        h0 = None if state is None else state.memory.float().transpose(0, 1).flatten(0, 1)
        packed = proj[plan.src, plan.mem]  # [L*S, P] routed order
        k, v, g, beta = self._split(packed)
        (q_p, k, v), tails = self._convs((q[plan.src][None], k[None], v[None]), tails, plan.cu_seqlens, step=False)
        if self.config.path == "varlen":
            o, h = self._recur(q_p.unflatten(-1, (H, K)), k.unflatten(-1, (H, K)), v.unflatten(-1, (H, V)),
                               None if g is None else g[None], None if beta is None else beta[None], h0,
                               plan.cu_seqlens, step=False)
            o = (o[0][plan.pos] * wts[..., None, None]).sum(1)  # [L, H, V]
        else:
            o, h = self._dense(plan, (q_p[0], k[0], v[0]), proj, sel, wts, cu, h0)
        gate = None if self.g_proj is None else self.g_proj(tok).view(-1, H, V)
        y = self.o_proj(self.o_norm(o, gate).reshape(B, T, H * V))
        tails = (None if t is None else t.unflatten(0, (Mt, N)).transpose(0, 1) for t in tails)
        return y, MoMState(*tails, h.unflatten(0, (Mt, N)).transpose(0, 1))

    def _dense(self, plan: Any, convolved: tuple[Tensor, ...], proj: Tensor, sel: Tensor, wts: Tensor,
               cu: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
        """Every memory over every token, frozen (beta = 0, g = 0, k = 0) where a token is not routed to it."""
        H, K, V, Mt = self.n_heads, self.head_k, self.head_v, self.config.n_slots
        L = proj.shape[0]
        dense_w = wts.new_zeros(L, Mt).scatter_(1, sel, wts)  # [L, Mt]
        mask = torch.zeros_like(dense_w).scatter_(1, sel, 1.0)
        _, _, g, beta = self._split(proj)
        # The routed-order conv outputs go back to (token, memory); unrouted entries stay zero.
        q, k, v = (c.new_zeros(L, Mt, c.shape[-1]).index_put((plan.src, plan.mem), c) for c in convolved)
        if g is not None:
            g = g * mask.view(L, Mt, *([1] * (g.dim() - 2))).float()
        if beta is not None:
            beta = beta * mask[..., None].float()
        else:
            k = k * mask[..., None]
        starts = cu[:-1][None] + L * torch.arange(Mt, device=cu.device)[:, None]  # [Mt, N]
        cu_all = F.pad(starts.flatten(), (0, 1), value=Mt * L)

        def memory_major(t: Tensor | None, *shape: int) -> Tensor | None:
            return None if t is None else t.transpose(0, 1).reshape(1, Mt * L, *shape)

        o, h = self._recur(memory_major(q, H, K), memory_major(k, H, K), memory_major(v, H, V),
                           memory_major(g, *g.shape[2:]) if g is not None else None, memory_major(beta, H),
                           h0, cu_all, step=False)
        return torch.einsum("mlhv,lm->lhv", o.view(Mt, L, H, V), dense_w), h

    def _step(self, x_t: Tensor, state: MoMState | None) -> tuple[Tensor, MoMState]:
        """Decode one token: gather the k routed states (+ shared), one recurrent step, scatter them back."""
        B = x_t.shape[0]
        H, K, V = self.n_heads, self.head_k, self.head_v
        if state is None:
            state = self.init_state(B, device=x_t.device, dtype=x_t.dtype)
        w, idx = self._router(x_t, record=False)
        sel, wts = self._slots(idx, w)  # [B, S]
        S = sel.shape[1]
        proj = self._project(x_t).gather(1, sel[..., None].expand(-1, -1, self.mem_proj.shape[-1]))  # [B, S, P]
        k, v, g, beta = self._split(proj.flatten(0, 1))
        q = self.q_proj(x_t).repeat_interleave(S, 0)  # [B*S, H*K]

        def pick(t: Tensor) -> Tensor:
            return t.gather(1, sel.view(B, S, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])).flatten(0, 1)

        def put(t: Tensor, new: Tensor) -> Tensor:
            return t.scatter(1, sel.view(B, S, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]),
                             new.unflatten(0, (B, S)).to(t.dtype))

        tails = tuple(None if t is None else pick(t) for t in state[:3])
        (q, k, v), tails = self._convs((q, k, v), tails, None, step=True)
        o, h = self._recur(q.view(-1, 1, H, K), k.view(-1, 1, H, K), v.view(-1, 1, H, V),
                           None if g is None else g[:, None], None if beta is None else beta[:, None],
                           pick(state.memory.float()), None, step=True)
        o = (o.view(B, S, H, V) * wts[..., None, None]).sum(1)  # [B, H, V]
        gate = None if self.g_proj is None else self.g_proj(x_t).view(B, H, V)
        y = self.o_proj(self.o_norm(o, gate).reshape(B, H * V))
        new_tails = (None if t is None else put(t, n) for t, n in zip(state[:3], tails))
        return y, MoMState(*new_tails, put(state.memory, h))
