"""benchmarks/roofline.py: FLOP and byte counts against hand computations from the matmul shapes."""

from __future__ import annotations

import pytest
from bench_scripts import load_benchmark

roofline = load_benchmark("roofline")


def test_gla_one_chunk_by_hand():
    # One chunk of C = 64 tokens, one head, K = V = 16, bf16 inputs, fp32 per-key gates.
    T = C = 64
    K = V = 16
    matmuls = [
        (T, K, V),  # o_inter = q h: [T, K] @ [K, V]
        (K, T, V),  # h' = k^T v: [K, T] @ [T, V]
        (T, K, T),  # A = q k^T: [T, K] @ [K, T]
        (T, T, V),  # o_intra = A v: [T, T] @ [T, V]
    ]
    flops = sum(2 * m * k * n for m, k, n in matmuls)
    assert flops == 327_680
    read_write = (T * K * 2) * 2 + (T * V * 2) * 2 + T * K * 4  # q, k, v, o in bf16; g in fp32
    c = roofline.cost("gla", B=1, T=T, H=1, D=16, C=C)
    assert c["fwd"].flops == flops
    assert c["fwd"].bytes == read_write
    # backward: twice the matmul work; reads do and writes dq, dk, dv, dg on top of the forward's traffic
    assert c["fwdbwd"].flops == 3 * flops
    assert c["fwdbwd"].bytes == read_write + (read_write + T * V * 2 + T * K * 4)


def test_attention_and_floor_by_hand():
    # causal attention, B=2, T=4096, H=8, D=64: QK^T and PV over half the T x T scores (34 GFLOP vs 34 MB)
    B, T, H, D = 2, 4096, 8, 64
    flops = 2 * (2 * B * H * T * T * D) / 2
    c = roofline.cost("attention", B=B, T=T, H=H, D=D)["fwd"]
    assert c.flops == flops
    assert c.bytes == 4 * B * T * H * D * 2
    assert c.floor_ms == pytest.approx(1e3 * max(flops / 989e12, c.bytes / 3.35e12))
    assert c.bound == "compute"


def test_retrieval_is_forward_only_and_vs_floor():
    c = roofline.cost("retrieval", B=1, T=1024, H=16, D=64, n_chunks=16384, k=16)
    assert set(c) == {"fwd"}
    assert c["fwd"].flops == 2 * 16 * 1024 * 16384 * 64
    floor = c["fwd"].floor_ms
    assert roofline.vs_floor(3 * floor, "retrieval", "fwd", B=1, T=1024, H=16, D=64, n_chunks=16384, k=16) \
        == pytest.approx(3.0)
    assert roofline.vs_floor(None, "gla", B=1, T=64, H=1, D=16) is None
    with pytest.raises(ValueError, match="op must be one of"):
        roofline.cost("nope")


def test_every_benchmark_shape_has_a_finite_floor():
    for op, shapes in roofline.BENCH_SHAPES.items():
        for shape in shapes:
            for c in roofline.cost(op, **shape).values():
                assert c.flops > 0 and c.bytes > 0 and 0 < c.floor_ms < 1e3, (op, shape)
