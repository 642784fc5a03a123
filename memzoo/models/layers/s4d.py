"""S4D: a diagonal state-space token mixer with convolutional, chunked (state in / state out) and recurrent modes.

"On the Parameterization and Initialization of Diagonal State Space Models" (Gu, Gupta, Goel, Re;
arXiv 2206.11893).  Per feature h (d_model of them) and complex mode n (d_state / 2 of them, conjugate pairs
implicit), after discretising x' = A x + B u with step dt:

    x_t = dA x_{t-1} + dB u_t,      y_t = 2 Re sum_n C_n x_t,n + D u_t
    equivalently y = K * u + D u,   K[l] = 2 Re sum_n C_n dB_n dA_n^l     (a Vandermonde product)

followed by the paper's pointwise output: GELU, then Linear(d_model, 2 d_model) and GLU (the Block owns the
residual and the norm).  ``forward`` on a fresh sequence is one FFT convolution at length 2T; with a state it
adds the state's read-out 2 Re sum_n C_n dA_n^(t+1) x_n and returns x_T = dA^T x_0 + sum_t dA^(T-1-t) dB u_t
(a transposed Vandermonde), so a sequence cut at any point and carried through the state gives the full pass.
``step`` is the recurrence.  All SSM math runs in fp32 (fp64 for fp64 inputs) with autocast off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...kernels import IMPLS
from ...kernels.ssm import vandermonde, vandermonde_transpose
from ..contract import Mixer
from ..init import residual_output
from .ssm_init import S4D_INITS, cdiv, cexp, check_steps, clog, cmul, log_uniform_dt, s4d_init

__all__ = ["S4DConfig", "S4DState", "S4D", "fft_causal_conv", "compute_dtype"]


@dataclass(frozen=True)
class S4DConfig:
    d_model: int = 256
    # Real state size N per feature: N / 2 complex modes (must be even).
    d_state: int = 64
    # "lin" | "inv" | "legs" | "real" (see ssm_init.s4d_init).
    init: str = "inv"
    # "zoh" (exact for piecewise-constant input) | "bilinear".
    disc: str = "zoh"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    # Learning rate of A, B, dt relative to the global one (the paper: 1e-3 against a global 1e-2).
    ssm_lr_scale: float = 0.1
    dropout: float = 0.0
    # Kernel path of the Vandermonde products: "auto" | "triton" | "ref".
    impl: str = "auto"

    def __post_init__(self) -> None:
        if self.d_model <= 0:
            raise ValueError(f"d_model must be positive, got {self.d_model}")
        if self.d_state < 2 or self.d_state % 2:
            raise ValueError(f"d_state must be an even integer >= 2 (complex pairs), got {self.d_state}")
        if self.init not in S4D_INITS:
            raise ValueError(f"init must be one of {S4D_INITS}, got {self.init!r}")
        check_steps(self.disc, self.dt_min, self.dt_max, self.ssm_lr_scale)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"need 0 <= dropout < 1, got {self.dropout}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")


class S4DState(NamedTuple):
    x: Tensor  # [B, H, N/2, 2] complex state as (re, im), fp32 (fp64 for fp64 inputs)


def compute_dtype(x: Tensor) -> torch.dtype:
    """fp64 inputs compute in fp64 (the oracle tests); everything else in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def fft_causal_conv(u: Tensor, k: Tensor) -> Tensor:
    """``y[b, t, h] = sum_{s <= t} k[h, s] u[b, t - s, h]`` via FFT at length 2T (no wrap-around).

    Args:
        u: ``[B, T, H]``; k: ``[H, T]``.
    """
    n = 2 * u.shape[1]
    uf = torch.fft.rfft(u, n=n, dim=1)  # [B, n/2+1, H]
    kf = torch.fft.rfft(k.t(), n=n, dim=0)  # [n/2+1, H]
    return torch.fft.irfft(uf * kf, n=n, dim=1)[:, : u.shape[1]]


class S4D(Mixer):
    """Diagonal SSM mixer (S4D) with the paper's GELU + Linear + GLU output."""

    config_class = S4DConfig
    packs_by_loop = True

    def __init__(self, config: S4DConfig | None = None, /, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        c = self.config
        h, m = c.d_model, c.d_state // 2
        self.n_modes = m
        a_re, a_im, b_re, b_im = s4d_init(c.init, m)
        # Re A = -exp(A_re_log) < 0 whatever the optimizer does, so dA stays inside the unit circle.
        self.A_re_log = nn.Parameter(a_re.neg().clamp_min(1e-4).log().float().repeat(h, 1))  # [H, N/2]
        self.A_im = nn.Parameter(a_im.float().repeat(h, 1))  # [H, N/2]
        self.B = nn.Parameter(torch.stack([b_re, b_im], -1).float().repeat(h, 1, 1))  # [H, N/2, 2]
        self.log_dt = nn.Parameter(log_uniform_dt(h, c.dt_min, c.dt_max))  # [H]
        # C ~ complex normal with E|C|^2 = 1.
        self.C = nn.Parameter(torch.randn(h, m, 2) * math.sqrt(0.5))  # [H, N/2, 2]
        self.D = nn.Parameter(torch.randn(h))
        for p in (self.A_re_log, self.A_im, self.B, self.log_dt):
            p._no_weight_decay = True
            p._lr_scale = c.ssm_lr_scale
        if c.init == "real":
            # S4D-Real is the purely real ablation: its imaginary parts stay at zero.
            self.A_im.requires_grad_(False)
        self.drop = nn.Dropout(c.dropout)
        self.o_proj = residual_output(nn.Linear(h, 2 * h))

    def init_state(self, batch_size: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> S4DState:
        dt = torch.float64 if dtype == torch.float64 else torch.float32
        return S4DState(torch.zeros(batch_size, self.d_model, self.n_modes, 2, device=device, dtype=dt))

    def state_size(self, seq_len: int | None = None) -> int:
        """d_model * d_state floats: N/2 complex modes per feature."""
        return self.d_model * self.config.d_state

    def extra_flops_per_token(self, seq_len: int) -> int:
        # Forward: three length-2T real FFTs per feature (~2.5 n log2 n flops each, per token ~15 log2 2T)
        # plus the O(N) kernel generation amortised; backward about twice that.
        return int(3 * self.d_model * (15 * math.log2(2 * max(seq_len, 1)) + 8 * self.n_modes))

    def discretize(self, dtype: torch.dtype) -> dict[str, tuple[Tensor, Tensor]]:
        """The discrete system in real planes, each ``[H, N/2]``: z = log dA, dA, dB, C and w = C dB."""
        a_re = -self.A_re_log.to(dtype).exp()
        a_im = self.A_im.to(dtype)
        dt = self.log_dt.to(dtype).exp()[:, None]
        b = self.B.to(dtype)
        c = self.C.to(dtype)
        if self.config.disc == "zoh":
            # dA = exp(dt A), dB = (exp(dt A) - 1) / A * B.
            z = (dt * a_re, dt * a_im)
            da = cexp(*z)
            db = cmul(*cdiv(da[0] - 1, da[1], a_re, a_im), b[..., 0], b[..., 1])
        else:
            # dA = (1 + dt A / 2) / (1 - dt A / 2), dB = dt / (1 - dt A / 2) * B.
            den = (1 - dt * a_re / 2, -dt * a_im / 2)
            da = cdiv(1 + dt * a_re / 2, dt * a_im / 2, *den)
            z = clog(*da)
            db = cmul(*cdiv(dt.expand_as(a_re), torch.zeros_like(a_im), *den), b[..., 0], b[..., 1])
        return {"z": z, "da": da, "db": db, "c": (c[..., 0], c[..., 1]), "w": cmul(*c.unbind(-1), *db)}

    def ssm(self, u: Tensor, x0: Tensor | None) -> tuple[Tensor, Tensor]:
        """The linear SSM on ``u`` ``[B, T, H]`` from state ``x0`` ``[B, H, N/2, 2]`` (None = zeros).

        Returns ``y = K * u + D u (+ the state's read-out)`` ``[B, T, H]`` and the final state.
        """
        bsz, length, h = u.shape
        s = self.discretize(u.dtype)
        impl = self.config.impl
        k = vandermonde(*s["z"], *s["w"], length, impl=impl).to(u.dtype)  # [H, T]
        y = fft_causal_conv(u, k) + self.D.to(u.dtype) * u
        # Final state: sum_t dA^(T-1-t) dB u_t = dB * (transposed Vandermonde of the time-reversed input).
        u_rev = u.flip(1).permute(0, 2, 1).reshape(bsz * h, length)
        acc = vandermonde_transpose(*s["z"], u_rev, impl=impl)
        x_re, x_im = cmul(acc[0].view(bsz, h, -1).to(u.dtype), acc[1].view(bsz, h, -1).to(u.dtype), *s["db"])
        if x0 is not None:
            # Read-out of the carried state: 2 Re sum_n C_n dA_n^(t+1) x0_n, one Vandermonde row per (b, h).
            w0 = cmul(*s["c"], x0[..., 0], x0[..., 1])
            y0 = vandermonde(*s["z"], w0[0].reshape(bsz * h, -1), w0[1].reshape(bsz * h, -1), length, shift=1,
                             impl=impl)
            y = y + y0.view(bsz, h, length).transpose(1, 2).to(u.dtype)
            decay = cexp(length * s["z"][0], length * s["z"][1])
            carried = cmul(*decay, x0[..., 0], x0[..., 1])
            x_re, x_im = x_re + carried[0], x_im + carried[1]
        return y, torch.stack([x_re, x_im], -1)

    def output(self, y: Tensor, dtype: torch.dtype) -> Tensor:
        """The pointwise tail shared by ``forward`` and ``step``: GELU, dropout, Linear(H, 2H), GLU."""
        y = self.drop(F.gelu(y))
        return F.glu(self.o_proj(y.to(self.o_proj.weight.dtype)), dim=-1).to(dtype)

    def _forward(self, x: Tensor, state: S4DState | None, *, cu_seqlens: Tensor | None) -> tuple[Tensor, S4DState]:
        ct = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            y, xs = self.ssm(x.to(ct), None if state is None else state.x.to(ct))
        return self.output(y, x.dtype), S4DState(xs)

    def _step(self, x_t: Tensor, state: S4DState) -> tuple[Tensor, S4DState]:
        ct = compute_dtype(x_t)
        with torch.autocast(x_t.device.type, enabled=False):
            u = x_t.to(ct)  # [B, H]
            # Recomputed from the parameters every call, so a step after an optimizer update is never stale.
            s = self.discretize(ct)
            xs = state.x.to(ct)
            ax = cmul(*s["da"], xs[..., 0], xs[..., 1])
            x_re = ax[0] + s["db"][0] * u[..., None]
            x_im = ax[1] + s["db"][1] * u[..., None]
            y = 2 * (s["c"][0] * x_re - s["c"][1] * x_im).sum(-1) + self.D.to(ct) * u
        return self.output(y, x_t.dtype), S4DState(torch.stack([x_re, x_im], -1))
