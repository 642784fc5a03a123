"""KVMemoryBank: a per-sample FIFO of attention keys/values, searched by exact chunk top-k.

LongMem ("Augmenting Language Models with Long-Term Memory", arXiv 2306.07174) caches one layer's token K/V in a
memory of M tokens split into chunks of csz tokens; a chunk's key is the mean of its csz token keys, and a query
retrieves the token K/V of its top-scoring chunks.  Here each batch row owns its bank (retrieval never crosses
rows) and a ring buffer makes eviction a pointer move.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..kernels.retrieval import chunk_topk

__all__ = ["KVMemoryBank", "Retrieved"]


class Retrieved(NamedTuple):
    """The result of ``KVMemoryBank.search`` for queries ``[B, H, T, d]`` and n chunks of csz tokens (L = n csz)."""

    keys: Tensor  # [B, H, T, L, d] token keys of the selected chunks, best chunk first (zeros where missing)
    values: Tensor  # [B, H, T, L, d]
    valid: Tensor  # [B, H, T, L] bool, False for missing chunks
    chunk_idx: Tensor  # [B, H, T, n] int64 slot of each chunk in the bank, -1 if missing
    scores: Tensor  # [B, H, T, n] fp32 q . chunk key, -inf if missing


def _check_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class KVMemoryBank:
    """A ring buffer of token keys/values per batch row, with one mean key per chunk of ``chunk_size`` tokens.

    A plain class, not an ``nn.Module``: the bank never enters a ``state_dict``.  It is a pytree node of
    ``memzoo.models.state`` (``_tree_flatten``): every tensor is batch-first, so ``tree_map``, ``detach_state``,
    ``index_state`` and the trainer's checkpoint of a carried state treat it like any other recurrent state.

    Each row has its own write pointer (``ptr``, in chunks) and count of chunks written since its last reset
    (``n_written``); ``append`` writes at the pointer and wraps around, so the oldest chunks are overwritten first.
    ``stamp`` holds the row's write counter (``clock``, strictly increasing within a row), which breaks score ties
    toward the most recent chunk.  ``reset`` marks a row's chunks invalid and rewinds its pointer; the stale data
    stays in place but is never returned.

    Args:
        batch_size: B; n_heads: H; d_head: d.
        capacity: M tokens per row and head, a positive multiple of ``chunk_size``.
        chunk_size: csz tokens per chunk.
        device: default CPU; dtype: default bf16 on CUDA, fp32 otherwise.

    Tensors: ``keys``, ``values`` ``[B, H, M, d]``; ``chunk_keys`` ``[B, H, M/csz, d]`` in the bank dtype (the mean of
    the stored token keys, computed in fp32 and rounded once); ``valid`` bool and ``stamp`` int64 ``[B, M/csz]``;
    ``ptr``, ``n_written``, ``clock`` int64 ``[B]``.
    """

    def __init__(self, batch_size: int, n_heads: int, d_head: int, capacity: int, chunk_size: int = 4, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        for name, value in (("batch_size", batch_size), ("n_heads", n_heads), ("d_head", d_head),
                            ("capacity", capacity), ("chunk_size", chunk_size)):
            _check_int(name, value)
        if capacity % chunk_size:
            raise ValueError(f"capacity must be a positive multiple of chunk_size={chunk_size}, got {capacity}")
        device = torch.device(device if device is not None else "cpu")
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self.batch_size, self.n_heads, self.d_head = batch_size, n_heads, d_head
        self.capacity, self.chunk_size = capacity, chunk_size
        self.n_chunks = capacity // chunk_size
        B, H, M, C, d = batch_size, n_heads, capacity, self.n_chunks, d_head
        self.keys = torch.zeros(B, H, M, d, device=device, dtype=dtype)
        self.values = torch.zeros(B, H, M, d, device=device, dtype=dtype)
        self.chunk_keys = torch.zeros(B, H, C, d, device=device, dtype=dtype)
        self.valid = torch.zeros(B, C, device=device, dtype=torch.bool)
        self.stamp = torch.zeros(B, C, device=device, dtype=torch.int64)
        self.ptr = torch.zeros(B, device=device, dtype=torch.int64)
        self.n_written = torch.zeros(B, device=device, dtype=torch.int64)
        # Chunks written so far by each row, resets included: the row's next stamp.
        self.clock = torch.zeros(B, device=device, dtype=torch.int64)

    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def fill(self) -> Tensor:
        """Valid chunks per row, int64 ``[B]``."""
        return self.valid.sum(1)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._tensors().values())

    # Every tensor of the bank, batch first: what the pytree, copies and moves carry.
    _TENSORS = ("keys", "values", "chunk_keys", "valid", "stamp", "ptr", "n_written", "clock")

    def _tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self._TENSORS}

    def _tree_flatten(self) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
        """The bank as a pytree node (``memzoo.models.state``): its batch-first tensors and its sizes."""
        return tuple(self._tensors().values()), (self.n_heads, self.d_head, self.capacity, self.chunk_size)

    @classmethod
    def _tree_unflatten(cls, sizes: tuple[int, ...], leaves: Any) -> KVMemoryBank:
        out = cls.__new__(cls)
        out.n_heads, out.d_head, out.capacity, out.chunk_size = sizes
        out.n_chunks = out.capacity // out.chunk_size
        for name, t in zip(cls._TENSORS, leaves, strict=True):
            setattr(out, name, t)
        # (A map that returns no tensors, e.g. state_leaves collecting them, leaves no batch size.)
        out.batch_size = out.keys.shape[0] if isinstance(out.keys, Tensor) else None
        return out

    def _rows(self, rows: Tensor | None, name: str) -> Tensor:
        """Indices of the selected rows (int64 ``[b]``) for a bool ``[B]`` mask."""
        if rows is None:
            return torch.arange(self.batch_size, device=self.device)
        if not isinstance(rows, Tensor) or rows.dtype != torch.bool or rows.shape != (self.batch_size,):
            raise ValueError(f"{name} must be a bool tensor [B={self.batch_size}], got "
                             f"{getattr(rows, 'dtype', type(rows).__name__)} {tuple(getattr(rows, 'shape', ()))}")
        return rows.to(self.device).nonzero().flatten()

    def _check_tokens(self, name: str, x: Tensor, length: int | None = None) -> None:
        B, H, d = self.batch_size, self.n_heads, self.d_head
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[0] != B or x.shape[1] != H or x.shape[3] != d:
            raise ValueError(f"{name} must be [B={B}, H={H}, T, d={d}], got {tuple(getattr(x, 'shape', ()))}")
        if length is not None and x.shape[2] != length:
            raise ValueError(f"{name} must have T={length} tokens like k, got {x.shape[2]}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")

    @torch.no_grad()
    def append(self, k: Tensor, v: Tensor, rows: Tensor | None = None) -> None:
        """Write token keys/values at each row's pointer, overwriting the oldest chunks once the bank is full.

        O(T) work in place; when T/csz exceeds the capacity only the newest chunks are written.

        Args:
            k, v: ``[B, H, T, d]``, T a multiple of ``chunk_size`` (buffer partial chunks in the caller); detached and
                cast to the bank dtype.
            rows: bool ``[B]``: write only these rows (the others, pointers included, are unchanged); None = all.
        """
        self._check_tokens("k", k)
        self._check_tokens("v", v, k.shape[2])
        T, csz, C = k.shape[2], self.chunk_size, self.n_chunks
        if T % csz:
            raise ValueError(f"k/v must hold a multiple of chunk_size={csz} tokens, got T={T}")
        nc = T // csz
        if nc == 0:
            return
        b = self._rows(rows, "rows")
        # Chunks that would be overwritten within this call are never written; they still use up stamps.
        skip = max(nc - C, 0)
        nw = nc - skip
        k = k.to(device=self.device, dtype=self.dtype)[b, :, skip * csz:]  # [b, H, nw csz, d]
        v = v.to(device=self.device, dtype=self.dtype)[b, :, skip * csz:]
        arange = torch.arange(nw, device=self.device)
        slot = (self.ptr[b, None] + skip + arange) % C  # [b, nw]
        tok = (slot[:, :, None] * csz + torch.arange(csz, device=self.device)).flatten(1)  # [b, nw csz]
        ib, ih = b[:, None, None], torch.arange(self.n_heads, device=self.device)[None, :, None]
        self.keys.index_put_((ib, ih, tok[:, None, :]), k)
        self.values.index_put_((ib, ih, tok[:, None, :]), v)
        ck = k.float().unflatten(2, (nw, csz)).mean(3).to(self.dtype)  # [b, H, nw, d]
        self.chunk_keys.index_put_((ib, ih, slot[:, None, :]), ck)
        self.valid[b[:, None], slot] = True
        self.stamp[b[:, None], slot] = self.clock[b, None] + skip + arange
        self.ptr[b] = (self.ptr[b] + nc) % C
        self.n_written[b] += nc
        self.clock[b] += nc

    @torch.no_grad()
    def reset(self, mask: Tensor) -> None:
        """Empty the rows where ``mask`` (bool ``[B]``) is True, e.g. at document boundaries; others are untouched."""
        b = self._rows(mask, "mask")
        self.valid[b] = False
        self.ptr[b] = 0
        self.n_written[b] = 0

    @torch.no_grad()
    def search(self, q: Tensor, n_chunks: int = 16, *, impl: str = "auto", backend: str = "torch") -> Retrieved:
        """Retrieve, per query and head, the token K/V of the ``n_chunks`` best chunks of the query's own row.

        Args:
            q: ``[B, H, T, d]`` queries (unscaled; any float dtype; detached).
            n_chunks: chunks per query, >= 1; missing ones (a bank with fewer valid chunks) are masked.
            impl: ``chunk_topk``'s path (``"auto"`` | ``"triton"`` | ``"ref"``), for ``backend="torch"``.
            backend: ``"torch"`` (exact ``chunk_topk``, ties to the newest chunk) or ``"faiss"`` (one CPU
                ``IndexFlatIP`` per row and head; exact up to faiss's rounding and tie order).

        Returns:
            ``Retrieved`` with keys/values ``[B, H, T, n_chunks csz, d]`` in the bank dtype, chunks best first and
            tokens in chunk order.
        """
        self._check_tokens("q", q)
        _check_int("n_chunks", n_chunks)
        if backend == "torch":
            scores, idx = chunk_topk(q.to(self.device), self.chunk_keys, n_chunks, valid=self.valid,
                                     stamp=self.stamp, impl=impl)
        elif backend == "faiss":
            scores, idx = self._search_faiss(q, n_chunks)
        else:
            raise ValueError(f"backend must be 'torch' or 'faiss', got {backend!r}")
        return self.gather(idx, scores)

    def gather(self, chunk_idx: Tensor, scores: Tensor) -> Retrieved:
        """Expand chunk indices ``[B, H, T, n]`` (-1 = missing) into their token K/V (see ``search``)."""
        B, H, T, n = chunk_idx.shape
        csz, d = self.chunk_size, self.d_head
        found = chunk_idx >= 0
        tok = chunk_idx.clamp(min=0)[..., None] * csz + torch.arange(csz, device=self.device)  # [B, H, T, n, csz]
        tok = tok.reshape(B, H, T * n * csz, 1).expand(-1, -1, -1, d)
        valid = found.repeat_interleave(csz, -1)  # [B, H, T, n csz]
        mask = valid[..., None]
        keys = torch.gather(self.keys, 2, tok).view(B, H, T, n * csz, d)
        values = torch.gather(self.values, 2, tok).view(B, H, T, n * csz, d)
        zero = torch.zeros((), device=self.device, dtype=self.dtype)
        return Retrieved(torch.where(mask, keys, zero), torch.where(mask, values, zero), valid, chunk_idx, scores)

    def _search_faiss(self, q: Tensor, n_chunks: int) -> tuple[Tensor, Tensor]:
        try:
            import faiss
        except ImportError as err:
            raise ImportError("KVMemoryBank.search(backend='faiss') needs the faiss package: "
                              "pip install faiss-cpu") from err
        B, H, T, _ = q.shape
        scores = torch.full((B, H, T, n_chunks), float("-inf"))
        idx = torch.full((B, H, T, n_chunks), -1, dtype=torch.int64)
        q32 = q.detach().float().cpu().contiguous()
        ck = self.chunk_keys.float().cpu()
        valid = self.valid.cpu()
        for b in range(B):
            slots = valid[b].nonzero().flatten()
            if slots.numel() == 0:
                continue
            kk = min(n_chunks, slots.numel())
            for h in range(H):
                index = faiss.IndexFlatIP(self.d_head)
                index.add(ck[b, h, slots].contiguous().numpy())
                dist, pos = index.search(q32[b, h].numpy(), kk)
                scores[b, h, :, :kk] = torch.from_numpy(dist)
                idx[b, h, :, :kk] = slots[torch.from_numpy(pos)]
        return scores.to(self.device), idx.to(self.device)

    def index_select(self, rows: Tensor) -> KVMemoryBank:
        """A new bank whose row i is this bank's row ``rows[i]`` (int64 ``[B']``): reorders or duplicates (beams)."""
        if not isinstance(rows, Tensor) or rows.dim() != 1 or rows.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"rows must be a 1-D int64 tensor of row indices, got {getattr(rows, 'shape', rows)!r}")
        rows = rows.to(self.device, torch.int64)
        return self._map(lambda t: t.index_select(0, rows))

    def clone(self) -> KVMemoryBank:
        return self._map(Tensor.clone)

    def to(self, device: torch.device | str) -> KVMemoryBank:
        """This bank on ``device`` (a new bank sharing nothing unless it already lives there)."""
        return self._map(lambda t: t.to(device))

    def _map(self, fn: Any) -> KVMemoryBank:
        """A new bank holding ``fn`` of each tensor (through the pytree pair, so nothing is listed twice)."""
        leaves, sizes = self._tree_flatten()
        return self._tree_unflatten(sizes, [fn(t) for t in leaves])

    def __repr__(self) -> str:
        fill = self.fill.tolist()
        return (f"KVMemoryBank(batch_size={self.batch_size}, n_heads={self.n_heads}, d_head={self.d_head}, "
                f"capacity={self.capacity}, chunk_size={self.chunk_size}, dtype={self.dtype}, device={self.device}, "
                f"fill={fill}/{self.n_chunks} chunks, {self.nbytes / 2**20:.1f} MiB)")
