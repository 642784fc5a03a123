"""HiPPO matrices and diagonal state-space initialisations shared by ``S4D`` and ``LSSL``.

"Combining Recurrent, Convolutional, and Continuous-time Models with Linear State-Space Layers" (LSSL,
arXiv 2110.13985) and "On the Parameterization and Initialization of Diagonal State Space Models" (S4D,
arXiv 2206.11893).  Continuous system per feature: x'(t) = A x(t) + B u(t), y(t) = C x(t) + D u(t).

Complex numbers live in real planes (``re``, ``im`` tensors of one shape) so that optimizers, DDP, FSDP and
``torch.compile`` never meet a complex tensor; the helpers below are the few complex operations the layers need.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["S4D_INITS", "HIPPO_MEASURES", "DISCRETISATIONS", "check_steps", "hippo", "s4d_init", "log_uniform_dt",
           "cmul", "cdiv", "cexp", "clog"]

S4D_INITS = ("lin", "inv", "legs", "real")
HIPPO_MEASURES = ("legs", "legt")


def hippo(measure: str, n: int) -> tuple[Tensor, Tensor]:
    """The HiPPO transition ``A [n, n]`` and input vector ``B [n]`` in float64.

    LegS (scaled Legendre): A_nk = -sqrt(2n+1) sqrt(2k+1) for n > k, -(n+1) on the diagonal, 0 above.
    LegT (translated Legendre, window 1): A_nk = -sqrt(2n+1) sqrt(2k+1) for n >= k and (-1)^(n-k) times that
    for n < k.  Both have B_n = sqrt(2n+1).
    """
    idx = torch.arange(n, dtype=torch.float64)
    r = (2 * idx + 1).sqrt()
    rows, cols = idx[:, None], idx[None, :]
    if measure == "legs":
        a = torch.where(rows > cols, -r[:, None] * r[None, :], torch.zeros(()).double())
        a = a - torch.diag(idx + 1)
    elif measure == "legt":
        sign = torch.where(rows >= cols, 1.0, (-1.0) ** (rows - cols)).double()
        a = -r[:, None] * r[None, :] * sign
    else:
        raise ValueError(f"measure must be one of {HIPPO_MEASURES}, got {measure!r}")
    return a, r.clone()


def legs_normal_part(n: int) -> tuple[Tensor, Tensor, Tensor]:
    """The skew part of LegS: ``S = A + P P^T + I/2`` with ``P_k = sqrt(k + 1/2)`` (A + PP^T is normal).

    Returns ``(S, eigenvalues of -iS ascending, eigenvectors)`` from float64 ``eigh``: a diagonalisation that is
    unitary, unlike LegS itself whose eigenvector condition number explodes with n.
    """
    a, _ = hippo("legs", n)
    p = (torch.arange(n, dtype=torch.float64) + 0.5).sqrt()
    s = a + p[:, None] * p[None, :] + 0.5 * torch.eye(n, dtype=torch.float64)
    lam, v = torch.linalg.eigh(-1j * s.to(torch.complex128))
    return s, lam, v


def s4d_init(init: str, n_modes: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Diagonal A and B of ``n_modes`` complex modes (half of the real state size N), float64.

    n = 0..n_modes-1, N = 2 n_modes:
      lin:  A_n = -1/2 + i pi n                       (diagonal analogue of S4-FouT)
      inv:  A_n = -1/2 + i (N/pi) (N/(2n+1) - 1)      (approximates LegS)
      legs: eigenvalues of A_LegS + P P^T (real part exactly -1/2), B = V^* B_LegS
      real: A_n = -(n+1)                              (no oscillation: the ablation that trains worse)
    B is ones except for legs.  Returns ``(A_re, A_im, B_re, B_im)``, each ``[n_modes]``.
    """
    k = torch.arange(n_modes, dtype=torch.float64)
    ones, zeros = torch.ones(n_modes, dtype=torch.float64), torch.zeros(n_modes, dtype=torch.float64)
    half = torch.full((n_modes,), -0.5, dtype=torch.float64)
    n_state = 2 * n_modes
    if init == "lin":
        return half, math.pi * k, ones, zeros
    if init == "inv":
        return half, (n_state / math.pi) * (n_state / (2 * k + 1) - 1), ones, zeros
    if init == "real":
        return -(k + 1), zeros, ones, zeros
    if init == "legs":
        _, lam, v = legs_normal_part(n_state)
        # Eigenvalues of the real skew matrix come in +-pairs: keep the positive half, largest first (as Inv).
        keep = torch.argsort(lam, descending=True)[:n_modes]
        _, b = hippo("legs", n_state)
        b_diag = v[:, keep].conj().T @ b.to(torch.complex128)
        return half, lam[keep], b_diag.real.contiguous(), b_diag.imag.contiguous()
    raise ValueError(f"init must be one of {S4D_INITS}, got {init!r}")


DISCRETISATIONS = ("zoh", "bilinear")


def check_steps(disc: str, dt_min: float, dt_max: float, ssm_lr_scale: float) -> None:
    """The discretisation options shared by the SSM configs (S4D, LSSL); a ``ValueError`` names the bad one."""
    if disc not in DISCRETISATIONS:
        raise ValueError(f"disc must be 'zoh' or 'bilinear', got {disc!r}")
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
    if ssm_lr_scale < 0:
        raise ValueError(f"ssm_lr_scale must be >= 0, got {ssm_lr_scale}")


def log_uniform_dt(n: int, dt_min: float, dt_max: float) -> Tensor:
    """``log(dt)`` with dt log-uniform in ``[dt_min, dt_max]``, float32 ``[n]``."""
    u = torch.rand(n)
    return u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)


def cmul(ar: Tensor, ai: Tensor, br: Tensor, bi: Tensor) -> tuple[Tensor, Tensor]:
    return ar * br - ai * bi, ar * bi + ai * br


def cdiv(ar: Tensor, ai: Tensor, br: Tensor, bi: Tensor) -> tuple[Tensor, Tensor]:
    den = br * br + bi * bi
    return (ar * br + ai * bi) / den, (ai * br - ar * bi) / den


def cexp(ar: Tensor, ai: Tensor) -> tuple[Tensor, Tensor]:
    mag = ar.exp()
    return mag * ai.cos(), mag * ai.sin()


def clog(ar: Tensor, ai: Tensor) -> tuple[Tensor, Tensor]:
    """Principal log; only exp of it matters downstream, so the branch cut is harmless."""
    return 0.5 * torch.log(ar * ar + ai * ai), torch.atan2(ai, ar)
