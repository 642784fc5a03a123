"""Diagonal state-space ops (S4D): ``vandermonde`` (kernel generation, state read-out) and
``vandermonde_transpose`` (the state after a segment), each dispatching between the PyTorch reference and
Triton kernels.

Paper: "On the Parameterization and Initialization of Diagonal State Space Models" (arXiv 2206.11893).
With V[n, l] = exp((l + s) z_n):  K[l] = 2 Re sum_n w_n V[n, l];  S_n = sum_l u[l] V[n, l].
The convolution itself stays on ``torch.fft``.  ``impl="auto"`` picks Triton for CUDA inputs, the reference
otherwise.
"""

from __future__ import annotations

from torch import Tensor

from .. import EMPTY, dispatch, with_empty_grads
from .reference import diag_ssm_recurrent_ref, vandermonde_ref, vandermonde_transpose_ref

__all__ = ["vandermonde", "vandermonde_transpose", "vandermonde_ref", "vandermonde_transpose_ref",
           "diag_ssm_recurrent_ref"]


def _check(z_re: Tensor, z_im: Tensor, other: Tensor, name: str, shift: int) -> None:
    if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
        raise ValueError(f"shift must be an int >= 0, got {shift!r}")
    if z_re.dim() != 2 or z_re.shape != z_im.shape:
        raise ValueError(f"z_re and z_im must both be [RZ, N], got {tuple(z_re.shape)} and {tuple(z_im.shape)}")
    if other.dim() != 2 or other.shape[0] % z_re.shape[0]:
        raise ValueError(f"{name} must be [R, ...] with R a multiple of RZ={z_re.shape[0]}, got {tuple(other.shape)}")


def vandermonde(z_re: Tensor, z_im: Tensor, w_re: Tensor, w_im: Tensor, length: int, shift: int = 0, *,
                impl: str = "auto") -> Tensor:
    """``K[r, l] = 2 Re sum_n w[r, n] exp((l + shift) z[r % RZ, n])``, differentiable in z and w.

    Args:
        z_re, z_im: ``[RZ, N]`` log-transitions; w_re, w_im: ``[R, N]``; length: L; shift: first exponent.
        impl: ``"auto"`` | ``"triton"`` | ``"ref"``.

    Returns:
        ``[R, L]`` (fp32 on the Triton path, z's dtype on the reference path).
    """
    _check(z_re, z_im, w_re, "w", shift)
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be an int >= 0, got {length!r}")
    if w_re.shape != w_im.shape or w_re.shape[1] != z_re.shape[1]:
        raise ValueError(f"w_re and w_im must both be [R, N={z_re.shape[1]}], got {tuple(w_re.shape)}")
    path = dispatch("vandermonde", impl, z_re, tokens=length)
    if path == EMPTY:
        return with_empty_grads(w_re.new_zeros(w_re.shape[0], 0, dtype=z_re.dtype), z_re, z_im, w_re, w_im)
    if path == "ref":
        return vandermonde_ref(z_re, z_im, w_re, w_im, length, shift)
    from .triton_vandermonde import vandermonde_triton

    return vandermonde_triton(z_re, z_im, w_re, w_im, length, shift)


def vandermonde_transpose(z_re: Tensor, z_im: Tensor, u: Tensor, shift: int = 0, *,
                          impl: str = "auto") -> tuple[Tensor, Tensor]:
    """``S[r, n] = sum_l u[r, l] exp((l + shift) z[r % RZ, n])``, differentiable in z and u.

    Args:
        z_re, z_im: ``[RZ, N]``; u: real ``[R, L]``.

    Returns:
        ``(S_re, S_im)`` ``[R, N]``.
    """
    _check(z_re, z_im, u, "u", shift)
    path = dispatch("vandermonde_transpose", impl, z_re, tokens=u.shape[1])
    if path == EMPTY:
        # A sum over no terms: zeros [R, N], with zero gradients for z and u.
        zeros = u.new_zeros(u.shape[0], z_re.shape[1], dtype=z_re.dtype)
        return with_empty_grads(zeros, z_re, u), with_empty_grads(zeros.clone(), z_im, u)
    if path == "ref":
        return vandermonde_transpose_ref(z_re, z_im, u, shift)
    from .triton_vandermonde import vandermonde_transpose_triton

    return vandermonde_transpose_triton(z_re, z_im, u, shift)
