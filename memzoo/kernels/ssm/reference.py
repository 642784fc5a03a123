"""Diagonal state-space ops in plain PyTorch: the Vandermonde kernel, its transpose (state carry) and the
per-step recurrence that both are checked against.

"On the Parameterization and Initialization of Diagonal State Space Models" (S4D, arXiv 2206.11893).  Per
feature, N complex modes with log-transition z_n = log(dA_n) and weights w_n:

    K[l] = 2 Re sum_n w_n exp((l + s) z_n)          (Vandermonde: kernel generation, state read-out)
    S_n  = sum_m u[m] exp((m + s) z_n)               (transposed Vandermonde: the state after a segment)

Complex numbers are real/imaginary planes (Triton has no complex type).  ``z`` has RZ rows and the other operand
R = G * RZ rows; row r uses z row ``r % RZ`` (one transition shared by a batch of weights or inputs).  These
references materialise ``[RZ, N, L]`` and are the CPU path; the Triton kernels never do.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["vandermonde_ref", "vandermonde_transpose_ref", "diag_ssm_recurrent_ref"]


def _powers(z_re: Tensor, z_im: Tensor, length: int, shift: int) -> tuple[Tensor, Tensor]:
    # Each power is exp of one product (l + s) z: parallel over l, and its phase error is the rounding of that
    # product (about 6e-8 x |(l + s) Im z| rad in fp32, 1e-3 rad at L = 16K for S4D-Inv's fastest modes).
    pos = torch.arange(length, device=z_re.device, dtype=z_re.dtype) + shift  # [L]
    mag = torch.exp(z_re[..., None] * pos)  # [RZ, N, L]
    ang = z_im[..., None] * pos
    return mag * torch.cos(ang), mag * torch.sin(ang)


def vandermonde_ref(z_re: Tensor, z_im: Tensor, w_re: Tensor, w_im: Tensor, length: int, shift: int = 0) -> Tensor:
    """``K[r, l] = 2 Re sum_n w[r, n] exp((l + shift) z[r % RZ, n])``.

    Args:
        z_re, z_im: ``[RZ, N]`` log-transitions (Re z < 0).
        w_re, w_im: ``[R, N]`` weights, R a multiple of RZ.
        length: L, the number of positions; shift: s, the first exponent.

    Returns:
        ``[R, L]`` in z's dtype.
    """
    rz, n = z_re.shape
    v_re, v_im = _powers(z_re, z_im, length, shift)
    w_re, w_im = w_re.reshape(-1, rz, n), w_im.reshape(-1, rz, n)
    out = torch.einsum("grn,rnl->grl", w_re, v_re) - torch.einsum("grn,rnl->grl", w_im, v_im)
    return 2 * out.reshape(-1, length)


def vandermonde_transpose_ref(z_re: Tensor, z_im: Tensor, u: Tensor, shift: int = 0) -> tuple[Tensor, Tensor]:
    """``S[r, n] = sum_m u[r, m] exp((m + shift) z[r % RZ, n])``.

    Args:
        z_re, z_im: ``[RZ, N]``; u: real ``[R, L]``, R a multiple of RZ.

    Returns:
        ``(S_re, S_im)``, each ``[R, N]``.
    """
    rz, n = z_re.shape
    v_re, v_im = _powers(z_re, z_im, u.shape[-1], shift)
    u = u.reshape(-1, rz, u.shape[-1])
    s_re = torch.einsum("grl,rnl->grn", u, v_re).reshape(-1, n)
    s_im = torch.einsum("grl,rnl->grn", u, v_im).reshape(-1, n)
    return s_re, s_im


def diag_ssm_recurrent_ref(u: Tensor, da: tuple[Tensor, Tensor], db: tuple[Tensor, Tensor],
                           c: tuple[Tensor, Tensor], x0: tuple[Tensor, Tensor] | None = None
                           ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The specification, one token at a time: x_t = dA x_{t-1} + dB u_t, y_t = 2 Re sum_n C_n x_t,n.

    Args:
        u: ``[B, T, H]`` real input; da, db, c: ``(re, im)`` planes ``[H, N]``; x0: ``(re, im)`` ``[B, H, N]``.

    Returns:
        ``y [B, T, H]`` (without the D u skip) and the final state ``(re, im)`` ``[B, H, N]``.
    """
    bsz, length, h = u.shape
    if x0 is None:
        zero = u.new_zeros(bsz, h, da[0].shape[-1])
        x0 = (zero, zero)
    x_re, x_im = x0
    ys = []
    for t in range(length):
        ut = u[:, t, :, None]
        x_re, x_im = (da[0] * x_re - da[1] * x_im + db[0] * ut, da[0] * x_im + da[1] * x_re + db[1] * ut)
        ys.append(2 * (c[0] * x_re - c[1] * x_im).sum(-1))
    return torch.stack(ys, 1), (x_re, x_im)
