"""LSSL: a dense-A linear state-space token mixer with HiPPO initialisation (the historical S4 precursor).

"Combining Recurrent, Convolutional, and Continuous-time Models with Linear State-Space Layers" (Gu, Johnson,
Goel, Saab, Dao, Rudra, Re; arXiv 2110.13985).  Per feature h with its own step dt_h and a shared N x N HiPPO
matrix A (LegS or LegT), discretised by the bilinear transform (GBT, alpha = 1/2) or zero-order hold:

    x_t = dA x_{t-1} + dB u_t,   y_t = C x_t + D u_t,   dA = (I - dt A/2)^-1 (I + dt A/2),  dB = dt (I - dt A/2)^-1 B
    equivalently y = K * u + D u with the Krylov kernel K = (C dB, C dA dB, ..., C dA^(L-1) dB)

built by repeated squaring (log2 L matrix products), then GELU and a Linear(d_model, d_model).  Cost is
O(H (N^3 log L + N^2 L)) time and O(H N L) memory, so this layer is for small N (<= 64) and as the dense oracle
that S4D is checked against.  A carried state adds C dA^(t+1) x_0 to the output and gives
x_T = dA^T x_0 + sum_t dA^(T-1-t) dB u_t, so any split of a sequence equals the full pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..contract import Mixer
from ..init import residual_output
from .s4d import compute_dtype, fft_causal_conv
from .ssm_init import HIPPO_MEASURES, check_steps, hippo, log_uniform_dt

__all__ = ["LSSLConfig", "LSSLState", "LSSL", "krylov"]


@dataclass(frozen=True)
class LSSLConfig:
    d_model: int = 256
    # State size N (dense N x N transition: keep it small).
    d_state: int = 32
    # HiPPO measure of A and B: "legs" | "legt".
    measure: str = "legs"
    # "bilinear" (the paper's GBT with alpha = 1/2) | "zoh" (matrix exponential).
    disc: str = "bilinear"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    # Train the shared A and B (else they stay the fixed HiPPO matrices, as buffers).
    learn_a: bool = False
    # Train the per-feature steps dt.
    learn_dt: bool = True
    # Learning rate of A, B, dt relative to the global one.
    ssm_lr_scale: float = 0.1

    def __post_init__(self) -> None:
        if self.d_model <= 0 or self.d_state <= 0:
            raise ValueError(f"d_model and d_state must be positive, got {self.d_model}, {self.d_state}")
        if self.measure not in HIPPO_MEASURES:
            raise ValueError(f"measure must be one of {HIPPO_MEASURES}, got {self.measure!r}")
        check_steps(self.disc, self.dt_min, self.dt_max, self.ssm_lr_scale)


class LSSLState(NamedTuple):
    x: Tensor  # [B, H, N] fp32 (fp64 for fp64 inputs)


def krylov(a: Tensor, v: Tensor, length: int) -> Tensor:
    """``[..., N, L]`` with column l equal to ``a^l v``, by repeated squaring.

    Args:
        a: ``[H, N, N]``; v: ``[..., H, N]`` (leading batch dims allowed).
    """
    cols = v[..., None]  # [..., H, N, 1]
    power = a
    while cols.shape[-1] < length:
        # [v, Av, ..., A^(k-1) v] -> append A^k times all of it, then square A^k.
        cols = torch.cat([cols, power @ cols], -1)
        power = power @ power
    return cols[..., :length]


class LSSL(Mixer):
    """Linear State-Space Layer with a dense HiPPO transition, a Krylov kernel and an exact recurrent step."""

    config_class = LSSLConfig
    packs_by_loop = True

    def __init__(self, config: LSSLConfig | None = None, /, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        c = self.config
        a, b = hippo(c.measure, c.d_state)
        if c.learn_a:
            self.A = nn.Parameter(a.float())  # [N, N]
            self.B = nn.Parameter(b.float())  # [N]
        else:
            self.register_buffer("A", a.float())
            self.register_buffer("B", b.float())
        self.log_dt = nn.Parameter(log_uniform_dt(c.d_model, c.dt_min, c.dt_max), requires_grad=c.learn_dt)
        self.C = nn.Parameter(torch.randn(c.d_model, c.d_state) / math.sqrt(c.d_state))  # [H, N]
        self.D = nn.Parameter(torch.randn(c.d_model))
        for p in (self.A, self.B, self.log_dt):
            if isinstance(p, nn.Parameter):
                p._no_weight_decay = True
                p._lr_scale = c.ssm_lr_scale
        self.o_proj = residual_output(nn.Linear(c.d_model, c.d_model))

    def init_state(self, batch_size: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> LSSLState:
        dt = torch.float64 if dtype == torch.float64 else torch.float32
        return LSSLState(torch.zeros(batch_size, self.d_model, self.config.d_state, device=device, dtype=dt))

    def state_size(self, seq_len: int | None = None) -> int:
        return self.d_model * self.config.d_state

    def extra_flops_per_token(self, seq_len: int) -> int:
        # The Krylov columns (2 N^2 per feature and token) and the FFT convolution, times 3 for forward + backward.
        n = self.config.d_state
        return int(3 * self.d_model * (2 * n * n + 15 * math.log2(2 * max(seq_len, 1))))

    def discretize(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``dA [H, N, N]`` and ``dB [H, N]`` for every feature's step."""
        a, b = self.A.to(dtype), self.B.to(dtype)
        dt = self.log_dt.to(dtype).exp()[:, None, None]  # [H, 1, 1]
        eye = torch.eye(a.shape[0], dtype=dtype, device=a.device)
        if self.config.disc == "bilinear":
            left = eye - dt / 2 * a
            da = torch.linalg.solve(left, eye + dt / 2 * a)
            db = torch.linalg.solve(left, dt * b[:, None]).squeeze(-1)
        else:
            da = torch.linalg.matrix_exp(dt * a)
            # dB = A^-1 (exp(dt A) - I) B: HiPPO A is invertible (triangular with nonzero diagonal for LegS).
            db = torch.linalg.solve(a.expand_as(da), (da - eye) @ b[:, None]).squeeze(-1)
        return da, db

    def ssm(self, u: Tensor, x0: Tensor | None) -> tuple[Tensor, Tensor]:
        """The linear SSM on ``u`` ``[B, T, H]`` from ``x0`` ``[B, H, N]`` -> (``y [B, T, H]``, final state)."""
        length = u.shape[1]
        da, db = self.discretize(u.dtype)
        c = self.C.to(u.dtype)
        cols = krylov(da, db, length)  # [H, N, T]: dA^l dB
        k = torch.einsum("hn,hnl->hl", c, cols)
        y = fft_causal_conv(u, k) + self.D.to(u.dtype) * u
        # sum_t dA^(T-1-t) dB u_t: column m of the Krylov matrix meets u_(T-1-m).
        x = torch.einsum("hnm,bmh->bhn", cols, u.flip(1))
        if x0 is not None:
            seen = krylov(da, torch.einsum("hnk,bhk->bhn", da, x0), length)  # [B, H, N, T]: dA^(t+1) x0
            y = y + torch.einsum("hn,bhnt->bth", c, seen)
            x = x + torch.einsum("hnk,bhk->bhn", torch.linalg.matrix_power(da, length), x0)
        return y, x

    def output(self, y: Tensor, dtype: torch.dtype) -> Tensor:
        """The pointwise tail shared by ``forward`` and ``step``: GELU then Linear(H, H)."""
        return self.o_proj(F.gelu(y).to(self.o_proj.weight.dtype)).to(dtype)

    def _forward(self, x: Tensor, state: LSSLState | None, *, cu_seqlens: Tensor | None
                 ) -> tuple[Tensor, LSSLState]:
        ct = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            y, xs = self.ssm(x.to(ct), None if state is None else state.x.to(ct))
        return self.output(y, x.dtype), LSSLState(xs)

    def _step(self, x_t: Tensor, state: LSSLState) -> tuple[Tensor, LSSLState]:
        ct = compute_dtype(x_t)
        with torch.autocast(x_t.device.type, enabled=False):
            u = x_t.to(ct)  # [B, H]
            da, db = self.discretize(ct)
            xs = torch.einsum("hnk,bhk->bhn", da, state.x.to(ct)) + db * u[..., None]
            y = (self.C.to(ct) * xs).sum(-1) + self.D.to(ct) * u
        return self.output(y, x_t.dtype), LSSLState(xs)
