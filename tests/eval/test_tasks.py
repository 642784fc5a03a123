"""Generator invariants of the synthetic tasks: shapes, masks, vocab ranges, placement, seeds."""

import numpy as np
import pytest
import torch

from memzoo.eval.harness import segment_seed
from memzoo.eval.tasks import IGNORE, TASKS, make_task
from memzoo.eval.tasks import niah as niah_mod
from memzoo.eval.tasks import regbench as rb
from memzoo.eval.tasks.base import distinct_per_row, weighted_distinct_per_row
from memzoo.eval.tasks.mqar import MQARConfig
from memzoo.eval.tasks.niah import NIAHConfig
from memzoo.eval.tasks.pydoc_lm import PydocLMConfig
from memzoo.eval.tasks.regbench import RegBenchConfig
from memzoo.eval.tasks.selective_copy import SelectiveCopyConfig
from memzoo.eval.tasks.seq_digits import CLASS_0, QUERY, SeqDigitsConfig
from memzoo.eval.tasks.set_disjoint import SetDisjointConfig

SMALL = {
    "mqar": MQARConfig(vocab_size=128, num_examples=200, input_seq_len=64, num_kv_pairs=8),
    "niah": NIAHConfig(num_examples=50, seq_len=64),
    "set_disjointness": SetDisjointConfig(vocab_size=128, num_examples=50, first_len=4, second_len=16),
    "selective_copy": SelectiveCopyConfig(num_examples=50, seq_len=64, n_copy=8),
    "regbench": RegBenchConfig(num_examples=20, seq_len=128),
    "seq_digits": SeqDigitsConfig(num_examples=50),
    "pydoc_lm": PydocLMConfig(seq_len=64, num_examples=50),
}


@pytest.mark.parametrize("task", sorted(SMALL))
def test_shapes_dtypes_and_reproducibility(task):
    cfg = SMALL[task]
    a, b, c = make_task(cfg, 5), make_task(cfg, 5), make_task(cfg, 6)
    N = cfg.num_examples
    assert a.inputs.dtype == a.labels.dtype == torch.int64
    assert a.inputs.shape == a.labels.shape and a.inputs.shape[0] == N
    assert a.inputs.min() >= 0 and a.inputs.max() < cfg.vocab_size
    scored = a.labels != IGNORE
    assert scored.any(1).all(), "every example has a scored position"
    assert a.labels[scored].min() >= 0 and a.labels[scored].max() < cfg.vocab_size
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs, c.inputs)
    for mask in a.slices.values():
        assert mask.dtype == torch.bool and mask.shape == (N,)
    assert TASKS[task].config_class is type(cfg)


@pytest.mark.parametrize("rnq", [True, False])
def test_mqar_zoology_layout(rnq):
    kv, T, V = 8, 64, 128
    d = make_task(MQARConfig(vocab_size=V, num_examples=300, input_seq_len=T, num_kv_pairs=kv,
                             random_non_queries=rnq), 0)
    keys, values = d.inputs[:, 0 : 2 * kv : 2], d.inputs[:, 1 : 2 * kv : 2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    for n in range(d.inputs.shape[0]):
        assert len(set(keys[n].tolist())) == kv and len(set(values[n].tolist())) == kv
        pos = (d.labels[n] != IGNORE).nonzero()[:, 0]
        # One query per key, each in the query region at an even offset, labelled at the key itself.
        assert len(pos) == kv and (pos >= 2 * kv).all() and ((pos - 2 * kv) % 2 == 0).all()
        assert sorted(d.inputs[n, pos].tolist()) == sorted(keys[n].tolist())
        lookup = dict(zip(keys[n].tolist(), values[n].tolist()))
        assert [lookup[k] for k in d.inputs[n, pos].tolist()] == d.labels[n, pos].tolist()
    blanks = d.inputs[:, 2 * kv :][d.labels[:, 2 * kv :] == IGNORE]
    assert (blanks == 0).all() != rnq


def test_mqar_read_twice_repeats_the_pairs_within_context_len():
    cfg = MQARConfig(vocab_size=128, num_examples=50, input_seq_len=64, num_kv_pairs=4, num_passes=2)
    d = make_task(cfg, 0)
    assert cfg.context_len == 16
    assert torch.equal(d.inputs[:, :8], d.inputs[:, 8:16])  # the second pass of the pairs
    assert ((d.labels != IGNORE).nonzero()[:, 1] >= cfg.context_len).all()  # every query after them


def test_mqar_power_law_clusters_queries_early():
    d = make_task(MQARConfig(vocab_size=1024, num_examples=2000, input_seq_len=256, num_kv_pairs=4), 1)
    gaps = ((d.labels != IGNORE).nonzero()[:, 1] - 8) // 2
    space = (256 - 8) // 2
    # p(g) ~ g^(a-1) with a = 0.01 is close to 1/g: the first tenth of the slots gets most of the queries.
    assert (gaps < space // 10).float().mean() > 0.5
    assert gaps.max() < space


def test_mqar_rejects_bad_configs():
    with pytest.raises(ValueError, match="input_seq_len"):
        MQARConfig(input_seq_len=63)
    with pytest.raises(ValueError, match="num_kv_pairs"):
        MQARConfig(input_seq_len=64, num_kv_pairs=17)
    with pytest.raises(ValueError, match="vocab_size"):
        MQARConfig(vocab_size=64, input_seq_len=64, num_kv_pairs=4)
    with pytest.raises(ValueError, match="num_examples"):
        MQARConfig(num_examples=0)


def test_sampling_helpers_distinct_and_in_range():
    rng = np.random.default_rng(0)
    for k, hi in ((4, 1000), (30, 40)):
        a = distinct_per_row(rng, 500, k, 10, hi)
        assert a.min() >= 10 and a.max() < hi
        assert all(len(set(r)) == k for r in a.tolist())
    w = np.array([8.0, 4.0, 2.0, 1.0, 1.0])
    s = weighted_distinct_per_row(rng, 20000, 2, w / w.sum())
    assert all(len(set(r)) == 2 for r in s[:100].tolist())
    first = np.bincount(s[:, 0], minlength=5) / 20000
    assert np.allclose(first, w / w.sum(), atol=0.02)


@pytest.mark.parametrize("variant", niah_mod.VARIANTS)
def test_niah_needle_at_requested_depth(variant):
    cfg = NIAHConfig(num_examples=100, seq_len=96, variant=variant, depths=(0.0, 0.25, 0.5, 0.75, 1.0))
    d = make_task(cfg, 3)
    H, L = cfg.haystack_len, cfg.needle_len
    for name, mask in d.slices.items():
        depth = int(name.split("=")[1]) / 100
        start = cfg.needle_start(depth)
        rows = d.inputs[mask]
        assert len(rows) == 20
        assert (rows[:, start] == niah_mod.KEY).all() and (rows[:, start + 1 + cfg.key_len] == niah_mod.VAL).all()
        assert ((rows == niah_mod.KEY).sum(1) == 1).all(), "exactly one needle"
    # The query repeats the needle's key; the labels are its values, at the last value_len positions.
    for n in range(cfg.num_examples):
        s = (d.inputs[n, :H] == niah_mod.KEY).nonzero()[0, 0]
        key = d.inputs[n, s + 1 : s + 1 + cfg.key_len]
        val = d.inputs[n, s + 2 + cfg.key_len : s + L]
        assert d.inputs[n, H] == niah_mod.QUERY and torch.equal(d.inputs[n, H + 1 : H + 1 + cfg.key_len], key)
        assert torch.equal(d.labels[n, -cfg.value_len :], val)
        assert (d.labels[n, : -cfg.value_len] == IGNORE).all()
        # Teacher forcing: the values but the last follow the query key.
        assert torch.equal(d.inputs[n, H + 1 + cfg.key_len :], val[:-1])
    start1 = cfg.needle_start(1.0)
    assert start1 + L == H, "depth 100% ends right before the query"


def test_niah_distractors_have_other_keys():
    cfg = NIAHConfig(num_examples=40, seq_len=128, n_distractors=3)
    d = make_task(cfg, 0)
    for n in range(cfg.num_examples):
        starts = (d.inputs[n, : cfg.haystack_len] == niah_mod.KEY).nonzero()[:, 0].tolist()
        assert len(starts) == 4
        keys = [tuple(d.inputs[n, s + 1 : s + 1 + cfg.key_len].tolist()) for s in starts]
        query = tuple(d.inputs[n, cfg.haystack_len + 1 : cfg.haystack_len + 1 + cfg.key_len].tolist())
        assert keys.count(query) == 1
    passkey = make_task(NIAHConfig(num_examples=10, seq_len=64, variant="passkey"), 0)
    H = 64 - NIAHConfig().query_len
    assert (passkey.inputs[:, H + 1 : H + 4] == passkey.inputs[0, H + 1 : H + 4]).all(), "one fixed pass key"


def test_set_disjointness_exactly_one_shared_token():
    for a, b in ((4, 16), (16, 4), (5, 5)):
        cfg = SetDisjointConfig(vocab_size=256, num_examples=200, first_len=a, second_len=b)
        d = make_task(cfg, 1)
        assert d.inputs.shape[1] == a + b + 3
        assert (d.labels[:, :-1] == IGNORE).all()
        for n in range(cfg.num_examples):
            x = d.inputs[n].tolist()
            first, second = x[1 : 1 + a], x[2 + a : 2 + a + b]
            assert x[0] == 1 and x[1 + a] == 2 and x[-1] == 3
            shared = set(first) & set(second)
            assert shared == {d.labels[n, -1].item()}
            assert len(set(first)) == a


def test_selective_copy_targets_in_order():
    cfg = SelectiveCopyConfig(num_examples=100, seq_len=48, n_copy=6)
    d = make_task(cfg, 2)
    ctx = 48 - 6
    for n in range(cfg.num_examples):
        content = d.inputs[n, :ctx][d.inputs[n, :ctx] != 0]
        assert torch.equal(content, d.labels[n, ctx:])
        assert (d.inputs[n, ctx:] == 1).all() and (d.labels[n, :ctx] == IGNORE).all()


def test_regbench_dfas_and_acceptance():
    rng = np.random.default_rng(0)
    for _ in range(50):
        dfa = rb.random_dfa(rng)
        assert 1 <= len(dfa) <= 12
        assert all(1 <= len(e) <= 3 and s not in e.values() for s, e in enumerate(dfa))
    cfg = RegBenchConfig(num_examples=30, seq_len=400)
    d = make_task(cfg, 0)
    scored = d.labels != IGNORE
    assert d.accept.shape == (30, 400, 20)
    # The true next symbol is always accepted, separators and padding are never targets.
    assert d.accept.gather(2, d.labels.clamp(min=0)[..., None])[..., 0][scored].all()
    assert ((d.labels[scored] != rb.SEP) & (d.labels[scored] != rb.PAD)).all()
    assert (d.accept[~scored] == 0).all()


def test_regbench_train_and_test_dfas_are_disjoint():
    def hashes(split, seed):
        rng = np.random.default_rng(seed)
        out = set()
        while len(out) < 40:
            dfa = rb.random_dfa(rng)
            h = rb.dfa_hash(dfa)
            if (h % rb.TEST_SHARE == 0) == (split == "test"):
                out.add(h)
        return out

    assert not hashes("train", 0) & hashes("test", 0)
    with pytest.raises(ValueError, match="split"):
        RegBenchConfig(split="valid")


def test_segment_seeds_disjoint_ranges():
    cfg = SMALL["mqar"]
    train = {segment_seed(cfg, "train", i, s) for i in range(3) for s in range(50)}
    test = {segment_seed(cfg, "test", i, s) for i in range(3) for s in range(50)}
    assert max(train) < 2**31 <= min(test) < 2**32
    assert len(train) == 150 and not train & test
    a = make_task(cfg, segment_seed(cfg, "train", 0, 0))
    b = make_task(cfg, segment_seed(cfg, "test", 0, 0))
    assert not torch.equal(a.inputs, b.inputs)


def test_seq_digits_layout_and_fixed_split():
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = {tuple(row): int(c) for row, c in zip(digits.data.astype(int).tolist(), digits.target)}
    train, test = make_task(SeqDigitsConfig(), 0), make_task(SeqDigitsConfig(split="test"), 0)
    assert train.inputs.shape == (1400, 65) and test.inputs.shape == (397, 65)
    for d in (train, test):
        assert (d.inputs[:, -1] == QUERY).all() and (d.labels[:, :-1] == IGNORE).all()
        # Each row is an image of the dataset, labelled with its own class.
        for row, label in zip(d.inputs[:, :64].tolist(), d.labels[:, -1].tolist()):
            assert pixels[tuple(row)] == label - CLASS_0
        assert sum(int(m.sum()) for m in d.slices.values()) == d.inputs.shape[0]
    # The split does not depend on the seed (only the order does), and train and test share no image (the
    # 1797 images are distinct).
    other = make_task(SeqDigitsConfig(), 7)
    assert not torch.equal(other.inputs, train.inputs)
    assert sorted(map(tuple, other.inputs.tolist())) == sorted(map(tuple, train.inputs.tolist()))
    assert len(pixels) == 1797 and not set(map(tuple, train.inputs.tolist())) & set(map(tuple, test.inputs.tolist()))
    perm = make_task(SeqDigitsConfig(split="test", permuted=True), 0)
    assert torch.equal(perm.labels, test.labels) and not torch.equal(perm.inputs, test.inputs)
    assert torch.equal(perm.inputs[:, :64].sort(1).values, test.inputs[:, :64].sort(1).values)
    with pytest.raises(ValueError, match="exceeds the test split's 397"):
        SeqDigitsConfig(split="test", num_examples=398)
    with pytest.raises(ValueError, match="split must be one of"):
        SeqDigitsConfig(split="valid")
    with pytest.raises(ValueError, match="vocab_size is fixed at 28"):
        SeqDigitsConfig(vocab_size=30)


def test_pydoc_lm_train_drops_rows_that_repeat_a_held_out_row(monkeypatch):
    from memzoo.eval.tasks import pydoc_lm

    # 20 rows of 4 bytes (3 inputs and the last label): row 9 (held out) is row 2's text, row 15 has row 19's (held
    # out) inputs but another last byte; the rest are distinct.
    rows = [bytes([r, r, r, r]) for r in range(20)]
    rows[9], rows[15] = rows[2], rows[19][:3] + b"\xff"
    monkeypatch.setattr(pydoc_lm, "_text", lambda: np.frombuffer(b"".join(rows), dtype=np.uint8))
    pydoc_lm.rows.cache_clear()
    try:
        train, test = pydoc_lm.rows(3, "train"), pydoc_lm.rows(3, "test")
        assert [bytes(r) for r in test] == [rows[9], rows[19]]
        assert [bytes(r) for r in train] == [rows[r] for r in range(20) if r not in (2, 9, 15, 19)]
    finally:
        pydoc_lm.rows.cache_clear()


def test_pydoc_lm_next_byte_labels_and_fixed_split():
    from memzoo.train.data import iter_documents

    text = "\n".join(iter_documents("pydoc")).encode()
    T = 100
    train, test = make_task(PydocLMConfig(seq_len=T), 0), make_task(PydocLMConfig(split="test", seq_len=T), 0)
    n_rows = len(text) // (T + 1)
    assert test.inputs.shape == (n_rows // 10, T)
    for d in (train, test):
        # Every position is scored, with the byte that follows it.
        assert torch.equal(d.labels[:, :-1], d.inputs[:, 1:]) and (d.labels != IGNORE).all()

    def rows_of(d):
        return sorted(bytes(row) for row in torch.cat([d.inputs, d.labels[:, -1:]], 1).tolist())

    # The held-out rows are the text's rows 9, 19, 29, ... whatever the seed (it only orders them); the training
    # rows are the others, less any that repeats a held-out row.
    all_rows = [text[r * (T + 1): (r + 1) * (T + 1)] for r in range(n_rows)]
    held_out = sorted(all_rows[9::10])
    held_inputs = {row[:-1] for row in held_out}
    assert rows_of(test) == held_out
    trained = [row for r, row in enumerate(all_rows) if r % 10 != 9 and row[:-1] not in held_inputs]
    assert rows_of(train) == sorted(trained)
    other = make_task(PydocLMConfig(seq_len=T), 3)
    assert not torch.equal(other.inputs, train.inputs)
    assert rows_of(other) == rows_of(train)
    assert not set(rows_of(train)) & set(held_out)
    assert not {bytes(r) for r in train.inputs.tolist()} & {bytes(r) for r in test.inputs.tolist()}
    with pytest.raises(ValueError, match="exceeds the"):
        PydocLMConfig(split="test", seq_len=T, num_examples=n_rows)
    with pytest.raises(ValueError, match="split must be one of"):
        PydocLMConfig(split="valid")
    with pytest.raises(ValueError, match="vocab_size is fixed at 256"):
        PydocLMConfig(vocab_size=320)
