"""Byte-level language modelling on Python's help topics: next-byte prediction, scored by held-out loss.

The text is ``memzoo-train``'s ``pydoc`` source (``pydoc_data.topics``, shipped with Python, 0.47 MB: no
download): the topics in sorted order joined by newlines, as UTF-8 bytes (tokens 0..255).  It is cut into
consecutive rows of ``seq_len + 1`` bytes; a row's first ``seq_len`` bytes are the inputs and every position is
labelled with the byte after it.  The split is fixed: every tenth row (row index 9, 19, 29, ...) is held out
(``test``), the others are ``train``, less any row whose inputs equal a held-out row's: the text repeats itself (a
table's border line, a repeated sentence), and such a row would put held-out text in the training set.  The text,
so the row counts, depend on the Python release (at ``seq_len`` 256 on 3.11: 1632 train and 181 held-out rows, no
repeat; at ``seq_len`` 128, 10 repeats are dropped; on 3.13 at ``seq_len`` 64, 30).  The generator's seed only
orders the rows and picks a subset when ``num_examples`` is smaller than the split.

The metric is the mean cross-entropy over all positions (``loss``, nats per byte; ``/ ln 2`` is bits per byte).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .base import TaskData, check_positive, to_long

__all__ = ["PydocLMConfig", "make", "rows", "HELD_OUT_EVERY", "VOCAB_SIZE"]

VOCAB_SIZE = 256
# Row r is held out when r % HELD_OUT_EVERY == HELD_OUT_EVERY - 1.
HELD_OUT_EVERY = 10
SPLITS = ("train", "test")


@dataclass(frozen=True)
class PydocLMConfig:
    split: str = "train"
    seq_len: int = 256
    # None: every row of the split; fewer: a subset chosen by the seed.
    num_examples: int | None = None
    # Bytes; fixed, a field so that DataSpec can read it.
    vocab_size: int = VOCAB_SIZE

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {self.split!r}")
        check_positive(seq_len=self.seq_len)
        if self.vocab_size != VOCAB_SIZE:
            raise ValueError(f"vocab_size is fixed at {VOCAB_SIZE} (bytes), got {self.vocab_size}")
        available = len(rows(self.seq_len, self.split))
        if self.num_examples is None:
            object.__setattr__(self, "num_examples", available)
        else:
            check_positive(num_examples=self.num_examples)
            if self.num_examples > available:
                raise ValueError(f"num_examples={self.num_examples} exceeds the {available} {self.split} rows of "
                                 f"seq_len {self.seq_len}")


@functools.lru_cache(maxsize=1)
def _text() -> np.ndarray:
    from memzoo.train.data import iter_documents

    return np.frombuffer("\n".join(iter_documents("pydoc")).encode("utf-8"), dtype=np.uint8)


@functools.lru_cache(maxsize=8)
def rows(seq_len: int, split: str) -> np.ndarray:
    """``[N, seq_len + 1]`` byte rows of ``split`` (in text order), by the fixed every-tenth-row rule; no ``train``
    row has a held-out row's inputs (its first ``seq_len`` bytes)."""
    text = _text()
    n = len(text) // (seq_len + 1)
    all_rows = text[: n * (seq_len + 1)].reshape(n, seq_len + 1)
    held_out = np.arange(n) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    if split == "test":
        return all_rows[held_out]
    test = {r[:-1].tobytes() for r in all_rows[held_out]}
    train = all_rows[~held_out]
    return train[np.array([r[:-1].tobytes() not in test for r in train], dtype=bool)]


def make(cfg: PydocLMConfig, seed: int) -> TaskData:
    """``num_examples`` rows of the split as ``[N, seq_len]`` inputs, labelled with the next byte everywhere."""
    split_rows = rows(cfg.seq_len, cfg.split)
    pick = np.random.default_rng(seed).permutation(len(split_rows))[: cfg.num_examples]
    chosen = split_rows[pick].astype(np.int64)
    return TaskData(to_long(chosen[:, :-1]), to_long(chosen[:, 1:]), {})
