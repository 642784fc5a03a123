"""Recurrent state as a pytree: helpers that work for every layer without knowing it.

A state is ``None``, a tensor, a (named) tuple / list / dict of states, or an object that flattens
itself (``obj._tree_flatten() -> (leaves, aux)``, ``type(obj)._tree_unflatten(aux, leaves)``, e.g.
LongMem's ``KVMemoryBank``). Every tensor leaf is
batch-first, so the trainer can detach it (truncated backprop), reorder it by batch index (beam
search, dropping finished rows) or reset chosen rows (document boundaries) without any
layer-specific code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["tree_map", "state_leaves", "detach_state", "index_state", "cat_states", "state_batch_size"]


def tree_map(fn: Callable[[Tensor], Any], tree: Any) -> Any:
    """Apply ``fn`` to every tensor leaf of ``tree``, keeping its structure and NamedTuple types.

    Non-tensor leaves (``None``, Python numbers) are returned unchanged.
    """
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(tree_map(fn, t) for t in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(tree_map(fn, t) for t in tree)
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if hasattr(tree, "_tree_flatten"):
        leaves, aux = tree._tree_flatten()
        return type(tree)._tree_unflatten(aux, [tree_map(fn, t) for t in leaves])
    return tree


def state_leaves(tree: Any) -> list[Tensor]:
    """All tensor leaves of ``tree`` in a fixed (depth-first) order."""
    leaves: list[Tensor] = []
    tree_map(leaves.append, tree)
    return leaves


def detach_state(state: Any) -> Any:
    """Cut the autograd graph behind ``state`` (truncated backprop through time); values unchanged."""
    return tree_map(Tensor.detach, state)


def index_state(state: Any, index: Tensor) -> Any:
    """Select / reorder batch rows of every leaf: ``leaf[index]`` along dim 0.

    Args:
        index: ``[B']`` int64 row indices (may repeat rows, e.g. for beam search).
    """
    if not isinstance(index, Tensor) or index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
        got = f"shape {tuple(index.shape)} {index.dtype}" if isinstance(index, Tensor) else type(index).__name__
        raise TypeError(f"index must be a 1-D int32/int64 tensor, got {got}")
    batch = state_batch_size(state)
    if batch is not None and index.device.type == "cpu" and index.numel() and not torch.compiler.is_compiling():
        lo, hi = int(index.min()), int(index.max())
        if lo < -batch or hi >= batch:
            raise ValueError(f"index must select rows of the state's batch of {batch}, got values in [{lo}, {hi}]")
    return tree_map(lambda t: t.index_select(0, index.to(t.device)), state)


def cat_states(states: list[Any]) -> Any:
    """Concatenate the batch rows of same-structured states (the inverse of splitting with ``index_state``);
    ``None`` and other non-tensor leaves are taken from the first state."""
    first = states[0]
    if isinstance(first, Tensor):
        return torch.cat(states, 0)
    if isinstance(first, (tuple, list)):
        parts = [cat_states([s[i] for s in states]) for i in range(len(first))]
        return type(first)(*parts) if hasattr(first, "_fields") else type(first)(parts)
    if isinstance(first, dict):
        return {k: cat_states([s[k] for s in states]) for k in first}
    return first


def state_batch_size(state: Any) -> int | None:
    """The batch size shared by all leaves, or ``None`` for an empty state.

    Raises:
        ValueError: if the leaves disagree on their first dimension.
    """
    sizes = {t.shape[0] if t.dim() > 0 else None for t in state_leaves(state)}
    if not sizes:
        return None
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"state leaves must all be batch-first with one batch size, got {sorted(map(str, sizes))}")
    return sizes.pop()
