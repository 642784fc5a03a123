"""Roofline floors: FLOPs and HBM bytes of every op at the benchmark shapes, and the fastest an H100 could run them.

    python benchmarks/roofline.py            # the table for every op at the shapes benchmarks/*.py time

floor = max(FLOPs / peak, bytes / bandwidth) on an H100 SXM: 989 TFLOP/s dense bf16 on tensor cores (matmul ops),
67 TFLOP/s fp32 on the CUDA cores (S4D's complex exponentials are not matmuls), 3.35 TB/s HBM.

What is counted (a floor, so the least work any implementation of the algorithm does):
- FLOPs: 2 per multiply-add of the op's matmuls in its chunked form (chunk C), full C x C tiles as the kernels
  compute them; elementwise gating is not counted.  Backward = 2 x forward for the matmul ops (each matmul has two
  gradient matmuls), 2.5 x for attention (FlashAttention's count: five matmuls against two).
- Bytes: compulsory traffic only: every input read once and every output written once (forward: q, k, v, gates ->
  o; backward additionally do -> dq, dk, dv, dgates); intermediates that a fused kernel keeps on chip cost nothing.

``cost(op, **shape)`` returns ``{"fwd": Cost, "fwdbwd": Cost}``; benchmark scripts print ``measured / floor`` with
``vs_floor``.  The floors are lower bounds, so the ratio is >= 1 and says how far a kernel is from the hardware.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

H100_BF16_FLOPS = 989e12
H100_FP32_FLOPS = 67e12
H100_HBM_BYTES = 3.35e12

__all__ = ["Cost", "cost", "vs_floor", "BENCH_SHAPES", "OPS", "H100_BF16_FLOPS", "H100_FP32_FLOPS",
           "H100_HBM_BYTES"]


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float
    peak_flops: float = H100_BF16_FLOPS

    @property
    def floor_ms(self) -> float:
        return 1e3 * max(self.flops / self.peak_flops, self.bytes / H100_HBM_BYTES)

    @property
    def bound(self) -> str:
        return "compute" if self.flops / self.peak_flops >= self.bytes / H100_HBM_BYTES else "memory"

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes, self.peak_flops)


def _fwdbwd(fwd: Cost, bwd_flops_factor: float, bwd_bytes: float) -> dict[str, Cost]:
    return {"fwd": fwd, "fwdbwd": Cost(fwd.flops * (1 + bwd_flops_factor), fwd.bytes + bwd_bytes, fwd.peak_flops)}


def attention(B: int, T: int, H: int, D: int, elt: int = 2) -> dict[str, Cost]:
    """Causal softmax attention (SDPA): QK^T and PV over the lower triangle, 2 * 2 * T^2 / 2 * D per head."""
    flops = 2.0 * B * H * T * T * D
    io = B * T * H * D * elt
    # forward: q, k, v in, o out; backward: q, k, v, o, do in, dq, dk, dv out
    return _fwdbwd(Cost(flops, 4 * io), 2.5, 8 * io)


def _linear_rnn(B, T, H, K, V, per_token_mm: float, gate_bytes: float, elt: int) -> dict[str, Cost]:
    flops = B * H * T * per_token_mm
    io = B * T * H * (2 * K + 2 * V) * elt + B * T * H * gate_bytes
    # backward reads q, k, v, gates, do and writes dq, dk, dv, dgates: the forward's traffic plus do and dgates
    bwd = io + B * T * H * V * elt + B * T * H * gate_bytes
    return _fwdbwd(Cost(flops, io), 2.0, bwd)


def gla(B: int, T: int, H: int, D: int, C: int = 64, elt: int = 2) -> dict[str, Cost]:
    """Chunked GLA, per token: q h (2KV), the state update k^T v (2KV), A = q k^T (2CK), A v (2CV); fp32 gate
    per key."""
    K = V = D
    return _linear_rnn(B, T, H, K, V, 4 * K * V + 2 * C * (K + V), 4 * K, elt)


def gated_delta(B: int, T: int, H: int, D: int, C: int = 64, elt: int = 2) -> dict[str, Cost]:
    """Chunked gated delta rule, per token: the WY form (k k^T 2CK, w = A k 2CK, u = A v 2CV), the state pass (w h,
    k^T u: 4KV), the output (q h 2KV, q k^T 2CK, A u 2CV); fp32 gate and beta per head."""
    K = V = D
    return _linear_rnn(B, T, H, K, V, 6 * K * V + 2 * C * (3 * K + 2 * V), 8, elt)


def titans_linear(B: int, T: int, H: int, D: int, C: int = 16, elt: int = 2) -> dict[str, Cost]:
    """Linear Titans memory, exact chunked form, per token: prediction k W and its gradient k^T e (4KV), the read
    q W (2KV), intra-chunk q k^T and k k^T (4CK) times the errors (4CV, momentum and plain); fp32 theta, eta,
    gamma per head."""
    K = V = D
    return _linear_rnn(B, T, H, K, V, 6 * K * V + 4 * C * (K + V), 12, elt)


def titans_mlp(B: int, T: int, H: int, D: int, C: int = 16, expansion: int = 4, elt: int = 2) -> dict[str, Cost]:
    """2-layer MLP memory (E = expansion * D), per token: the read through both matrices (4DE), the write's forward
    (4DE) and its gradients (two weight gradients and one activation gradient: 6DE), intra-chunk products with the
    C x C key Gram matrix for both layers (2C(D + E)) twice (momentum and plain)."""
    E = expansion * D
    return _linear_rnn(B, T, H, D, D, 14 * D * E + 4 * C * (D + E), 12, elt)


def mom(B: int, T: int, d_model: int = 1024, H: int = 4, D: int = 256, M: int = 4, topk: int = 2,
        shared: bool = True, C: int = 64, elt: int = 2) -> dict[str, Cost]:
    """MixtureOfMemories layer: each token goes to ``topk`` routed gated-delta memories plus the shared one.
    Projections: q, output gate and o_proj on every token; k, v, beta, decay per memory on its routed tokens;
    the router.  Memories: one gated-delta pass over topk + shared tokens per token."""
    n_mem = topk + int(shared)
    proj = 2.0 * B * T * d_model * (H * D * 3 + M + n_mem * (2 * H * D + 2 * H))
    weights = d_model * (H * D * 3 + M + (M + int(shared)) * (2 * H * D + 2 * H)) * elt
    rule = gated_delta(B, T * n_mem, H, D, C, elt)
    x_io = 2 * B * T * d_model * elt
    fwd = Cost(proj, weights + x_io) + rule["fwd"]
    # backward: projections 2x (input and weight gradients), x/dx/dy traffic, weight gradients written
    bwd = Cost(2 * proj, 2 * weights + 2 * x_io) + Cost(rule["fwdbwd"].flops - rule["fwd"].flops,
                                                        rule["fwdbwd"].bytes - rule["fwd"].bytes)
    return {"fwd": fwd, "fwdbwd": fwd + bwd}


def s4d(B: int, L: int, H: int, N: int) -> dict[str, Cost]:
    """S4D layer: kernel generation K[h, l] = 2 Re sum_n w z^l (per (h, n, l): a complex exp, ~4 FLOPs of sincos/exp
    counted as 4, and a complex multiply-add, 8) and the causal FFT convolution of length 2L (three FFTs, 5 n log2 n
    each, per channel and batch row); fp32 on the CUDA cores."""
    gen = 12.0 * H * N * L
    n = 2 * L
    fft = B * H * 3 * 5.0 * n * math.log2(n)
    io = 4 * (2 * B * L * H + H * L + 4 * H * N)
    fwd = Cost(gen + fft, io, H100_FP32_FLOPS)
    # backward: the transposed Vandermonde product (same count) and two more FFT passes; x, dy in, dx, dK out
    bwd = Cost(gen + fft, io + 4 * B * L * H, H100_FP32_FLOPS)
    return {"fwd": fwd, "fwdbwd": fwd + bwd}


def retrieval(B: int, T: int, H: int, D: int, n_chunks: int, k: int, q_elt: int = 4, key_elt: int = 2
              ) -> dict[str, Cost]:
    """Exact chunk top-k: scores q . kc for every query and chunk key (2D per pair); reads q and the bank once,
    writes fp32 scores and int64 indices.  Forward only (retrieval is not differentiated)."""
    flops = 2.0 * B * H * T * n_chunks * D
    io = B * H * T * D * q_elt + B * H * n_chunks * D * key_elt + 16 * B * n_chunks + 12 * B * H * T * k
    return {"fwd": Cost(flops, io)}


OPS: dict[str, Callable[..., dict[str, Cost]]] = {
    "attention": attention, "gated_delta": gated_delta, "gla": gla, "titans_linear": titans_linear,
    "titans_mlp": titans_mlp, "mom": mom, "s4d": s4d, "retrieval": retrieval,
}

# The shapes benchmarks/*.py time on a GPU (kernels.py, titans.py, mom.py, ssm.py, longmem.py).
_KERNEL_SHAPES = [(4, 2048, 16, 128), (4, 4096, 16, 128), (1, 16384, 16, 128), (8, 2048, 32, 64)]
BENCH_SHAPES: dict[str, list[dict]] = {
    "attention": [dict(B=b, T=t, H=h, D=d) for b, t, h, d in _KERNEL_SHAPES],
    "gated_delta": [dict(B=b, T=t, H=h, D=d) for b, t, h, d in _KERNEL_SHAPES]
    + [dict(B=1, T=t, H=16, D=64) for t in (2048, 8192)],
    "gla": [dict(B=b, T=t, H=h, D=d) for b, t, h, d in _KERNEL_SHAPES],
    "titans_linear": [dict(B=1, T=t, H=16, D=64) for t in (2048, 8192)],
    "titans_mlp": [dict(B=1, T=t, H=16, D=64) for t in (2048, 8192)],
    "mom": [dict(B=1, T=t) for t in (2048, 8192)],
    "s4d": [dict(B=1, L=4096, H=1024, N=64), dict(B=1, L=16384, H=1024, N=64)],
    "retrieval": [dict(B=1, T=1024, H=16, D=64, n_chunks=n // 4, k=16) for n in (16384, 65536, 262144)],
}


def cost(op: str, **shape) -> dict[str, Cost]:
    """``{"fwd": Cost, "fwdbwd": Cost}`` (retrieval: forward only) of ``op`` at ``shape``."""
    if op not in OPS:
        raise ValueError(f"op must be one of {sorted(OPS)}, got {op!r}")
    return OPS[op](**shape)


def vs_floor(measured_ms: float | None, op: str, mode: str = "fwdbwd", **shape) -> float | None:
    """measured time / H100 floor (>= 1 on an H100; None when there is no measurement)."""
    if measured_ms is None:
        return None
    return measured_ms / cost(op, **shape)[mode].floor_ms


def table() -> list[dict]:
    rows = []
    for op, shapes in BENCH_SHAPES.items():
        for shape in shapes:
            for mode, c in cost(op, **shape).items():
                rows.append({"op": op, "shape": ",".join(f"{k}={v}" for k, v in shape.items()), "pass": mode,
                             "GFLOP": c.flops / 1e9, "MB": c.bytes / 1e6, "floor_us": 1e3 * c.floor_ms,
                             "bound": c.bound})
    return rows


def main() -> None:
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import print_table

    print(f"H100 floors: {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s bf16 (fp32 {H100_FP32_FLOPS / 1e12:.0f} for s4d), "
          f"{H100_HBM_BYTES / 1e12:.2f} TB/s")
    print_table(table(), ["op", "shape", "pass", "GFLOP", "MB", "floor_us", "bound"])


if __name__ == "__main__":
    main()
