import pytest
import torch

from memzoo.kernels.utils import check_recurrence_inputs, chunk_table, flatten_batch, seq_boundaries


def test_nan_poisoning_hits_kernel_allocations_only():
    scope = {"__name__": "memzoo.kernels.fake_op", "torch": torch}
    src = "def alloc(x):\n return torch.empty(3), torch.empty_like(x), x.new_empty(2), torch.empty(2, dtype=torch.int)"
    exec(src, scope)
    a, b, c, d = scope["alloc"](torch.zeros(4))
    assert a.isnan().all() and b.isnan().all() and c.isnan().all()
    assert d.dtype == torch.int32
    assert not torch.empty(3).fill_(0).isnan().any()


def test_chunk_table_covers_every_chunk_once_and_skips_empty_sequences():
    cu = torch.tensor([0, 3, 3, 70, 130, 131])
    table = chunk_table(cu, 131, 64)
    assert table.shape == (-(-131 // 64) + 5, 2)
    valid = table[table[:, 0] >= 0].tolist()
    assert valid == [[0, 0], [2, 0], [2, 1], [3, 0], [4, 0]]
    assert (table[len(valid):] == -1).all()


def test_flatten_batch_and_boundaries():
    x = torch.randn(3, 4, 2)
    flat, cu = flatten_batch(x, None)
    assert flat.shape == (1, 12, 2) and cu.tolist() == [0, 4, 8, 12]
    empty, cu = flatten_batch(x[:, :0], None)
    assert empty.shape == (1, 0, 2) and cu.tolist() == [0, 0, 0, 0]
    seq, pos = seq_boundaries(torch.tensor([0, 2, 2, 5]), 5)
    assert seq.tolist() == [0, 0, 2, 2, 2] and pos.tolist() == [0, 1, 0, 1, 2]


def test_input_checks_name_the_argument():
    q = torch.randn(2, 8, 2, 16)
    v = torch.randn(2, 8, 2, 32)
    g = torch.randn(2, 8, 2).clamp(max=0)
    assert check_recurrence_inputs(q, q, v, {"g": (g, "BTH")}, None, None) == 2
    with pytest.raises(ValueError, match="k must have the shape"):
        check_recurrence_inputs(q, q[:, :4], v, {}, None, None)
    with pytest.raises(TypeError, match="one dtype"):
        check_recurrence_inputs(q, q.half(), v, {}, None, None)
    with pytest.raises(ValueError, match="g must have shape"):
        check_recurrence_inputs(q, q, v, {"g": (g[..., None], "BTH")}, None, None)
    with pytest.raises(ValueError, match="B=1"):
        check_recurrence_inputs(q, q, v, {}, None, torch.tensor([0, 4, 8]))
    with pytest.raises(ValueError, match="non-decreasing"):
        check_recurrence_inputs(q[:1], q[:1], v[:1], {}, None, torch.tensor([0, 6, 3, 8]))
    with pytest.raises(ValueError, match="initial_state must be"):
        check_recurrence_inputs(q, q, v, {}, torch.zeros(2, 2, 16, 16), None)
    with pytest.raises(TypeError, match="float32"):
        check_recurrence_inputs(q, q, v, {}, torch.zeros(2, 2, 16, 32, dtype=torch.float64), None)
