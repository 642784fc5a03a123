"""Training data: tokenizers, offline corpora, memory-mapped shards and the three packing modes.

A corpus becomes one flat token array with ``eos_id`` after every document (the document
boundary that ``varlen`` and ``stream`` packing read back).  A packer turns the array into
batches as a pure function of ``(seed, micro-batch index, rank)``: the trainer's data position is
one integer, so resuming is exact and costs nothing, and the ranks of a multi-process run read
disjoint rows of the same global batch.

* ``block``: blocks of ``seq_len`` tokens cut from the concatenation, shuffled per epoch;
  targets are the next tokens (documents leak into each other, as in nanoGPT).
* ``varlen``: one packed row of ``micro_bs * seq_len`` tokens per micro-batch with ``cu_seqlens`` at
  document ends (documents longer than ``seq_len`` are cut into pieces); no target crosses a piece.
* ``stream``: every row is a persistent stream of whole documents, each padded to a multiple of the
  segment length, so consecutive micro-batches continue the same documents and a per-row reset
  mask marks the segments that start a new document.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sysconfig
import warnings
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ByteTokenizer", "BPETokenizer", "Batch", "make_tokenizer", "load_tokenizer", "tokenizer_for", "check_model_vocab",
    "iter_documents", "tokenize_documents", "split_tokens", "prepare", "load_prepared", "make_packer", "BlockPacker",
    "VarlenPacker", "StreamPacker", "DataWarning", "DECODE_ERRORS",
]

# What a document that is not valid UTF-8 gets: its bad bytes replaced by U+FFFD (one warning per source, with a
# count), or an error naming the file and the byte offset.
DECODE_ERRORS = ("replace", "strict")
# surrogateescape maps each undecodable byte to one code point in this range: counting them counts the bad bytes.
_ESCAPED = re.compile("[\udc80-\udcff]")


class DataWarning(UserWarning):
    """A data source that trains, but not as written: replaced bytes, skipped empty files."""

IGNORE_INDEX = -100


def _pad_vocab(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


class ByteTokenizer:
    """UTF-8 bytes 0-255 plus BOS/EOS/PAD at 256-258; vocabulary padded to 320.  Lossless, no files."""

    kind = "byte"
    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = _pad_vocab(259)

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def config(self) -> dict[str, Any]:
        return {"type": self.kind, "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "pad_id": self.pad_id}

    def save(self, directory: str | Path) -> None:
        Path(directory, "tokenizer_config.json").write_text(json.dumps(self.config(), indent=2))

    @property
    def n_text_ids(self) -> int:
        """Ids ``encode`` can return (the 256 byte values; the specials are never produced by ``encode``)."""
        return 256


class BPETokenizer:
    """A byte-level BPE from the ``tokenizers`` package; ``tokenizer.json`` loads offline."""

    kind = "bpe"
    SPECIALS = ("<|bos|>", "<|endoftext|>", "<|pad|>")

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        ids = [tok.token_to_id(s) for s in self.SPECIALS]
        if None in ids:
            raise ValueError(f"a memzoo BPE tokenizer needs the special tokens {self.SPECIALS}")
        self.bos_id, self.eos_id, self.pad_id = ids
        self.vocab_size = _pad_vocab(tok.get_vocab_size())

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(cls.SPECIALS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        from tokenizers import Tokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no BPE tokenizer file at {str(path)!r}")
        return cls(Tokenizer.from_file(str(path)))

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text).ids, dtype=np.uint32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.uint32) for e in self.tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids))

    def config(self) -> dict[str, Any]:
        return {"type": self.kind, "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "pad_id": self.pad_id}

    @property
    def n_text_ids(self) -> int:
        """Ids ``encode`` can return: the trained vocabulary (the padding up to ``vocab_size`` is never used)."""
        return self.tok.get_vocab_size()

    def save(self, directory: str | Path) -> None:
        self.tok.save(str(Path(directory, "tokenizer.json")))
        Path(directory, "tokenizer_config.json").write_text(json.dumps(self.config(), indent=2))


Tokenizer = ByteTokenizer | BPETokenizer


def make_tokenizer(spec: str, documents: Iterable[str] | None = None) -> Tokenizer:
    """``"byte"``, ``"bpe:PATH"`` (a tokenizer.json or its directory) or ``"train:VOCAB"`` (needs ``documents``)."""
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("bpe:"):
        return BPETokenizer.load(spec[4:])
    if spec.startswith("train:"):
        try:
            vocab = int(spec[6:])
        except ValueError:
            raise ValueError(f"data.tokenizer 'train:VOCAB' needs an integer vocabulary, got {spec!r}") from None
        if vocab < 300:
            raise ValueError(f"data.tokenizer {spec!r}: a byte-level BPE needs a vocabulary of at least 300")
        if documents is None:
            raise ValueError("training a BPE tokenizer needs the documents")
        return BPETokenizer.train(documents, vocab)
    raise ValueError(f"data.tokenizer must be 'byte', 'bpe:PATH' or 'train:VOCAB', got {spec!r}")


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer saved next to a model (``final/``) or a prepared dataset."""
    cfg_path = Path(directory, "tokenizer_config.json")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no tokenizer_config.json in {str(directory)!r}")
    kind = json.loads(cfg_path.read_text())["type"]
    return ByteTokenizer() if kind == "byte" else BPETokenizer.load(directory)


def check_model_vocab(tokenizer: Tokenizer, vocab_size: int, who: str) -> None:
    """Refuse a model whose embedding cannot take every id ``tokenizer.encode`` returns."""
    if vocab_size < tokenizer.n_text_ids:
        raise ValueError(f"{who}: the model's vocab_size={vocab_size} is smaller than the {tokenizer.kind} "
                         f"tokenizer's {tokenizer.n_text_ids} ids; the model was not trained with this tokenizer")


def tokenizer_for(directory: str | Path) -> Tokenizer:
    """The tokenizer saved next to a model export, or memzoo's byte tokenizer where none was saved
    (hand-built models, exports older than tokenizer files)."""
    if Path(directory, "tokenizer_config.json").is_file():
        return load_tokenizer(directory)
    return ByteTokenizer()


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


class _Decoder:
    """UTF-8 decoding of a source's files: strict errors name the file and byte offset; replaced bytes are counted
    for one warning per source."""

    def __init__(self, source: str, errors: str) -> None:
        if errors not in DECODE_ERRORS:
            raise ValueError(f"errors must be one of {DECODE_ERRORS}, got {errors!r}")
        self.source, self.errors = source, errors
        self.bad_bytes, self.bad_files, self.first = 0, set(), None
        self.empty: list[str] = []

    def decode(self, data: bytes, path: str, offset: int = 0) -> str:
        """``data`` (found at byte ``offset`` of ``path``) as text."""
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            where = offset + e.start
            if self.errors == "strict":
                raise ValueError(f"{path}: not valid UTF-8 at byte offset {where} ({e.reason}, byte "
                                 f"0x{data[e.start]:02x}); fix the file (for .txt/.jsonl: or set "
                                 "data.decode_errors='replace')") from None
            self.bad_bytes += len(_ESCAPED.findall(data.decode("utf-8", "surrogateescape")))
            self.bad_files.add(path)
            if self.first is None:
                self.first = (path, where)
            return data.decode("utf-8", errors="replace")

    def read(self, path: str | Path) -> str | None:
        """The text of ``path``, or ``None`` (and a note for the warning) when it is empty."""
        data = Path(path).read_bytes()
        if not data.strip():
            self.empty.append(str(path))
            return None
        return self.decode(data, str(path))

    def finish(self, documents: int) -> None:
        """Warn once about replaced bytes and skipped empty files; fail if nothing but empty files was found."""
        if self.bad_bytes:
            path, where = self.first
            warnings.warn(f"data.source {self.source!r}: {self.bad_bytes} byte(s) in {len(self.bad_files)} file(s) "
                          f"are not valid UTF-8 and were replaced by U+FFFD (first in {path} at byte offset {where}); "
                          "set data.decode_errors='strict' to fail instead", DataWarning, stacklevel=3)
        if self.empty and not documents:
            raise ValueError(f"data.source {self.source!r}: every file is empty: {', '.join(self.empty)}")
        if self.empty:
            warnings.warn(f"data.source {self.source!r}: skipped {len(self.empty)} empty file(s): "
                          f"{', '.join(self.empty[:5])}{' ...' if len(self.empty) > 5 else ''}", DataWarning,
                          stacklevel=3)


def source_files(source: str) -> list[str]:
    """The files a ``file:GLOB`` source matches, sorted (``~`` expanded, ``**`` recursive)."""
    return sorted(glob.glob(os.path.expanduser(source.removeprefix("file:")), recursive=True))


def iter_documents(source: str, text_field: str = "text", errors: str = "replace") -> Iterator[str]:
    """The documents of ``source`` (see ``DataConfig.source``) as strings, in a fixed order.

    Args:
        errors: ``"replace"``: bytes that are not UTF-8 become U+FFFD, with one ``DataWarning`` per source giving
            their count and the first file and byte offset; ``"strict"``: a ``ValueError`` naming the file and the
            byte offset.  Empty files are skipped with a warning (an error when every file is empty).
    """
    decoder = _Decoder(source, errors)
    if source == "pydoc":
        from pydoc_data.topics import topics

        yield from (topics[k] for k in sorted(topics))
    elif source == "stdlib-code":
        for path in _stdlib_files():
            text = decoder.read(path)
            if text is not None:
                yield text
    elif source.startswith("file:"):
        files = source_files(source)
        if not files:
            raise FileNotFoundError(f"data.source {source!r} matches no files")
        tabular = [f for f in files if f.endswith((".jsonl", ".json", ".parquet"))]
        n = 0
        for f in (f for f in files if f not in tabular):
            text = decoder.read(f)
            if text is not None:
                n += 1
                yield text
        for f in (f for f in tabular if f.endswith(".jsonl")):
            for text in _jsonl_column(f, text_field, decoder):
                n += 1
                yield text
        rest = [f for f in tabular if not f.endswith(".jsonl")]
        for f in rest:
            if Path(f).stat().st_size == 0:
                decoder.empty.append(f)
            elif f.endswith(".json"):
                # The Arrow JSON reader's decoding errors name neither the file nor the offset: check first.
                decoder.errors, errors_was = "strict", decoder.errors
                decoder.decode(Path(f).read_bytes(), f)
                decoder.errors = errors_was
        rest = [f for f in rest if f not in decoder.empty]
        if rest:
            from datasets import load_dataset

            kind = "parquet" if rest[0].endswith(".parquet") else "json"
            try:
                ds = load_dataset(kind, data_files=rest, split="train")
            except Exception as e:
                raise ValueError(f"data.source {source!r}: reading {', '.join(rest)} failed: "
                                 f"{type(e).__name__}: {e}") from e
            for text in _text_column(ds, text_field, source):
                n += 1
                yield text
        decoder.finish(n)
    elif source.startswith("hf:"):
        from datasets import load_dataset

        name, _, split = source[3:].partition(":")
        yield from _text_column(load_dataset(name, split=split or "train"), text_field, source)
    else:
        raise ValueError(f"data.source {source!r} is not a document source")
    if source == "stdlib-code":
        decoder.finish(1)


def _jsonl_column(path: str, field: str, decoder: _Decoder) -> Iterator[str]:
    """The ``field`` of every line of a JSON-lines file; errors name the file, the line and the byte offset."""
    data = Path(path).read_bytes()
    if not data.strip():
        decoder.empty.append(path)
        return
    offset = 0
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if raw.strip():
            line = decoder.decode(raw, path, offset)
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                at = offset + len(line[:e.pos].encode("utf-8", "surrogateescape"))
                raise ValueError(f"{path}: line {lineno} (byte offset {at}) is not valid JSON: {e.msg}") from None
            if not isinstance(row, dict) or field not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"{path}: line {lineno} has no field {field!r} (got {keys}); set data.text_field")
            if not isinstance(row[field], str):
                raise ValueError(f"{path}: line {lineno}: field {field!r} must be a string, got "
                                 f"{type(row[field]).__name__}")
            yield row[field]
        offset += len(raw) + 1


def _text_column(ds: Any, field: str, source: str) -> Iterator[str]:
    if field not in ds.column_names:
        raise ValueError(f"data.source {source!r} has no column {field!r} (columns: {ds.column_names}); "
                         "set data.text_field")
    for row in ds:
        yield row[field]


def tokenize_documents(tokenizer: Tokenizer, documents: Iterable[str], batch: int = 256) -> np.ndarray:
    """One flat array: every document's tokens followed by ``eos_id`` (uint16, or uint32 for vocab > 65535)."""
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    parts: list[np.ndarray] = []
    pending: list[str] = []

    def flush() -> None:
        for ids in tokenizer.encode_batch(pending):
            parts.extend((ids.astype(dtype, copy=False), eos))
        pending.clear()

    for doc in documents:
        pending.append(doc)
        if len(pending) == batch:
            flush()
    flush()
    if not parts:
        raise ValueError("the data source yielded no documents")
    return np.concatenate(parts)


def split_tokens(tokens: np.ndarray, val_fraction: float, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """About the last ``val_fraction`` of the tokens is validation, starting at the document start nearest the cut.

    The cut stays where it is when moving it would leave either side empty (one huge document).
    """
    n = len(tokens)
    cut = int(n * (1 - val_fraction))
    starts = np.flatnonzero(tokens[:-1] == eos_id) + 1  # document starts after the first
    starts = starts[(starts > 0) & (starts < n - 1)]
    if len(starts):
        cut = int(starts[np.argmin(np.abs(starts - cut))])
    return tokens[:cut], tokens[cut:]


def prepare(source: str, tokenizer: str, out_dir: str | Path, *, val_fraction: float = 0.05,
            text_field: str = "text", decode_errors: str = "replace") -> dict[str, Any]:
    """Tokenize ``source`` into ``out_dir/{train,val}.bin`` + ``meta.json`` (+ tokenizer files).

    Returns:
        The metadata written to ``meta.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = iter_documents(source, text_field, decode_errors) if tokenizer.startswith("train:") else None
    tok = make_tokenizer(tokenizer, docs)
    tokens = tokenize_documents(tok, iter_documents(source, text_field, decode_errors))
    train, val = split_tokens(tokens, val_fraction, tok.eos_id)
    for name, arr in (("train", train), ("val", val)):
        tmp = out / f".{name}.bin.tmp"
        arr.tofile(tmp)
        os.replace(tmp, out / f"{name}.bin")
    tok.save(out)
    meta = {"source": source, "tokenizer": tok.config(), "dtype": np.dtype(tokens.dtype).name,
            "eos_id": tok.eos_id, "tokens": {"train": int(len(train)), "val": int(len(val))}}
    Path(out, "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


class Tokens:
    """A token array in memory, or a ``.bin`` file whose memmap is re-opened per batch.

    Re-opening avoids the resident-memory growth of one long-lived memmap (nanoGPT's workaround).
    """

    def __init__(self, data: np.ndarray | None = None, *, path: str | Path | None = None,
                 dtype: str = "uint16") -> None:
        self._data, self._path, self._dtype = data, path, np.dtype(dtype)
        self.length = len(data) if data is not None else os.path.getsize(path) // self._dtype.itemsize

    def view(self) -> np.ndarray:
        if self._data is not None:
            return self._data
        return np.memmap(self._path, dtype=self._dtype, mode="r")

    def __len__(self) -> int:
        return self.length


def load_prepared(directory: str | Path) -> tuple[Tokenizer, Tokens, Tokens]:
    """Tokenizer and train/val tokens of a ``memzoo-prepare`` output directory."""
    d = Path(directory)
    meta_path = d / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"data.source prepared:{directory}: no meta.json (run memzoo-prepare first)")
    meta = json.loads(meta_path.read_text())
    return (load_tokenizer(d), Tokens(path=d / "train.bin", dtype=meta["dtype"]),
            Tokens(path=d / "val.bin", dtype=meta["dtype"]))


class Batch(NamedTuple):
    input_ids: Tensor  # [B, T] int64
    targets: Tensor  # [B, T] int64: the token each position predicts, -100 = none
    cu_seqlens: Tensor | None = None  # [N+1] int32, varlen only (B = 1)
    resets: Tensor | None = None  # [B, T // segment_len] bool, stream only: segment starts a new document

    def to(self, device: torch.device | str) -> Batch:
        non_blocking = torch.device(device).type == "cuda"
        return Batch(*(t.to(device, non_blocking=non_blocking) if t is not None else None for t in self))


class _Packer:
    """Shared bookkeeping: rank ``rank`` of ``world`` reads ``micro_bs`` rows of global batch ``index``."""

    def __init__(self, tokens: Tokens, *, seq_len: int, micro_bs: int, eos_id: int, pad_id: int,
                 seed: int = 0, rank: int = 0, world: int = 1, segment_len: int | None = None) -> None:
        self.tokens, self.seq_len, self.micro_bs = tokens, seq_len, micro_bs
        self.eos_id, self.pad_id, self.seed = eos_id, pad_id, seed
        self.rank, self.world = rank, world
        self.segment_len = segment_len or seq_len

    def _order(self, n: int, epoch: int) -> np.ndarray:
        return _permutation(n, self.seed, epoch)


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class BlockPacker(_Packer):
    """``[micro_bs, seq_len]`` blocks of the concatenated stream, reshuffled every epoch."""

    def __init__(self, tokens: Tokens, **kw: Any) -> None:
        super().__init__(tokens, **kw)
        self.n_blocks = (len(tokens) - 1) // self.seq_len
        if self.n_blocks < 1:
            raise ValueError(f"{len(tokens)} tokens cannot fill one block of data.seq_len={self.seq_len} (+1 target)")

    def batch(self, index: int) -> Batch:
        data, L = self.tokens.view(), self.seq_len
        first = (index * self.world + self.rank) * self.micro_bs
        rows = []
        for sample in range(first, first + self.micro_bs):
            start = int(self._order(self.n_blocks, sample // self.n_blocks)[sample % self.n_blocks]) * L
            rows.append(np.asarray(data[start:start + L + 1], dtype=np.int64))
        arr = torch.from_numpy(np.stack(rows))
        return Batch(arr[:, :-1].contiguous(), arr[:, 1:].contiguous())


class VarlenPacker(_Packer):
    """One packed row of ``micro_bs * seq_len`` tokens per rank, ``cu_seqlens`` at document ends."""

    def __init__(self, tokens: Tokens, **kw: Any) -> None:
        super().__init__(tokens, **kw)
        self.row_len = self.micro_bs * self.seq_len
        self.n_rows = (len(tokens) - 1) // self.row_len
        if self.n_rows < 1:
            raise ValueError(f"{len(tokens)} tokens cannot fill one packed row of micro_bs * seq_len = {self.row_len}")

    def batch(self, index: int) -> Batch:
        T, L = self.row_len, self.seq_len
        sample = index * self.world + self.rank
        start = int(self._order(self.n_rows, sample // self.n_rows)[sample % self.n_rows]) * T
        ids = np.asarray(self.tokens.view()[start:start + T], dtype=np.int64)
        bounds = [0, *(np.flatnonzero(ids[:-1] == self.eos_id) + 1).tolist(), T]
        # Documents longer than seq_len become several pieces so no piece's context exceeds seq_len.
        cu = [0]
        for a, b in zip(bounds[:-1], bounds[1:]):
            cu.extend(range(a + L, b, L))
            cu.append(b)
        cu_seqlens = torch.tensor(cu, dtype=torch.int32)
        targets = np.empty_like(ids)
        targets[:-1] = ids[1:]
        targets[np.asarray(cu[1:]) - 1] = IGNORE_INDEX
        return Batch(torch.from_numpy(ids)[None], torch.from_numpy(targets)[None], cu_seqlens)


class StreamPacker(_Packer):
    """Persistent document streams: row g walks its own stretch of segments, batch after batch.

    Every document is cut into segments of ``segment_len`` (the last one padded with ``pad_id``,
    target -100), so a document always starts at a segment boundary and a state reset before
    that segment is exact.
    """

    def __init__(self, tokens: Tokens, **kw: Any) -> None:
        super().__init__(tokens, **kw)
        S = self.segment_len
        ends = np.flatnonzero(tokens.view() == self.eos_id) + 1
        if not len(ends) or ends[-1] != len(tokens):
            ends = np.append(ends, len(tokens))
        starts = np.concatenate(([0], ends[:-1]))
        n_seg = -(-(ends - starts) // S)  # [docs]
        doc = np.repeat(np.arange(len(starts)), n_seg)
        first = np.concatenate(([0], np.cumsum(n_seg)[:-1]))
        k = np.arange(len(doc)) - np.repeat(first, n_seg)
        self.seg_start = starts[doc] + k * S  # [segments] token offset of each segment
        self.seg_end = np.minimum(self.seg_start + S, ends[doc])
        self.seg_new = k == 0  # the segment starts a document
        rows = self.micro_bs * self.world
        if len(doc) < rows:
            raise ValueError(f"stream packing: {len(doc)} segments cannot feed {rows} rows (micro_bs x processes)")
        self.bounds = np.linspace(0, len(doc), rows + 1).astype(np.int64)  # row g owns [bounds[g], bounds[g+1])
        self.per_row = self.seq_len // S

    def batch(self, index: int) -> Batch:
        S, data = self.segment_len, self.tokens.view()
        B, n = self.micro_bs, self.per_row
        ids = np.full((B, n * S), self.pad_id, dtype=np.int64)
        targets = np.full((B, n * S), IGNORE_INDEX, dtype=np.int64)
        resets = np.zeros((B, n), dtype=bool)
        for i in range(B):
            g = self.rank * B + i
            lo, hi = int(self.bounds[g]), int(self.bounds[g + 1])
            for j in range(n):
                pos = (index * n + j) % (hi - lo)
                s = lo + pos
                a, b = int(self.seg_start[s]), int(self.seg_end[s])
                seg = np.asarray(data[a:b], dtype=np.int64)
                ids[i, j * S:j * S + len(seg)] = seg
                targets[i, j * S:j * S + len(seg) - 1] = seg[1:]
                # The last token predicts the next segment's first one only if that segment continues
                # this document in this row (not a new document, not a wrap to the stretch's start).
                if pos + 1 < hi - lo and not self.seg_new[s + 1]:
                    targets[i, j * S + len(seg) - 1] = int(data[b])
                resets[i, j] = bool(self.seg_new[s]) or pos == 0
        return Batch(torch.from_numpy(ids), torch.from_numpy(targets), None, torch.from_numpy(resets))


def make_packer(mode: str, tokens: Tokens, **kw: Any) -> BlockPacker | VarlenPacker | StreamPacker:
    packers = {"block": BlockPacker, "varlen": VarlenPacker, "stream": StreamPacker}
    if mode not in packers:
        raise ValueError(f"data.pack must be one of {sorted(packers)}, got {mode!r}")
    return packers[mode](tokens, **kw)
