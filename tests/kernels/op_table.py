"""Every public op called through its dispatcher on small inputs: shared by the dispatch and compile tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from memzoo.kernels.gated_delta import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
from memzoo.kernels.gla import chunk_gla, chunk_simple_gla, fused_recurrent_gla
from memzoo.kernels.retrieval import chunk_topk
from memzoo.kernels.ssm import vandermonde, vandermonde_transpose
from memzoo.kernels.titans import titans_linear, titans_mlp

B, H, K, E = 1, 2, 16, 32


@dataclass
class OpCase:
    """``run(impl, *inputs)`` calls the op; ``inputs(T)`` builds its tensor arguments for T tokens."""

    name: str
    inputs: Callable[[int], list[Tensor]]
    run: Callable[..., tuple[Tensor, ...]]
    # Indices of the inputs that are states passed through unchanged at T = 0.
    states: tuple[int, ...] = ()
    differentiable: bool = True
    # The Triton path has a backward (the fused recurrent kernels are forward-only).
    triton_backward: bool = True


def _gen(T: int) -> torch.Generator:
    return torch.Generator().manual_seed(T + 1)


def _qkv(T: int, g: torch.Generator) -> list[Tensor]:
    return [torch.randn(B, T, H, K, generator=g) * 0.5 for _ in range(3)]


def _delta_inputs(T: int) -> list[Tensor]:
    g = _gen(T)
    return [*_qkv(T, g), -torch.rand(B, T, H, generator=g), torch.rand(B, T, H, generator=g),
            torch.randn(B, H, K, K, generator=g) * 0.1]


def _gla_inputs(T: int, per_key: bool = True) -> list[Tensor]:
    g = _gen(T)
    shape = (B, T, H, K) if per_key else (B, T, H)
    return [*_qkv(T, g), -torch.rand(*shape, generator=g) * 0.2, torch.randn(B, H, K, K, generator=g) * 0.1]


def _titans_inputs(T: int, mlp: bool = False) -> list[Tensor]:
    g = _gen(T)
    gates = [torch.rand(B, T, H, generator=g) * 0.1 for _ in range(2 if mlp else 1)]
    gates += [-torch.rand(B, T, H, generator=g), -torch.rand(B, T, H, generator=g) * 0.1]
    shapes = [(B, H, E, K)] * 3 + [(B, H, K, E)] * 3 if mlp else [(B, H, K, K)] * 3
    return [*_qkv(T, g), *gates, *(torch.randn(*s, generator=g) * 0.1 for s in shapes)]


def _pair(out: tuple[Tensor, Tensor | tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    o, state = out
    return (o, *(state if isinstance(state, tuple) else (state,)))


def _delta(op):
    def run(impl, q, k, v, g, beta, h0):
        return _pair(op(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=True, impl=impl,
                        chunk_size=16))
    return run


def _gla(op):
    def run(impl, q, k, v, g, h0):
        return _pair(op(q, k, v, g, initial_state=h0, output_final_state=True, impl=impl, chunk_size=16))
    return run


def _titans_linear(impl, q, k, v, theta, log_eta, log_gamma, *state):
    start = torch.zeros(B, dtype=torch.int64)
    return _pair(titans_linear(q, k, v, theta, log_eta, log_gamma, state, start, 16, impl=impl))


def _titans_mlp(impl, q, k, v, theta1, theta2, log_eta, log_gamma, *state):
    start = torch.zeros(B, dtype=torch.int64)
    return _pair(titans_mlp(q, k, v, theta1, theta2, log_eta, log_gamma, state, start, 16, impl=impl))


def _vand_inputs(T: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(7)
    z_re, z_im = -torch.rand(2, 4, generator=g) * 0.2 - 1e-3, torch.randn(2, 4, generator=g)
    # T is the length the op generates: carried by an integer [T] placeholder (no gradient) that only sets it.
    return [z_re, z_im, torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g),
            torch.zeros(T, dtype=torch.int64)]


def _vand(impl, z_re, z_im, w_re, w_im, length_of):
    return (vandermonde(z_re, z_im, w_re, w_im, length_of.shape[0], 1, impl=impl),)


def _vand_t_inputs(T: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(8)
    return [-torch.rand(2, 4, generator=g) * 0.2 - 1e-3, torch.randn(2, 4, generator=g), torch.randn(4, T, generator=g)]


def _vand_t(impl, z_re, z_im, u):
    return vandermonde_transpose(z_re, z_im, u, impl=impl)


def _topk_inputs(T: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(9)
    return [torch.randn(B, H, T, K, generator=g), torch.randn(B, H, 24, K, generator=g)]


def _topk(impl, q, keys):
    return chunk_topk(q, keys, 3, impl=impl)


OPS = [
    OpCase("chunk_gated_delta_rule", _delta_inputs, _delta(chunk_gated_delta_rule), states=(5,)),
    OpCase("fused_recurrent_gated_delta_rule", _delta_inputs, _delta(fused_recurrent_gated_delta_rule), states=(5,),
           triton_backward=False),
    OpCase("chunk_gla", _gla_inputs, _gla(chunk_gla), states=(4,)),
    OpCase("chunk_simple_gla", lambda T: _gla_inputs(T, per_key=False), _gla(chunk_simple_gla), states=(4,)),
    OpCase("fused_recurrent_gla", _gla_inputs, _gla(fused_recurrent_gla), states=(4,), triton_backward=False),
    OpCase("titans_linear", _titans_inputs, _titans_linear, states=(6, 7, 8)),
    OpCase("titans_mlp", lambda T: _titans_inputs(T, mlp=True), _titans_mlp, states=tuple(range(7, 13))),
    OpCase("vandermonde", _vand_inputs, _vand),
    OpCase("vandermonde_transpose", _vand_t_inputs, _vand_t),
    OpCase("chunk_topk", _topk_inputs, _topk, differentiable=False),
]
IDS = [op.name for op in OPS]
