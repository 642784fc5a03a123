"""Token-level needle in a haystack: a trainable, any-layer version of the needle test.

Modelled on the passkey test of "Landmark Attention" (Mohtashami & Jaggi, arXiv 2305.16300) and
RULER's S-NIAH (Hsieh et al., arXiv 2404.06654), in tokens instead of text so that a small LM can
be trained on it from scratch.  A haystack repeats a 5-token noise pattern; one needle
``[KEY k1..k3 VAL v1..v4]`` sits at a chosen depth; the sequence ends with ``[Q k1..k3]`` and
the model must produce ``v1..v4``:

    n n n n n n [KEY k1 k2 k3 VAL v1 v2 v3 v4] n n n ... n [Q k1 k2 k3] v1 v2 v3      labels: v1 v2 v3 v4

The value tokens after the query are teacher-forced, so the all-four exact match equals greedy
decoding's exact match (a greedy decoder is right iff every teacher-forced argmax is).

Variants: ``passkey`` (one fixed key, digit values), ``number`` (random word keys, digit
values), ``uuid`` (random word keys, hex-like values); ``n_distractors`` adds needles with other
keys (multi-key NIAH).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .base import IGNORE, TaskData, check_positive, distinct_per_row, to_long

__all__ = ["NIAHConfig", "make", "KEY", "VAL", "QUERY", "NOISE", "VARIANTS"]

KEY, VAL, QUERY = 1, 2, 3
NOISE = (4, 5, 6, 7, 8)
_DIGITS = 10
_HEX = 16
_FIRST_CONTENT = 9
VARIANTS = ("passkey", "number", "uuid")


@dataclass(frozen=True)
class NIAHConfig:
    vocab_size: int = 64
    num_examples: int = 1000
    seq_len: int = 128
    variant: str = "number"
    # Needle depths as fractions of the haystack; examples are split evenly over them.
    # None draws a uniform depth per example (training).
    depths: tuple[float, ...] | None = (0.0, 0.25, 0.5, 0.75, 1.0)
    key_len: int = 3
    value_len: int = 4
    # Extra needles with other keys (and other values) at random depths.
    n_distractors: int = 0

    def __post_init__(self) -> None:
        check_positive(vocab_size=self.vocab_size, num_examples=self.num_examples, seq_len=self.seq_len,
                       key_len=self.key_len, value_len=self.value_len)
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.depths is not None:
            object.__setattr__(self, "depths", tuple(float(d) for d in self.depths))
            if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
                raise ValueError(f"depths must be fractions in [0, 1], got {self.depths}")
        if self.n_distractors < 0:
            raise ValueError(f"n_distractors must be >= 0, got {self.n_distractors}")
        if self.vocab_size < _FIRST_CONTENT + _HEX + 2:
            raise ValueError(f"vocab_size must be >= {_FIRST_CONTENT + _HEX + 2}, got {self.vocab_size}")
        if self.haystack_len < self.needle_len * (1 + self.n_distractors):
            raise ValueError(f"seq_len={self.seq_len} leaves no room for {1 + self.n_distractors} needle(s) of "
                             f"{self.needle_len} tokens before the {self.query_len}-token query")

    @property
    def needle_len(self) -> int:
        return 2 + self.key_len + self.value_len

    @property
    def query_len(self) -> int:
        # Q, the key, then the teacher-forced values but the last.
        return 1 + self.key_len + self.value_len - 1

    @property
    def haystack_len(self) -> int:
        return self.seq_len - self.query_len

    def value_alphabet(self) -> tuple[int, int]:
        """``[low, high)`` of value tokens: digits, or a 16-symbol hex alphabet for uuids."""
        size = _HEX if self.variant == "uuid" else _DIGITS
        return _FIRST_CONTENT, _FIRST_CONTENT + size

    def key_alphabet(self) -> tuple[int, int]:
        """Key "words" use the tokens above the value alphabet."""
        return _FIRST_CONTENT + _HEX, self.vocab_size

    def needle_start(self, depth: float) -> int:
        """Where the needle's KEY token sits for a depth fraction: 0 = first token, 1 = flush with the query."""
        return int(round(depth * (self.haystack_len - self.needle_len)))


def make(cfg: NIAHConfig, seed: int) -> TaskData:
    """Generate ``cfg.num_examples`` haystacks with one needle (plus distractors) and a final query.

    Returns:
        ``TaskData`` with inputs/labels ``[N, seq_len]``; slices ``depth=<percent>`` when depths are fixed.
    """
    rng = np.random.default_rng(seed)
    N, T, H, L = cfg.num_examples, cfg.seq_len, cfg.haystack_len, cfg.needle_len
    n_needles = 1 + cfg.n_distractors
    klo, khi = cfg.key_alphabet()
    vlo, vhi = cfg.value_alphabet()
    if cfg.variant == "passkey":
        keys = np.broadcast_to(np.arange(klo, klo + cfg.key_len), (N, n_needles, cfg.key_len)).copy()
    else:
        # Keys of one example differ in their first token, so a distractor never shares the key.
        first = distinct_per_row(rng, N, n_needles, klo, khi)
        keys = np.concatenate([first[..., None], rng.integers(klo, khi, (N, n_needles, cfg.key_len - 1))], axis=2)
    values = rng.integers(vlo, vhi, (N, n_needles, cfg.value_len))

    phase = rng.integers(0, len(NOISE), N)
    inputs = np.asarray(NOISE)[(np.arange(T)[None, :] + phase[:, None]) % len(NOISE)]  # [N, T]
    if cfg.depths is None:
        depth = rng.random(N)
    else:
        depth = np.asarray(cfg.depths)[np.arange(N) % len(cfg.depths)]
    start = np.rint(depth * (H - L)).astype(np.int64)

    # Distractors go into the free stretches left and right of the target needle.
    starts = np.zeros((N, n_needles), dtype=np.int64)
    starts[:, 0] = start
    for n in range(N):
        taken = [(start[n], start[n] + L)]
        for j in range(1, n_needles):
            free = [s for s in range(H - L + 1) if all(s + L <= a or s >= b for a, b in taken)]
            if not free:
                raise ValueError(f"seq_len={T} is too short to place {cfg.n_distractors} distractor needles")
            s = free[rng.integers(len(free))]
            starts[n, j] = s
            taken.append((s, s + L))
    needles = np.concatenate([np.full((N, n_needles, 1), KEY), keys, np.full((N, n_needles, 1), VAL), values], 2)
    rows = np.arange(N)[:, None]
    for j in range(n_needles):
        inputs[rows, starts[:, j : j + 1] + np.arange(L)[None, :]] = needles[:, j]

    query = np.concatenate([np.full((N, 1), QUERY), keys[:, 0], values[:, 0, :-1]], axis=1)
    inputs[:, H:] = query
    labels = np.full((N, T), IGNORE, dtype=np.int64)
    labels[:, T - cfg.value_len :] = values[:, 0]

    slices = {}
    if cfg.depths is not None:
        for d in sorted(set(cfg.depths)):
            slices[f"depth={round(100 * d)}"] = torch.from_numpy(depth == d)
    return TaskData(to_long(inputs), to_long(labels), slices)
