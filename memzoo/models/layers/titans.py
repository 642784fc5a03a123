"""Titans neural long-term memory (LMM): a per-head network whose weights learn at test time.

"Titans: Learning to Memorize at Test Time" (Behrouz, Zhong, Mirrokni; arXiv 2501.00663), eqs 12-18, with the
choices of memzoo's spec (docs/ARCHITECTURE.md, "Titans memory").  Per head and token, with t' the start of the
chunk of b tokens holding t (gradients at the chunk-start weights, the paper's mini-batch gradient descent):

    S_t = eta_t S_{t-1} - theta_t grad_W 1/2 ||M_{W_t'}(k_t) - v_t||^2,     W_t = (1 - alpha_t) W_{t-1} + S_t,
    y_t = M_{W_t}(q_t)                                                      (read after the token's own write)

The memory M is linear (``mem_depth=1``, M(x) = x W) or the 2-layer MLP x + LN(gelu(x A2) A1) (``mem_depth=2``,
the paper's default, expansion 4, one theta per matrix).  Around it: q/k/v projections -> causal depthwise conv
(kernel 4) -> SiLU -> L2-normalised q, k; data-dependent gates theta_t = theta_max sigmoid(.) and eta_t per head,
alpha_t per head and key channel (linear memory) or per head (MLP memory); a learned initial memory; per-head
RMSNorm gated by SiLU(g_proj(x)); ``o_proj``.  The state carries the gradient base, the weights, the momentum, the
position inside the current chunk and the conv tails, so a sequence split anywhere (mid-chunk included) and
decoding token by token give exactly the outputs of one pass.

Miras variants ("It's All Connected", arXiv 2504.13173; spec §5) are options of the same layer: ``error_map``
replaces the residual M(k) - v by psi(.) before the inner backward (lp, Huber), and ``retention`` adds a
non-linear retention applied to the weights when a chunk ends (lq normalisation, KL/softmax).  Defaults (l2, l2)
are plain Titans.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...kernels import IMPLS
from ...kernels.titans import Miras, titans_linear, titans_mlp
from ...kernels.titans.reference import layer_norm
from ...kernels.utils import l2norm
from ..contract import Mixer
from ..init import residual_output
from .common import GatedRMSNorm, apply_short_convs, short_convs

__all__ = ["TitansConfig", "TitansState", "TitansMemory", "NeuralMemory"]

# log(eta) standing in for eta = 0 without momentum: exp(-1e3) is 0 in fp32/fp64 while in-chunk cumsums of it
# stay exact, and -inf would turn the log-space differences into NaN.
_NO_MOMENTUM_LOG = -1e3


@dataclass(frozen=True)
class TitansConfig:
    d_model: int = 256
    n_heads: int = 4
    # Key/value/query head dimension; None = d_model // n_heads.
    d_head: int | None = None
    # 1: linear memory x W; 2: the MLP x + LN(gelu(x A2) A1) (paper v2 default).
    mem_depth: int = 2
    # Hidden width of the MLP memory = mem_expansion * d_head.
    mem_expansion: int = 4
    # b: the span of tokens whose gradients share the chunk-start weights; it changes the outputs.
    chunk_size: int = 16
    # eta_t S_{t-1} carry-over (False: eta = 0, plain gradient descent).
    momentum: bool = True
    # The forget gate alpha_t (False: alpha = 0).
    decay: bool = True
    # alpha per "head" or per key "channel" (paper v2); None = channel for the linear memory, head for the MLP.
    alpha_shape: str | None = None
    # One inner learning rate per weight matrix of the MLP memory (paper v2 App. B.3).
    per_matrix_lr: bool = True
    # theta_t = theta_max * sigmoid(.); the paper gives no bound.  At small scale the MLP memory learned MQAR with
    # 0.25 where 1 left it near zero (docs/titans.md, "The MLP memory in isolation").
    theta_max: float = 1.0
    # Causal depthwise conv on q, k, v (kernel conv_size) before SiLU; False keeps the SiLU alone.
    use_short_conv: bool = True
    conv_size: int = 4
    # Output RMSNorm gated by SiLU(g_proj(x)); False keeps the RMSNorm alone.
    use_gate: bool = True
    # Initial memory: "learned" per head, or "zero" (linear memory only: an MLP at zero never learns).
    init: str = "learned"
    norm_eps: float = 1e-5
    # Kernel path: "auto" (Triton on CUDA, the chunked reference otherwise) | "triton" | "ref".  The linear memory's
    # kernel has no Miras variant ("auto" runs them on the reference, "triton" with one is an error); the MLP
    # memory's kernel runs every variant it has.
    impl: str = "auto"
    # Miras attentional bias, psi applied coordinate-wise to the residual r = M_{W_t'}(k) - v before the inner
    # backward: "l2" (psi = r, Titans), "lp" (p r (r^2 + lp_eps)^((p-2)/2): the gradient of ||r||_p^p with
    # |r| smoothed to sqrt(r^2 + lp_eps); p = 2 is twice l2), "huber" (clamp(r, -huber_delta, huber_delta), the
    # spec's coordinate-wise Huber; delta = inf is l2).
    error_map: str = "l2"
    # lp exponent p (Moneta: p = 3 best); p >= 1, p = 1 is the smooth sign.
    error_p: float = 3.0
    # Smoothing of |r| in the lp map.
    lp_eps: float = 1e-6
    # Huber threshold delta (a constant; Yaad's data-dependent delta_t is not implemented).
    huber_delta: float = 1.0
    # Miras retention, applied to the weights when a chunk ends (the spec's chunk boundaries; inside a chunk the
    # Titans decay and momentum act unchanged): "l2" (the Titans decay alone), "lq" (W <- W / ||W||_q^(q-2) per
    # head and matrix, Moneta), "kl" (each row of the linear memory W <- kl_scale softmax((1 - kl_lambda)
    # log max(W, kl_eps)), Memora; mem_depth=1 only).
    retention: str = "l2"
    # lq exponent q (Moneta: q = 4); q > 1, q = 2 leaves W unchanged.
    retention_q: float = 4.0
    # Added to ||W||_q^q so that a zero memory stays finite.
    lq_eps: float = 1e-6
    # KL retention: the scale c of each softmax row, the retention strength lambda in [0, 1), and the floor
    # below which weights count as kl_eps (log of a non-positive weight is undefined; no gradient there).
    kl_scale: float = 1.0
    kl_lambda: float = 0.0
    kl_eps: float = 1e-6
    # Old option names, accepted with a DeprecationWarning for one release.
    _renamed_fields: ClassVar[dict[str, str]] = {"p": "error_p", "q": "retention_q", "out_norm_gate": "use_gate"}

    def __post_init__(self) -> None:
        if self.d_model <= 0 or self.n_heads <= 0:
            raise ValueError(f"d_model and n_heads must be positive, got {self.d_model}, {self.n_heads}")
        if self.d_head is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads} (or set d_head)")
        if self.head_dim <= 0 or self.mem_expansion <= 0:
            raise ValueError(f"d_head and mem_expansion must be positive, got {self.head_dim}, {self.mem_expansion}")
        if self.mem_depth not in (1, 2):
            raise ValueError(f"mem_depth must be 1 (linear) or 2 (MLP), got {self.mem_depth}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.alpha_shape not in (None, "head", "channel"):
            raise ValueError(f"alpha_shape must be None, 'head' or 'channel', got {self.alpha_shape!r}")
        if self.mem_depth == 2 and self.alpha_shape == "channel":
            raise ValueError("alpha_shape='channel' is implemented for the linear memory (mem_depth=1) only")
        if self.theta_max <= 0:
            raise ValueError(f"theta_max must be positive, got {self.theta_max}")
        if self.conv_size < 1 or self.norm_eps <= 0:
            raise ValueError(f"conv_size and norm_eps must be positive, got {self.conv_size}, {self.norm_eps}")
        if self.init not in ("learned", "zero") or (self.init == "zero" and self.mem_depth != 1):
            raise ValueError(f"init must be 'learned' or (for mem_depth=1) 'zero', got {self.init!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        miras = self.miras  # validates the Miras fields
        if self.retention == "kl" and self.mem_depth != 1:
            raise ValueError("retention='kl' keeps rows of the linear memory on a simplex: it needs mem_depth=1")
        if self.impl == "triton" and self.mem_depth == 1 and not miras.is_titans:
            raise ValueError(f"impl='triton' of the linear memory supports error_map='l2' and retention='l2' only, got "
                             f"{self.error_map!r}, {self.retention!r}; use impl='auto' or 'ref'")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads if self.d_head is None else self.d_head

    @property
    def miras(self) -> Miras:
        return Miras(self.error_map, self.error_p, self.lp_eps, self.huber_delta, self.retention, self.retention_q,
                     self.lq_eps, self.kl_scale, self.kl_lambda, self.kl_eps)

    @property
    def channel_alpha(self) -> bool:
        return self.mem_depth == 1 and self.alpha_shape != "head"


class TitansState(NamedTuple):
    conv_q: Tensor | None  # [B, W-1, H*D] last pre-conv inputs (None without short conv)
    conv_k: Tensor | None  # [B, W-1, H*D]
    conv_v: Tensor | None  # [B, W-1, H*D]
    pos: Tensor  # [B] int64: tokens already seen in the current chunk
    # fp32, batch first.  Linear: (W_base, W, S), each [B, H, D, D].
    # MLP: (A1_base, A1, S1, A2_base, A2, S2), A1 [B, H, E, D], A2 [B, H, D, E].
    memory: tuple[Tensor, ...]


class TitansMemory(Mixer):
    """Titans LMM token mixer: a multi-head neural memory trained online with momentum and decay."""

    config_class = TitansConfig

    def __init__(self, config: TitansConfig | None = None, /, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        c = self.config
        H, D = c.n_heads, c.head_dim
        self.n_heads, self.head_dim, self.hidden = H, D, c.mem_expansion * D
        self.n_lr = 2 if c.mem_depth == 2 and c.per_matrix_lr else 1
        n_alpha = H * D if c.channel_alpha else H
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(c.d_model, H * D, bias=False) for _ in range(3))
        self.q_conv, self.k_conv, self.v_conv = short_convs(c.use_short_conv, (H * D,) * 3, c.conv_size)
        self.theta_proj = nn.Linear(c.d_model, H * self.n_lr, bias=False)
        # Biases of their own (not nn.Linear's, so the model's init never touches them) set the starting gates
        # (theta ~ 0.12 theta_max, eta ~ 0.73, alpha ~ 0.018).  A disabled gate has no parameters at all.
        self.theta_bias = nn.Parameter(torch.full((H * self.n_lr,), -2.0))
        self.eta_proj = nn.Linear(c.d_model, H, bias=False) if c.momentum else None
        self.eta_bias = nn.Parameter(torch.full((H,), 1.0)) if c.momentum else None
        self.alpha_proj = nn.Linear(c.d_model, n_alpha, bias=False) if c.decay else None
        self.alpha_bias = nn.Parameter(torch.full((n_alpha,), -4.0)) if c.decay else None
        if c.mem_depth == 1:
            self.mem_init = nn.ParameterList([nn.Parameter(torch.zeros(H, D, D), requires_grad=c.init == "learned")])
        else:
            a1 = torch.randn(H, self.hidden, D) * self.hidden ** -0.5
            a2 = torch.randn(H, D, self.hidden) * D ** -0.5
            self.mem_init = nn.ParameterList([nn.Parameter(a1), nn.Parameter(a2)])
        for p in (self.theta_bias, self.eta_bias, self.alpha_bias, *self.mem_init):
            if p is not None:
                p._no_weight_decay = True
        self.g_proj = nn.Linear(c.d_model, H * D, bias=False) if c.use_gate else None
        self.o_norm = GatedRMSNorm(D, c.norm_eps)
        self.o_proj = residual_output(nn.Linear(H * D, c.d_model, bias=False))

    def init_state(self, batch_size: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> TitansState:
        tails = (None if conv is None else conv.init_tail(batch_size, device=device, dtype=dtype)
                 for conv in (self.q_conv, self.k_conv, self.v_conv))
        pos = torch.zeros(batch_size, dtype=torch.int64, device=device)
        return TitansState(*tails, pos, self._initial_memory(batch_size, device))

    def _initial_memory(self, batch_size: int, device: torch.device | str | None) -> tuple[Tensor, ...]:
        memory = []
        for w0 in self.mem_init:
            w = w0.to(device, torch.float64 if w0.dtype == torch.float64 else torch.float32)
            w = w.expand(batch_size, *w0.shape)
            # The weights start at M_0 and so does the gradient base; the momentum starts at zero.
            memory += [w, w, torch.zeros_like(w)]
        return tuple(memory)

    def state_size(self, seq_len: int | None = None) -> int:
        """Floats of the memory weights per sequence (linear: H * D * D; MLP: its parameter count).  The gradient
        base, the momentum and the conv tails are not counted; see ``state_size_with_optimizer``."""
        return sum(p.numel() for p in self.mem_init)

    def state_size_with_optimizer(self) -> int:
        """Memory weights plus their momentum S (the inner optimizer's state)."""
        return 2 * self.state_size()

    def extra_flops_per_token(self, seq_len: int) -> int:
        H, D, b = self.n_heads, self.head_dim, self.config.chunk_size
        if self.config.mem_depth == 1:
            # Error rows, chunk-end state updates, intra-chunk scores and read-out; forward x3 for the backward.
            fwd = 2 * H * (D * D + 2 * D * D + b * D + b * D + 2 * D * D)
        else:
            # MLP forward/backward at the base, dual-form reads and the four outer-product accumulations.
            fwd = 2 * H * (6 * D * self.hidden + 2 * b * (D + self.hidden) + 4 * D * self.hidden)
        return 3 * fwd

    def weights(self, state: TitansState) -> tuple[Tensor, ...]:
        """The memory's current weights in ``state``: ``(W,)`` (linear) or ``(A1, A2)`` (MLP), fp32 ``[B, H, ...]``."""
        w = state.memory
        return (w[1],) if self.config.mem_depth == 1 else (w[1], w[4])

    def read(self, q: Tensor, weights: tuple[Tensor, ...]) -> Tensor:
        """M*(q): evaluate the memory function at ``weights`` (from ``weights(state)``) without updating it.

        Args:
            q: ``[B, L, H, D]`` queries, already projected and normalised by the caller, in the weights' dtype.
            weights: ``(W [B, H, D, D],)`` or ``(A1 [B, H, E, D], A2 [B, H, D, E])``.

        Returns:
            ``[B, L, H, D]``: ``q W`` (linear) or ``q + LN(gelu(q A2) A1)`` (MLP), the read-out of the forward pass.
        """
        if len(weights) != self.config.mem_depth:
            raise ValueError(f"weights must hold {self.config.mem_depth} tensor(s) for mem_depth="
                             f"{self.config.mem_depth}, got {len(weights)}")
        if len(weights) == 1:
            return torch.einsum("blhk,bhkv->blhv", q, weights[0])
        a1, a2 = weights
        hidden = F.gelu(torch.einsum("blhd,bhde->blhe", q, a2))
        return q + layer_norm(torch.einsum("blhe,bhed->blhd", hidden, a1))

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """theta ``[B, T, H, n_lr]``, log eta ``[B, T, H]``, log(1 - alpha) ``[B, T, H]`` or ``[B, T, H, D]``; fp32."""
        c = self.config
        B, T, _ = x.shape
        theta = c.theta_max * torch.sigmoid(self.theta_proj(x).float() + self.theta_bias.float())
        theta = theta.view(B, T, self.n_heads, self.n_lr)
        if c.momentum:
            log_eta = F.logsigmoid(self.eta_proj(x).float() + self.eta_bias.float())
        else:
            log_eta = x.new_full((B, T, self.n_heads), _NO_MOMENTUM_LOG, dtype=torch.float32)
        if c.decay:
            # log(1 - sigmoid(z)) = logsigmoid(-z), finite for any z.
            log_gamma = F.logsigmoid(-(self.alpha_proj(x).float() + self.alpha_bias.float()))
        else:
            log_gamma = x.new_zeros((B, T, self.n_heads * (self.head_dim if c.channel_alpha else 1)),
                                    dtype=torch.float32)
        if c.channel_alpha:
            log_gamma = log_gamma.view(B, T, self.n_heads, self.head_dim)
        return theta, log_eta, log_gamma

    def _forward(self, x: Tensor, state: TitansState | None, *,
                 cu_seqlens: Tensor | None) -> tuple[Tensor, TitansState]:
        B, T, _ = x.shape
        H, D = self.n_heads, self.head_dim
        n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
        if state is None:
            state = self.init_state(n_seq, device=x.device, dtype=x.dtype)
        convs = (self.q_conv, self.k_conv, self.v_conv)
        qkv = (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        (q, k, v), tails = apply_short_convs(convs, qkv, state[:3], cu_seqlens, step=False, silu_without_conv=True)
        # The memory runs in fp32 (fp64 for a float64 layer, for oracle checks).
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        q, k = l2norm(q.to(acc).view(B, T, H, D)), l2norm(k.to(acc).view(B, T, H, D))
        v = v.to(acc).view(B, T, H, D)
        theta, log_eta, log_gamma = (g.to(acc) for g in self.gates(x))
        memory = tuple(m.to(acc) for m in state.memory)
        c = self.config
        if c.mem_depth == 1:
            o, memory = titans_linear(q, k, v, theta[..., 0], log_eta, log_gamma, memory, state.pos, c.chunk_size,
                                      cu_seqlens, impl=c.impl, miras=c.miras)
        else:
            o, memory = titans_mlp(q, k, v, theta[..., 0], theta[..., -1], log_eta, log_gamma, memory, state.pos,
                                   c.chunk_size, cu_seqlens, impl=c.impl, miras=c.miras)
        lengths = torch.full_like(state.pos, T) if cu_seqlens is None else (cu_seqlens[1:] - cu_seqlens[:-1])
        pos = (state.pos + lengths.to(state.pos)) % c.chunk_size
        gate = None if self.g_proj is None else self.g_proj(x).view(B, T, H, D)
        y = self.o_proj(self.o_norm(o.to(x.dtype), gate).reshape(B, T, H * D))
        return y, TitansState(*tails, pos, tuple(m.to(acc) for m in memory))


NeuralMemory = TitansMemory
