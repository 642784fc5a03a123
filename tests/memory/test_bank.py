"""KVMemoryBank: the ring buffer against a list-based FIFO, chunk keys, resets, row isolation and search against a
brute-force search over the gathered K/V."""

import pytest
import torch

from memzoo.memory import KVMemoryBank, Retrieved


def fifo_contents(bank, row):
    """The bank's valid chunks of one row, oldest first: (keys [H, csz, d], values) per chunk."""
    slots = bank.valid[row].nonzero().flatten()
    slots = slots[bank.stamp[row, slots].argsort()]
    csz = bank.chunk_size
    return [(bank.keys[row, :, s * csz:(s + 1) * csz], bank.values[row, :, s * csz:(s + 1) * csz]) for s in slots]


def chunks_of(x, row, csz):
    return list(x[row].split(csz, dim=1))  # each [H, csz, d]


def test_ring_buffer_equals_list_fifo_under_wraparound():
    B, H, d, M, csz = 2, 3, 8, 24, 4  # 6 chunks
    bank = KVMemoryBank(B, H, d, M, csz)
    ref = [[] for _ in range(B)]
    # Appends of 2, 3, 4, 1, 6 and 9 chunks (the last exceeds the capacity: only the newest 6 stay).
    for step, n in enumerate((2, 3, 4, 1, 6, 9)):
        k, v = torch.randn(B, H, n * csz, d), torch.randn(B, H, n * csz, d)
        bank.append(k, v)
        for b in range(B):
            ref[b] = (ref[b] + list(zip(chunks_of(k, b, csz), chunks_of(v, b, csz))))[-bank.n_chunks:]
            got = fifo_contents(bank, b)
            assert len(got) == len(ref[b]), f"step {step} row {b}"
            for (gk, gv), (rk, rv) in zip(got, ref[b]):
                assert torch.equal(gk, rk) and torch.equal(gv, rv), f"step {step} row {b}"
    assert bank.n_written.tolist() == [25, 25]
    assert bank.ptr.tolist() == [25 % 6] * 2
    assert bank.fill.tolist() == [6, 6]


def test_eviction_overwrites_the_oldest_slot_in_place():
    bank = KVMemoryBank(1, 1, 16, 12, 4)  # 3 chunks
    keys_before = bank.keys
    for i in range(5):
        bank.append(torch.full((1, 1, 4, 16), float(i)), torch.full((1, 1, 4, 16), float(-i)))
    assert bank.keys is keys_before
    # Chunks 0..4 went to slots 0 1 2 0 1: slot 2 still holds chunk 2, the oldest kept.
    assert bank.keys[0, 0, ::4, 0].tolist() == [3.0, 4.0, 2.0]
    assert bank.stamp[0].tolist() == [3, 4, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_chunk_key_is_the_mean_of_its_token_keys(dtype):
    bank = KVMemoryBank(2, 2, 16, 32, 4, dtype=dtype)
    bank.append(torch.randn(2, 2, 20, 16), torch.randn(2, 2, 20, 16))
    want = bank.keys.float().unflatten(2, (8, 4)).mean(3).to(dtype)
    assert bank.chunk_keys.dtype == dtype
    assert torch.equal(bank.chunk_keys[:, :, :5], want[:, :, :5])


def test_reset_clears_only_its_row():
    bank = KVMemoryBank(3, 2, 16, 16, 4)
    bank.append(torch.randn(3, 2, 12, 16), torch.randn(3, 2, 12, 16))
    before = bank.clone()
    bank.reset(torch.tensor([False, True, False]))
    assert bank.fill.tolist() == [3, 0, 3]
    assert bank.ptr.tolist() == [3, 0, 3] and bank.n_written.tolist() == [3, 0, 3]
    q = torch.randn(3, 2, 5, 16)
    got, want = bank.search(q, 4), before.search(q, 4)
    for a, b in zip(got, want):
        assert torch.equal(a[[0, 2]], b[[0, 2]])
    assert not got.valid[1].any() and (got.chunk_idx[1] == -1).all()
    # Stale data of a reset row is never returned.
    assert (got.keys[1] == 0).all() and (got.values[1] == 0).all()
    # The reset row fills again from slot 0.
    bank.append(torch.randn(3, 2, 4, 16), torch.randn(3, 2, 4, 16))
    assert bank.fill.tolist() == [4, 1, 4] and bank.valid[1].tolist() == [True, False, False, False]


def test_rows_never_retrieve_another_rows_chunks():
    torch.manual_seed(1)
    a = KVMemoryBank(2, 2, 16, 64, 4)
    b = KVMemoryBank(2, 2, 16, 64, 4)
    q = torch.randn(2, 2, 8, 16)
    for _ in range(5):
        k, v = torch.randn(2, 2, 16, 16), torch.randn(2, 2, 16, 16)
        a.append(k, v)
        # Bank b: the same row 0, a different row 1 (flipped and scaled history, more of it).
        k2, v2 = k.clone(), v.clone()
        k2[1], v2[1] = -3 * k[1].flip(1), v[1].flip(1) + 1
        b.append(k2, v2)
    ra, rb = a.search(q, 6), b.search(q, 6)
    for x, y in zip(ra, rb):
        assert torch.equal(x[0], y[0])
    assert not torch.equal(ra.keys[1], rb.keys[1])
    # Every retrieved key of row 0 is a key that row 0 wrote.
    row0 = a.keys[0].unsqueeze(1)  # [H, 1, M, d]
    hits = (ra.keys[0].unsqueeze(-2) == row0.unsqueeze(2)).all(-1).any(-1)  # [H, T, L]
    assert hits.all()


def brute_force_search(bank, q, n):
    """Every chunk scored by its mean key, masked, sorted by (score, stamp) with Python's sort."""
    B, H, T, _ = q.shape
    csz = bank.chunk_size
    idx = torch.full((B, H, T, n), -1, dtype=torch.int64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                cands = []
                for c in range(bank.n_chunks):
                    if bank.valid[b, c]:
                        ck = bank.keys[b, h, c * csz:(c + 1) * csz].double().mean(0)
                        cands.append((float(q[b, h, t].double() @ ck), int(bank.stamp[b, c]), c))
                cands.sort(reverse=True)
                for j, (_, _, c) in enumerate(cands[:n]):
                    idx[b, h, t, j] = c
    return idx


def test_search_equals_brute_force_over_gathered_kv():
    bank = KVMemoryBank(2, 2, 8, 40, 4)  # 10 chunks
    for n in (3, 4, 6):
        bank.append(torch.randn(2, 2, 4 * n, 8), torch.randn(2, 2, 4 * n, 8))
    bank.reset(torch.tensor([False, True]))
    bank.append(torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8))
    q = torch.randn(2, 2, 5, 8)
    r = bank.search(q, 4)
    assert isinstance(r, Retrieved)
    assert r.keys.shape == (2, 2, 5, 16, 8) and r.valid.shape == (2, 2, 5, 16) and r.chunk_idx.shape == (2, 2, 5, 4)
    assert torch.equal(r.chunk_idx, brute_force_search(bank, q, 4))
    # Row 1 holds 2 chunks after its reset: 2 found, 2 missing.
    assert r.valid[1].sum(-1).unique().tolist() == [8]
    for b, h, t, j in [(0, 0, 0, 0), (0, 1, 4, 3), (1, 1, 2, 1), (1, 0, 3, 0)]:
        c = int(r.chunk_idx[b, h, t, j])
        sl = slice(j * 4, (j + 1) * 4)
        assert torch.equal(r.keys[b, h, t, sl], bank.keys[b, h, c * 4:(c + 1) * 4])
        assert torch.equal(r.values[b, h, t, sl], bank.values[b, h, c * 4:(c + 1) * 4])
        torch.testing.assert_close(r.scores[b, h, t, j], q[b, h, t] @ bank.chunk_keys[b, h, c])
    assert (r.keys[1][~r.valid[1]] == 0).all()


def test_empty_bank_search_is_all_missing():
    bank = KVMemoryBank(2, 2, 16, 32, 4)
    r = bank.search(torch.randn(2, 2, 3, 16), 16)
    assert not r.valid.any() and (r.chunk_idx == -1).all() and (r.scores == float("-inf")).all()
    assert r.keys.shape == (2, 2, 3, 64, 16) and (r.keys == 0).all()


def test_append_rows_writes_only_selected_rows():
    bank = KVMemoryBank(3, 1, 16, 16, 4)
    bank.append(torch.ones(3, 1, 4, 16), torch.ones(3, 1, 4, 16))
    before = bank.clone()
    bank.append(torch.full((3, 1, 8, 16), 2.0), torch.full((3, 1, 8, 16), 2.0), rows=torch.tensor([True, False, True]))
    for name in ("keys", "values", "chunk_keys", "valid", "stamp", "ptr", "n_written"):
        assert torch.equal(getattr(bank, name)[1], getattr(before, name)[1]), name
    assert bank.fill.tolist() == [3, 1, 3] and bank.ptr.tolist() == [3, 1, 3]
    assert bank.keys[0, 0, 4:12].eq(2.0).all()


def test_inputs_are_detached_and_cast():
    bank = KVMemoryBank(1, 1, 16, 8, 4, dtype=torch.bfloat16)
    k = torch.randn(1, 1, 4, 16, requires_grad=True)
    bank.append(k * 2, torch.randn(1, 1, 4, 16, dtype=torch.float64))
    assert bank.keys.dtype == torch.bfloat16 and not bank.keys.requires_grad
    r = bank.search(torch.randn(1, 1, 2, 16, requires_grad=True), 2)
    assert not r.keys.requires_grad and r.keys.dtype == torch.bfloat16


def test_index_select_clone_to_and_repr():
    bank = KVMemoryBank(2, 2, 16, 16, 4)
    bank.append(torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16))
    bank.reset(torch.tensor([True, False]))
    beams = bank.index_select(torch.tensor([1, 1, 0]))
    assert beams.batch_size == 3 and beams.fill.tolist() == [2, 2, 0]
    assert torch.equal(beams.keys[0], bank.keys[1]) and torch.equal(beams.keys[1], bank.keys[1])
    q = torch.randn(3, 2, 4, 16)
    r = beams.search(q, 2)
    assert torch.equal(r.keys[0], bank.search(q[[1, 0]], 2).keys[1])
    copy = bank.clone()
    copy.append(torch.randn(2, 2, 4, 16), torch.randn(2, 2, 4, 16))
    assert bank.fill.tolist() == [0, 2] and copy.fill.tolist() == [1, 3]
    moved = bank.to("cpu")
    assert torch.equal(moved.keys, bank.keys) and torch.equal(moved.clock, bank.clock)
    assert bank.nbytes == sum(t.nbytes for t in (bank.keys, bank.values, bank.chunk_keys, bank.valid, bank.stamp,
                                                 bank.ptr, bank.n_written, bank.clock))
    assert "capacity=16" in repr(bank) and "fill=[0, 2]/4" in repr(bank)
    assert not isinstance(bank, torch.nn.Module)


def test_default_dtype_and_sizes():
    bank = KVMemoryBank(1, 16, 64, 4096)
    assert bank.dtype == torch.float32 and bank.n_chunks == 1024
    assert bank.chunk_keys.shape == (1, 16, 1024, 64) and bank.valid.shape == (1, 1024)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        pytest.param({"capacity": 10}, ValueError, "capacity must be a positive multiple", id="capacity-multiple"),
        pytest.param({"capacity": 0}, ValueError, "capacity must be", id="capacity-zero"),
        pytest.param({"chunk_size": 0}, ValueError, "chunk_size must be", id="chunk-zero"),
        pytest.param({"batch_size": 1.5}, ValueError, "batch_size must be", id="batch-float"),
        pytest.param({"dtype": torch.int32}, TypeError, "dtype must be", id="dtype"),
    ],
)
def test_constructor_errors(kwargs, err, match):
    args = {"batch_size": 2, "n_heads": 2, "d_head": 16, "capacity": 16, "chunk_size": 4, **kwargs}
    dtype = args.pop("dtype", None)
    with pytest.raises(err, match=match):
        KVMemoryBank(**args, dtype=dtype)


def test_append_and_search_errors():
    bank = KVMemoryBank(2, 2, 16, 16, 4)
    with pytest.raises(ValueError, match="multiple of chunk_size=4"):
        bank.append(torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16))
    with pytest.raises(ValueError, match=r"k must be \[B=2, H=2, T, d=16\]"):
        bank.append(torch.randn(2, 3, 4, 16), torch.randn(2, 3, 4, 16))
    with pytest.raises(ValueError, match="v must have T=4"):
        bank.append(torch.randn(2, 2, 4, 16), torch.randn(2, 2, 8, 16))
    with pytest.raises(ValueError, match="rows must be a bool"):
        bank.append(torch.randn(2, 2, 4, 16), torch.randn(2, 2, 4, 16), rows=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="mask must be a bool"):
        bank.reset(torch.tensor([True]))
    with pytest.raises(ValueError, match="q must be"):
        bank.search(torch.randn(2, 2, 4, 8))
    with pytest.raises(ValueError, match="n_chunks must be"):
        bank.search(torch.randn(2, 2, 4, 16), 0)
    with pytest.raises(ValueError, match="backend must be"):
        bank.search(torch.randn(2, 2, 4, 16), backend="annoy")
    with pytest.raises(ValueError, match="rows must be a 1-D int64"):
        bank.index_select(torch.tensor([True, False]))


def test_faiss_backend_matches_exact_search():
    pytest.importorskip("faiss")
    bank = KVMemoryBank(2, 3, 16, 64, 4)
    for _ in range(3):
        bank.append(torch.randn(2, 3, 8, 16), torch.randn(2, 3, 8, 16))
    bank.reset(torch.tensor([False, True]))
    bank.append(torch.randn(2, 3, 8, 16), torch.randn(2, 3, 8, 16))
    q = torch.randn(2, 3, 7, 16)
    exact, approx = bank.search(q, 5), bank.search(q, 5, backend="faiss")
    assert torch.equal(approx.chunk_idx, exact.chunk_idx)
    torch.testing.assert_close(approx.scores, exact.scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(approx.valid, exact.valid) and torch.equal(approx.keys, exact.keys)


def test_faiss_missing_raises_a_clear_import_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    bank = KVMemoryBank(1, 1, 16, 16, 4)
    with pytest.raises(ImportError, match="faiss-cpu"):
        bank.search(torch.randn(1, 1, 2, 16), backend="faiss")


def test_the_bank_is_a_pytree_of_batch_first_tensors():
    from memzoo.models.state import detach_state, index_state, state_batch_size, state_leaves

    bank = KVMemoryBank(3, 2, 16, capacity=16, chunk_size=4)
    bank.append(torch.randn(3, 2, 8, 16), torch.randn(3, 2, 8, 16))
    state = (bank, torch.zeros(3, 5))
    assert state_batch_size(state) == 3 and len(state_leaves(state)) == 9
    picked, _ = index_state(state, torch.tensor([2, 0]))
    assert isinstance(picked, KVMemoryBank) and picked.batch_size == 2 and picked.capacity == 16
    assert torch.equal(picked.keys, bank.keys[[2, 0]]) and torch.equal(picked.clock, bank.clock[[2, 0]])
    q = torch.randn(2, 2, 4, 16)
    assert torch.equal(picked.search(q, 2).keys, bank.index_select(torch.tensor([2, 0])).search(q, 2).keys)
    same, _ = detach_state(state)
    # Detaching shares storage: an in-place write through one is seen by the other (the bank is updated in place).
    same.append(torch.randn(3, 2, 4, 16), torch.randn(3, 2, 4, 16))
    assert bank.fill.tolist() == [3, 3, 3]
