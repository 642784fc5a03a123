"""Vandermonde products for diagonal SSMs in Triton: kernel generation and the state carry, forward and backward,
without the ``[R, N, L]`` intermediate of the PyTorch reference.

"On the Parameterization and Initialization of Diagonal State Space Models" (S4D, arXiv 2206.11893).
With V[r, n, l] = exp((l + s) z[r % RZ, n]) (complex, real/imag planes):

    vandermonde:            K[r, l] = 2 Re sum_n w[r, n] V[r, n, l]          (_vand_fwd_kernel, reduces over n)
    vandermonde_transpose:  S[r, n] = sum_l u[r, l] V[r, n, l]               (_vand_reduce_kernel, reduces over l)

Each is the other's backward (derivation in README.md): dK -> (dw, dz) is a reduction over l, and dS -> du is a
Vandermonde product with w = conj(dS) / 2.  The reduction kernel also returns Q = sum_l g (l + s) V, the
derivative of S with respect to z, so no kernel needs a third pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_utils import autotune_or_fixed

__all__ = ["vandermonde_triton", "vandermonde_transpose_triton"]


@autotune_or_fixed(
    [triton.Config({"BL": bl, "BN": bn}, num_warps=w) for bl in (64, 128, 256) for bn in (16, 32) for w in (4, 8)],
    key=["N"],
    default=triton.Config({"BL": 64, "BN": 16}, num_warps=4),
)
@triton.jit
def _vand_fwd_kernel(z_re, z_im, w_re, w_im, out, L, shift, RZ, N: tl.constexpr, BL: tl.constexpr,
                     BN: tl.constexpr):
    # One program per (row r, block of positions); the modes are summed in registers, BN at a time.
    i_r, i_l = tl.program_id(0), tl.program_id(1)
    i_r64 = tl.cast(i_r, tl.int64)
    i_z = i_r64 % RZ
    o_l = tl.cast(i_l, tl.int64) * BL + tl.arange(0, BL)
    m_l = o_l < L
    b_pos = (o_l + shift).to(tl.float32)  # [BL]
    b_acc = tl.zeros([BL], dtype=tl.float32)
    for i_n in range(0, tl.cdiv(N, BN)):
        o_n = tl.cast(i_n, tl.int64) * BN + tl.arange(0, BN)
        m_n = o_n < N
        b_zr = tl.load(z_re + i_z * N + o_n, mask=m_n, other=0.0)  # [BN]
        b_zi = tl.load(z_im + i_z * N + o_n, mask=m_n, other=0.0)
        b_wr = tl.load(w_re + i_r64 * N + o_n, mask=m_n, other=0.0)
        b_wi = tl.load(w_im + i_r64 * N + o_n, mask=m_n, other=0.0)
        # The exponent is one product (l + s) * z per element, as in the reference (same rounding).
        b_mag = tl.exp(b_zr[:, None] * b_pos[None, :])  # [BN, BL]
        b_ang = b_zi[:, None] * b_pos[None, :]  # [BN, BL]
        b_val = b_wr[:, None] * tl.cos(b_ang) - b_wi[:, None] * tl.sin(b_ang)
        b_acc += tl.sum(b_mag * b_val, 0)
    tl.store(out + i_r64 * L + o_l, 2.0 * b_acc, mask=m_l)


@autotune_or_fixed(
    [triton.Config({"BL": bl, "BN": bn}, num_warps=w) for bl in (64, 128) for bn in (16, 32, 64) for w in (4, 8)],
    key=["N", "WITH_Q"],
    default=triton.Config({"BL": 64, "BN": 16}, num_warps=4),
)
@triton.jit
def _vand_reduce_kernel(z_re, z_im, g, p_re, p_im, q_re, q_im, L, shift, RZ, N: tl.constexpr,
                        WITH_Q: tl.constexpr, BL: tl.constexpr, BN: tl.constexpr):
    # One program per (row r, block of modes); positions stream through in blocks of BL.
    # P = sum_l g[l] V[l], and with WITH_Q also Q = sum_l g[l] (l + s) V[l].
    i_r, i_n = tl.program_id(0), tl.program_id(1)
    i_r64 = tl.cast(i_r, tl.int64)
    i_z = i_r64 % RZ
    o_n = tl.cast(i_n, tl.int64) * BN + tl.arange(0, BN)
    m_n = o_n < N
    b_zr = tl.load(z_re + i_z * N + o_n, mask=m_n, other=0.0)  # [BN]
    b_zi = tl.load(z_im + i_z * N + o_n, mask=m_n, other=0.0)
    b_pr = tl.zeros([BN], dtype=tl.float32)
    b_pi = tl.zeros([BN], dtype=tl.float32)
    b_qr = tl.zeros([BN], dtype=tl.float32)
    b_qi = tl.zeros([BN], dtype=tl.float32)
    for i_l in range(0, tl.cdiv(L, BL)):
        o_l = tl.cast(i_l, tl.int64) * BL + tl.arange(0, BL)
        m_l = o_l < L
        b_g = tl.load(g + i_r64 * L + o_l, mask=m_l, other=0.0)  # [BL]
        b_pos = (o_l + shift).to(tl.float32)
        b_mag = tl.exp(b_zr[:, None] * b_pos[None, :]) * b_g[None, :]  # [BN, BL]
        b_ang = b_zi[:, None] * b_pos[None, :]
        b_c = b_mag * tl.cos(b_ang)
        b_s = b_mag * tl.sin(b_ang)
        b_pr += tl.sum(b_c, 1)
        b_pi += tl.sum(b_s, 1)
        if WITH_Q:
            b_qr += tl.sum(b_c * b_pos[None, :], 1)
            b_qi += tl.sum(b_s * b_pos[None, :], 1)
    tl.store(p_re + i_r64 * N + o_n, b_pr, mask=m_n)
    tl.store(p_im + i_r64 * N + o_n, b_pi, mask=m_n)
    if WITH_Q:
        tl.store(q_re + i_r64 * N + o_n, b_qr, mask=m_n)
        tl.store(q_im + i_r64 * N + o_n, b_qi, mask=m_n)


def _vand_fwd(z_re: Tensor, z_im: Tensor, w_re: Tensor, w_im: Tensor, length: int, shift: int) -> Tensor:
    rows, n = w_re.shape
    out = torch.empty(rows, length, device=w_re.device, dtype=torch.float32)

    def grid(meta):
        return rows, triton.cdiv(length, meta["BL"])

    _vand_fwd_kernel[grid](z_re, z_im, w_re, w_im, out, length, shift, z_re.shape[0], N=n)
    return out


def _vand_reduce(z_re: Tensor, z_im: Tensor, g: Tensor, shift: int, with_q: bool) -> tuple[Tensor, ...]:
    rows, length = g.shape
    n = z_re.shape[1]
    outs = [torch.empty(rows, n, device=g.device, dtype=torch.float32) for _ in range(4 if with_q else 2)]
    q_re, q_im = (outs[2], outs[3]) if with_q else (outs[0], outs[1])

    def grid(meta):
        return rows, triton.cdiv(n, meta["BN"])

    _vand_reduce_kernel[grid](z_re, z_im, g, outs[0], outs[1], q_re, q_im, length, shift, z_re.shape[0], N=n,
                              WITH_Q=with_q)
    return tuple(outs)


def _fold_rows(x: Tensor, rz: int) -> Tensor:
    # A z row is shared by every r with the same r % RZ: its gradient is the sum over those rows.
    return x.reshape(-1, rz, x.shape[-1]).sum(0)


# Registered as torch.library custom ops (memzoo::ssm_vandermonde, memzoo::ssm_vandermonde_transpose) so that
# torch.compile sees one opaque op with a fake (shape-only) implementation instead of breaking the graph; each
# op's backward calls the other.


@torch.library.custom_op("memzoo::ssm_vandermonde", mutates_args=())
def _vandermonde_op(z_re: Tensor, z_im: Tensor, w_re: Tensor, w_im: Tensor, length: int, shift: int) -> Tensor:
    return _vand_fwd(z_re, z_im, w_re, w_im, length, shift)


@_vandermonde_op.register_fake
def _(z_re, z_im, w_re, w_im, length, shift):
    return w_re.new_empty(w_re.shape[0], length, dtype=torch.float32)


@torch.library.custom_op("memzoo::ssm_vandermonde_transpose", mutates_args=())
def _transpose_op(z_re: Tensor, z_im: Tensor, u: Tensor, shift: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(S_re, S_im, Q_re, Q_im)``, each fp32 ``[R, N]``: the sum and its derivative in z."""
    return _vand_reduce(z_re, z_im, u, shift, True)


@_transpose_op.register_fake
def _(z_re, z_im, u, shift):
    return tuple(u.new_empty(u.shape[0], z_re.shape[1], dtype=torch.float32) for _ in range(4))


def _vandermonde_setup(ctx, inputs, output) -> None:
    z_re, z_im, w_re, w_im, _, shift = inputs
    ctx.save_for_backward(z_re, z_im, w_re, w_im)
    ctx.shift = shift


def _vandermonde_backward(ctx, dk):
    z_re, z_im, w_re, w_im = ctx.saved_tensors
    p_re, p_im, q_re, q_im = _transpose_op(z_re, z_im, dk.float().contiguous(), ctx.shift)
    # K = 2 Re(w V): dK/dw_re = 2 Re V, dK/dw_im = -2 Im V; dK/dz = 2 (l + s) w V (holomorphic in z).
    dw_re, dw_im = 2 * p_re, -2 * p_im
    dz_re = _fold_rows(2 * (w_re * q_re - w_im * q_im), z_re.shape[0])
    dz_im = _fold_rows(-2 * (w_re * q_im + w_im * q_re), z_re.shape[0])
    return dz_re, dz_im, dw_re, dw_im, None, None


def _transpose_setup(ctx, inputs, output) -> None:
    z_re, z_im, u, shift = inputs
    ctx.save_for_backward(z_re, z_im, output[2], output[3])
    ctx.shift, ctx.length = shift, u.shape[1]


def _transpose_backward(ctx, ds_re, ds_im, dq_re, dq_im):
    # Q is an intermediate the public function drops: its gradients are None or zero.
    z_re, z_im, q_re, q_im = ctx.saved_tensors
    ds_re = torch.zeros_like(q_re) if ds_re is None else ds_re.float().contiguous()
    ds_im = torch.zeros_like(q_im) if ds_im is None else ds_im.float().contiguous()
    # du[l] = Re(conj(dS) V[l]) summed over n = a Vandermonde product with w = conj(dS) / 2.
    du = _vandermonde_op(z_re, z_im, 0.5 * ds_re, -0.5 * ds_im, ctx.length, ctx.shift)
    # dS/dz = Q (holomorphic): dz_re = Re(conj(dS) Q), dz_im = Re(conj(dS) i Q).
    dz_re = _fold_rows(ds_re * q_re + ds_im * q_im, z_re.shape[0])
    dz_im = _fold_rows(ds_im * q_re - ds_re * q_im, z_re.shape[0])
    return dz_re, dz_im, du, None


_vandermonde_op.register_autograd(_vandermonde_backward, setup_context=_vandermonde_setup)
_transpose_op.register_autograd(_transpose_backward, setup_context=_transpose_setup)


def vandermonde_triton(z_re: Tensor, z_im: Tensor, w_re: Tensor, w_im: Tensor, length: int, shift: int = 0
                       ) -> Tensor:
    """Fused ``vandermonde_ref``: fp32 ``[R, L]``; inputs are cast to contiguous fp32."""
    args = [t.float().contiguous() for t in (z_re, z_im, w_re, w_im)]
    return _vandermonde_op(*args, length, shift)


def vandermonde_transpose_triton(z_re: Tensor, z_im: Tensor, u: Tensor, shift: int = 0) -> tuple[Tensor, Tensor]:
    """Fused ``vandermonde_transpose_ref``: fp32 ``(S_re, S_im)`` ``[R, N]``."""
    args = [t.float().contiguous() for t in (z_re, z_im, u)]
    s_re, s_im, _, _ = _transpose_op(*args, shift)
    return s_re, s_im
