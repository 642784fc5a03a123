"""Tokenizers, shards and packing: next-token targets, cu_seqlens at document ends, stream reset masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import memzoo
from memzoo.models import MIXERS
from memzoo.train.cli import main as cli_main
from memzoo.train.data import (
    IGNORE_INDEX,
    BPETokenizer,
    ByteTokenizer,
    Tokens,
    iter_documents,
    load_prepared,
    load_tokenizer,
    make_packer,
    split_tokens,
    tokenize_documents,
)
from memzoo.train.loop import run_segments

EOS, PAD = ByteTokenizer.eos_id, ByteTokenizer.pad_id


def corpus(lengths: list[int]) -> np.ndarray:
    """Documents of the given lengths (without EOS), each followed by EOS; doc k holds the value k + 1."""
    return np.concatenate([np.r_[np.full(n, k + 1), EOS] for k, n in enumerate(lengths)]).astype(np.uint16)


def test_byte_tokenizer_round_trip(tmp_path):
    tok = ByteTokenizer()
    text = "héllo, wörld ∑ 🙂\n"
    assert tok.decode(tok.encode(text).tolist()) == text
    assert tok.vocab_size == 320 and tok.vocab_size % 64 == 0
    tok.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


def test_bpe_trains_saves_and_loads_offline(tmp_path):
    docs = list(iter_documents("pydoc"))[:10]
    tok = BPETokenizer.train(docs, 400)
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    ids = again.encode(docs[0])
    assert ids.tolist() == tok.encode(docs[0]).tolist()
    assert again.decode(ids.tolist()) == docs[0] and len(ids) < len(docs[0].encode())
    assert tok.vocab_size % 64 == 0 and tok.eos_id < tok.vocab_size


def test_prepare_writes_memmapped_shards(tmp_path):
    out = tmp_path / "pydoc"
    assert cli_main(["prepare", "--source", "pydoc", "--out", str(out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["eos_id"] == EOS and meta["tokenizer"]["type"] == "byte"
    tok, train, val = load_prepared(out)
    full = tokenize_documents(tok, iter_documents("pydoc"))
    assert isinstance(train.view(), np.memmap)
    assert np.array_equal(np.concatenate([train.view(), val.view()]), full)
    assert (len(train), len(val)) == (meta["tokens"]["train"], meta["tokens"]["val"])
    assert val.view()[0] != EOS and train.view()[-1] == EOS  # the split falls on a document boundary
    assert 0.01 < len(val) / len(full) < 0.1


def test_large_vocab_uses_uint32():
    class Big(ByteTokenizer):
        vocab_size = 70_000

        def encode_batch(self, texts):
            return [np.array([69_999, 5], dtype=np.uint32) for _ in texts]

    arr = tokenize_documents(Big(), ["a", "b"])
    assert arr.dtype == np.uint32 and arr.tolist() == [69_999, 5, EOS, 69_999, 5, EOS]
    assert tokenize_documents(ByteTokenizer(), ["a"]).dtype == np.uint16


def test_split_starts_validation_at_a_document():
    train, val = split_tokens(corpus([30, 30, 30, 30]), 0.3, EOS)
    assert train[-1] == EOS and val[0] == val[1]


def test_block_packing_targets_shuffle_and_ranks():
    tokens = Tokens(np.arange(1000, dtype=np.uint16) % 250)
    kw = dict(seq_len=16, eos_id=EOS, pad_id=PAD, seed=3)
    one = make_packer("block", tokens, micro_bs=4, **kw)
    b = one.batch(5)
    assert b.input_ids.shape == (4, 16) and torch.equal(b.targets[:, :-1], b.input_ids[:, 1:])
    assert torch.equal(b.targets[:, -1], (b.input_ids[:, -1] + 1) % 250)
    assert torch.equal(one.batch(5).input_ids, b.input_ids)  # a pure function of the index
    ranks = [make_packer("block", tokens, micro_bs=2, rank=r, world=2, **kw).batch(5).input_ids for r in (0, 1)]
    assert torch.equal(torch.cat(ranks), b.input_ids)  # ranks read disjoint rows of the same global batch
    starts = {int(x) for i in range(one.n_blocks // 4) for x in one.batch(i).input_ids[:, 0]}
    assert len(starts) == 4 * (one.n_blocks // 4)  # one epoch visits every block once


def test_varlen_cu_seqlens_at_document_ends():
    tokens = Tokens(corpus([5, 40, 3, 70, 9, 200]))
    p = make_packer("varlen", tokens, seq_len=16, micro_bs=4, eos_id=EOS, pad_id=PAD)
    for i in range(p.n_rows):
        b = p.batch(i)
        ids, tgt, cu = b.input_ids[0], b.targets[0], b.cu_seqlens.tolist()
        assert ids.shape == (64,) and cu[0] == 0 and cu[-1] == 64 and b.cu_seqlens.dtype == torch.int32
        pieces = [ids[a:z] for a, z in zip(cu[:-1], cu[1:])]
        assert all(0 < len(x) <= 16 for x in pieces)
        for x in pieces:  # a piece never spans two documents: EOS only at its end
            assert len(set((x[:-1] if x[-1] == EOS else x).tolist()) - {EOS}) <= 1 and EOS not in x[:-1].tolist()
        ends = [z - 1 for z in cu[1:]]
        assert (tgt[ends] == IGNORE_INDEX).all()
        inner = torch.ones(64, dtype=torch.bool)
        inner[ends] = False
        assert torch.equal(tgt[inner], ids[1:][inner[:-1]])


def test_stream_rows_continue_documents_and_reset_at_starts():
    lengths = [20, 7, 50, 3, 33, 16, 60, 1]
    tokens = Tokens(corpus(lengths))
    S = 8
    p = make_packer("stream", tokens, seq_len=16, micro_bs=2, eos_id=EOS, pad_id=PAD, segment_len=S)
    seen = {0: [], 1: []}
    for m in range(12):
        b = p.batch(m)
        assert b.input_ids.shape == (2, 16) and b.resets.shape == (2, 2)
        for row in (0, 1):
            for j in range(2):
                seg = b.input_ids[row, j * S:(j + 1) * S]
                tgt = b.targets[row, j * S:(j + 1) * S]
                real = seg[seg != PAD]
                body = real[real != EOS]
                doc = int(body[0]) if len(body) else None  # None: a segment holding only the EOS
                assert set(body.tolist()) <= {doc} and EOS not in real[:-1].tolist()  # one document per segment
                seen[row].append((doc, bool(b.resets[row, j]), real.tolist()))
                assert (tgt[seg == PAD] == IGNORE_INDEX).all()
                assert torch.equal(tgt[:len(real) - 1], real[1:])
    for segs in seen.values():
        for (prev_doc, _, prev), (doc, reset, _) in zip(segs, segs[1:]):
            if reset:
                # a reset segment starts a document (the first token of doc d is d, documents are unique)
                assert prev_doc != doc or prev[-1] == EOS
            else:
                assert doc in (None, prev_doc) and prev[-1] != EOS and len(prev) == S  # continues the document
        assert segs[0][1]  # the first segment of every row resets
    # The last token of a full segment predicts the first of the next one when the document continues.
    b = p.batch(0)
    if not b.resets[0, 1]:
        assert b.targets[0, S - 1] == b.input_ids[0, S]


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_varlen_loss_equals_per_document_loss(mixer):
    model = memzoo.build_model({"vocab_size": 320, "d_model": 32, "n_layers": 2, "pattern": [mixer]})
    tokens = Tokens(corpus([5, 17, 3, 9, 30]) % 250 + (np.arange(69) % 7).astype(np.uint16))
    b = make_packer("varlen", tokens, seq_len=16, micro_bs=4, eos_id=1000, pad_id=PAD).batch(0)
    b = b._replace(cu_seqlens=torch.tensor([0, 6, 23, 27, 37, 53, 64], dtype=torch.int32))
    tgt = b.input_ids.clone()
    tgt[:, :-1] = b.input_ids[:, 1:]
    tgt[0, b.cu_seqlens[1:].long() - 1] = IGNORE_INDEX
    b = b._replace(targets=tgt)
    packed, _, _ = run_segments(model, b)
    separate = 0.0
    cu = b.cu_seqlens.tolist()
    for a, z in zip(cu[:-1], cu[1:]):
        ids = b.input_ids[:, a:z]
        separate += model(ids, labels=ids).ce_loss * (z - a - 1)
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-4)
