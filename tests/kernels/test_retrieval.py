"""Exact chunk top-k: the tiled PyTorch path and the Triton kernel (GPU, or CPU under TRITON_INTERPRET=1) against
the full-matrix specification ``chunk_topk_naive``, bit for bit on scores and indices.

Most cases use small integer-valued q and keys: every product and sum is exact in fp32 (and fp16), so all paths
produce identical scores whatever their summation order, and duplicate keys make genuine ties."""

import os

import pytest
import torch

from memzoo.kernels.retrieval import chunk_topk, chunk_topk_naive, chunk_topk_tiled

needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="Triton needs a CUDA device or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PATHS = [pytest.param("tiled", id="tiled"), pytest.param("triton", id="triton", marks=needs_triton)]


def run(path, q, keys, k, valid=None, stamp=None, block_n=None):
    if path == "tiled":
        return chunk_topk(q, keys, k, valid=valid, stamp=stamp, impl="ref", block_n=block_n)
    q, keys = q.to(DEVICE), keys.to(DEVICE)
    valid = None if valid is None else valid.to(DEVICE)
    stamp = None if stamp is None else stamp.to(DEVICE)
    scores, idx = chunk_topk(q, keys, k, valid=valid, stamp=stamp, impl="triton", block_n=block_n)
    return scores.cpu(), idx.cpu()


def int_inputs(B, H, T, N, d, seed, dtype=torch.float32, n_dup=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-3, 4, (B, H, T, d), generator=g).to(dtype)
    keys = torch.randint(-2, 3, (B, H, N, d), generator=g).to(dtype)
    # Duplicate keys score exactly alike: only the stamp (then the index) can order them.
    for _ in range(n_dup):
        src, dst = torch.randint(0, N, (2,), generator=g).tolist()
        keys[:, :, dst] = keys[:, :, src]
    return q, keys


def assert_same(got, want, msg=""):
    scores, idx = got
    assert scores.dtype == torch.float32 and idx.dtype == torch.int64
    assert torch.equal(idx, want[1]), f"{msg}: idx differ at {(idx != want[1]).nonzero()[:5].tolist()}"
    assert torch.equal(scores, want[0]), f"{msg}: scores differ"


# (B, H, T, N, d, k, block_n): tiles that do not divide N, k above N, one tile, tiny tiles.
CASES = [
    pytest.param(1, 1, 1, 16, 16, 1, None, id="single"),
    pytest.param(2, 3, 7, 100, 16, 5, 16, id="tiles-not-dividing"),
    pytest.param(2, 2, 33, 70, 32, 8, 32, id="T33-N70"),
    pytest.param(1, 2, 5, 9, 16, 12, None, id="k-above-N"),
    pytest.param(3, 1, 17, 130, 64, 16, 64, id="d64-k16"),
    pytest.param(2, 2, 4, 45, 24, 3, 16, id="d24-not-pow2"),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("B, H, T, N, d, k, block_n", CASES)
def test_matches_naive_with_ties_stamps_and_valid(path, B, H, T, N, d, k, block_n):
    q, keys = int_inputs(B, H, T, N, d, seed=N + T, n_dup=N // 3)
    g = torch.Generator().manual_seed(1)
    valid = torch.rand(B, N, generator=g) > 0.25
    # Stamps: a permutation per row, with some repeats so the index rule also gets exercised.
    stamp = torch.stack([torch.randperm(N, generator=g) for _ in range(B)]) // 2
    for v, s in ((None, None), (valid, None), (None, stamp), (valid, stamp)):
        want = chunk_topk_naive(q, keys, k, valid=v, stamp=s)
        assert_same(run(path, q, keys, k, v, s, block_n), want, f"valid={v is not None} stamp={s is not None}")


@pytest.mark.parametrize("path", PATHS)
def test_ties_break_to_the_newest_chunk(path):
    # Four identical keys: the order is by stamp (newest first), then index for equal stamps.
    keys = torch.zeros(1, 1, 20, 16)
    keys[0, 0, [2, 5, 11, 17], 0] = 1.0
    q = torch.zeros(1, 1, 1, 16)
    q[..., 0] = 2.0
    stamp = torch.arange(20)[None].clone()
    stamp[0, [2, 5, 11, 17]] = torch.tensor([9, 40, 9, 3])
    scores, idx = run(path, q, keys, 4, stamp=stamp)
    assert idx[0, 0, 0].tolist() == [5, 11, 2, 17]
    assert scores[0, 0, 0].tolist() == [2.0] * 4
    # Without stamps the larger index is the newer chunk.
    assert run(path, q, keys, 4)[1][0, 0, 0].tolist() == [17, 11, 5, 2]


@pytest.mark.parametrize("path", PATHS)
def test_empty_and_partly_filled_bank(path):
    q, keys = int_inputs(2, 2, 5, 40, 16, seed=3)
    valid = torch.zeros(2, 40, dtype=torch.bool)
    scores, idx = run(path, q, keys, 6, valid=valid)
    assert (idx == -1).all() and (scores == float("-inf")).all()
    valid[0, [1, 30, 31]] = True
    got = run(path, q, keys, 6, valid=valid, block_n=16)
    assert_same(got, chunk_topk_naive(q, keys, 6, valid=valid), "partly filled")
    assert (got[1][0, ..., 3:] == -1).all() and (got[1][1] == -1).all()
    assert set(got[1][0, ..., :3].flatten().tolist()) == {1, 30, 31}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_inputs(path, dtype):
    q, keys = int_inputs(2, 2, 9, 50, 32, seed=5, dtype=dtype, n_dup=10)
    stamp = torch.randint(0, 1000, (2, 50))
    want = chunk_topk_naive(q, keys, 7, stamp=stamp)
    assert_same(run(path, q, keys, 7, stamp=stamp, block_n=16), want, str(dtype))
    # Mixed dtypes (fp32 queries against a half-precision bank) score in fp32 too.
    assert_same(run(path, q.float(), keys, 7, stamp=stamp, block_n=16), want, f"fp32 q, {dtype} keys")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_inside_an_autocast_region(dtype):
    # Autocast would run the score products in half precision: the reference paths keep them in fp32.
    g = torch.Generator().manual_seed(3)
    q, keys = torch.randn(2, 2, 12, 32, generator=g), torch.randn(2, 2, 90, 32, generator=g)
    want = chunk_topk_naive(q, keys, 10)
    with torch.autocast("cpu", dtype=dtype):
        for got in (chunk_topk_naive(q, keys, 10), chunk_topk_tiled(q, keys, 10, block_n=32)):
            assert got[0].dtype == torch.float32 and torch.equal(got[1], want[1])
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_random_normal_inputs(path):
    # Continuous scores: no ties, so the indices must agree and the scores up to summation order.
    g = torch.Generator().manual_seed(7)
    q, keys = torch.randn(2, 2, 12, 32, generator=g), torch.randn(2, 2, 90, 32, generator=g)
    want = chunk_topk_naive(q, keys, 10)
    scores, idx = run(path, q, keys, 10, block_n=32)
    assert torch.equal(idx, want[1])
    torch.testing.assert_close(scores, want[0], rtol=1e-5, atol=1e-5)


def test_naive_is_brute_force_topk():
    # Without ties the specification is plain torch.topk over the masked score matrix.
    g = torch.Generator().manual_seed(8)
    q, keys = torch.randn(2, 3, 4, 16, generator=g), torch.randn(2, 3, 25, 16, generator=g)
    valid = torch.rand(2, 25, generator=g) > 0.4
    s = (q @ keys.transpose(-1, -2)).masked_fill(~valid[:, None, None], float("-inf"))
    want = s.topk(5, dim=-1)
    scores, idx = chunk_topk_naive(q, keys, 5, valid=valid)
    assert torch.equal(idx, want.indices) and torch.equal(scores, want.values)


def test_tiled_query_blocks_and_signed_zero():
    # -0.0 and +0.0 tie (the stamp decides), and query tiling does not change anything.
    q = torch.tensor([1.0, -1.0]).view(1, 1, 1, 2).repeat(1, 1, 5, 1)
    keys = torch.zeros(1, 1, 6, 2)
    keys[0, 0, 1] = torch.tensor([0.0, 0.0])
    keys[0, 0, 4] = torch.tensor([1.0, 1.0])  # q . k = 1 - 1 = +0.0
    keys[0, 0, 2] = torch.tensor([-1.0, -1.0])  # -1 + 1 = +0.0 too; -0.0 arises from products below
    keys[0, 0, 3] = torch.tensor([-0.0, 0.0])
    want = chunk_topk_naive(q, keys, 6)
    for bt in (1, 2, 5):
        for bn in (1, 4):
            assert_same(chunk_topk_tiled(q, keys, 6, block_n=bn, block_t=bt), want, f"bt={bt} bn={bn}")
    assert want[1][0, 0, 0].tolist() == [5, 4, 3, 2, 1, 0]


def test_no_gradient_and_detached_query():
    q = torch.randn(1, 2, 3, 16, requires_grad=True)
    keys = torch.randn(1, 2, 20, 16)
    scores, idx = chunk_topk(q, keys, 4)
    assert not scores.requires_grad and not idx.requires_grad


@pytest.mark.parametrize("path", PATHS)
def test_zero_queries_and_zero_chunks(path):
    scores, idx = run(path, torch.randn(1, 2, 0, 16), torch.randn(1, 2, 8, 16), 3)
    assert scores.shape == (1, 2, 0, 3) and idx.shape == (1, 2, 0, 3)
    scores, idx = run(path, torch.randn(1, 2, 4, 16), torch.randn(1, 2, 0, 16), 3)
    assert (idx == -1).all() and (scores == float("-inf")).all()


@pytest.mark.parametrize("path", PATHS)
def test_compiles_without_graph_breaks(path):
    torch._dynamo.reset()
    q, keys = int_inputs(1, 2, 8, 40, 16, seed=9, n_dup=5)
    valid, stamp = torch.rand(1, 40) > 0.2, torch.randperm(40)[None]
    device = DEVICE if path == "triton" else "cpu"
    args = [x.to(device) for x in (q, keys, valid, stamp)]
    impl = "triton" if path == "triton" else "ref"
    fn = torch.compile(lambda q, kc, v, s: chunk_topk(q, kc, 4, valid=v, stamp=s, impl=impl, block_n=16),
                       fullgraph=True, backend="eager" if device == "cpu" else "inductor")
    scores, idx = fn(*args)
    assert_same((scores.cpu(), idx.cpu()), chunk_topk_naive(q, keys, 4, valid=valid, stamp=stamp), "compiled")


@needs_triton
def test_triton_limits():
    q, keys = torch.randn(1, 1, 4, 16, device=DEVICE), torch.randn(1, 1, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="k must be <= 256"):
        chunk_topk(q, keys, 257, impl="triton")
    with pytest.raises(ValueError, match="block_n must be a power of two >= 16"):
        chunk_topk(q, keys, 2, impl="triton", block_n=24)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        pytest.param({"q": torch.zeros(2, 3, 16)}, ValueError, "q must be", id="q-3d"),
        pytest.param({"keys": torch.zeros(2, 4, 10, 16)}, ValueError, "keys must be", id="keys-heads"),
        pytest.param({"keys": torch.zeros(2, 3, 10, 8)}, ValueError, "keys must be", id="keys-dim"),
        pytest.param({"q": torch.zeros(2, 3, 5, 16, dtype=torch.float64)}, TypeError, "q must be float32",
                     id="q-float64"),
        pytest.param({"keys": torch.zeros(2, 3, 10, 16, dtype=torch.int32)}, TypeError, "keys must be", id="keys-int"),
        pytest.param({"k": 0}, ValueError, "k must be", id="k-zero"),
        pytest.param({"k": 2.0}, ValueError, "k must be", id="k-float"),
        pytest.param({"valid": torch.ones(2, 9, dtype=torch.bool)}, ValueError, "valid must be", id="valid-shape"),
        pytest.param({"valid": torch.ones(2, 10)}, TypeError, "valid must be torch.bool", id="valid-dtype"),
        pytest.param({"stamp": torch.ones(2, 10, dtype=torch.int32)}, TypeError, "stamp must be torch.int64",
                     id="stamp-dtype"),
        pytest.param({"stamp": torch.ones(3, 10, dtype=torch.int64)}, ValueError, "stamp must be", id="stamp-shape"),
        pytest.param({"block_n": 0}, ValueError, "block_n must be", id="block-n"),
        pytest.param({"impl": "fast"}, ValueError, "impl", id="impl"),
        pytest.param({"valid": torch.ones(2, 10, dtype=torch.bool, device="meta")}, ValueError, "device",
                     id="device"),
    ],
)
def test_bad_inputs_raise(kwargs, err, match):
    args = {"q": torch.zeros(2, 3, 5, 16), "keys": torch.zeros(2, 3, 10, 16), "k": 3, **kwargs}
    with pytest.raises(err, match=match):
        chunk_topk(args.pop("q"), args.pop("keys"), args.pop("k"), **args)
