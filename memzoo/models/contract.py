"""The memzoo layer contract: one interface for every token mixer (attention, MoM, Titans, S4D, ...).

    y, state = layer(x, state=None, cu_seqlens=None)    # x: [B, T, D] -> y: [B, T, D]
    y_t, state = layer.step(x_t, state)                 # x_t: [B, D], exact single-token decoding
    state = layer.init_state(B, device=..., dtype=...)  # state=None behaves exactly like this
    layer.state_size(seq_len)                           # floats of memory carried per sequence

Rules every subclass keeps (the contract test suite checks them for every registered mixer):

* ``forward`` always returns the state; feeding a sequence in pieces while carrying the state
  gives the same outputs as one full pass (any split, not only chunk multiples).
* The state is a pytree (NamedTuple of tensors) with the batch first, see ``memzoo.models.state``.
* A layer owns neither the residual nor the pre-norm (the ``Block`` does) and takes device and
  dtype from its input.
* Packed variable-length batches: ``cu_seqlens`` (``[N+1]`` int, B must be 1) marks N
  independent sequences; the layer resets at every boundary and the returned state holds one
  row per sequence.  Passing an initial state together with ``cu_seqlens`` is layer-specific.
* Auxiliary losses (router balance, ...) leave a layer through one mechanism:
  ``self.record_aux_loss(name, value)`` during forward stores an already-weighted scalar; the
  language model clears them before its forward pass, collects them after it with
  ``pop_aux_losses()`` and adds their sum to its loss.  Standalone users call
  ``layer.pop_aux_losses()`` themselves.
* Bad inputs raise ``ValueError``/``TypeError`` naming the argument before any kernel runs; the
  checks live here in ``forward``/``step`` so subclasses implement only ``_forward``:

  - ``x`` needs at least one sequence and one token: a batch of zero rows (B = 0) is refused with a
    ``ValueError`` rather than returning empty outputs (several layers' FFT and reshape paths have no
    meaning for it, and an empty decode batch is better dropped by the caller).
  - ``x`` must have the dtype of the layer's weights (a ``TypeError`` names both), unless
    ``torch.autocast`` is active for its device: then the layer computes in the autocast dtype.
  - A state must have the structure ``init_state`` gives: the same (named) tuple types, tensors of
    the same rank, trailing sizes and kind (integer / floating); a dimension that is empty in a
    fresh state (a growing KV cache) may have any size.  A state of another mixer or another layer
    size is refused with a ``ValueError`` naming the offending field, e.g. ``state.memory.conv_q``.
  - ``step(x_t, None)`` is ``step(x_t, init_state(B))``.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..kernels.utils import check_cu_seqlens
from .state import cat_states, detach_state, index_state, state_batch_size, state_leaves, tree_map

__all__ = ["Mixer", "check_cu_seqlens", "check_field_types", "state_spec", "check_state_like"]


def state_spec(tree: Any) -> Any:
    """The structure of a state pytree without its batch size: what ``check_state_like`` compares against.

    A tensor becomes ``(rank, sizes after the batch dim, kind)`` with kind ``"float"``, ``"int"`` or ``"bool"``;
    (named) tuples and lists keep their type and children; ``None`` stays ``None``.
    """
    if tree is None:
        return None
    if isinstance(tree, Tensor):
        kind = "bool" if tree.dtype == torch.bool else "float" if tree.is_floating_point() else "int"
        return ("tensor", tree.dim(), tuple(tree.shape[1:]), kind)
    if isinstance(tree, (tuple, list)):
        return (type(tree), tuple(state_spec(t) for t in tree))
    if isinstance(tree, dict):
        return (dict, {k: state_spec(v) for k, v in tree.items()})
    return ("other", type(tree))


def _describe(spec: Any) -> str:
    if spec is None:
        return "None"
    if spec[0] == "tensor":
        _, rank, sizes, kind = spec
        dims = ", ".join(["B", *("*" if n == 0 else str(n) for n in sizes)])
        return f"a {kind} tensor [{dims}]" if rank else f"a {kind} scalar tensor"
    name = (spec[1] if spec[0] == "other" else spec[0]).__name__
    return f"{'an' if name[0] in 'AEIOU' else 'a'} {name}"


def check_state_like(state: Any, spec: Any, owner: str, name: str = "state") -> None:
    """Raise a ``ValueError`` naming the first field of ``state`` that does not fit ``spec`` (see ``state_spec``).

    Sizes that are 0 in ``spec`` (a fresh, empty cache) may take any value; every other size, each tensor's rank
    and kind (integer / floating / bool), the (named) tuple types and the number of fields must match.
    """
    if spec is None:
        if state is not None:
            raise ValueError(f"{name} must be None for this {owner} (as init_state gives), got {type(state).__name__}")
        return
    tag = spec[0]
    if tag == "tensor":
        _, rank, sizes, kind = spec
        if not isinstance(state, Tensor):
            raise ValueError(f"{name} must be {_describe(spec)} for this {owner} (as init_state gives), "
                             f"got {type(state).__name__}; is the state from another mixer?")
        got = state_spec(state)
        fits = got[1] == rank and got[3] == kind and all(e in (0, g) for e, g in zip(sizes, got[2]))
        if not fits:
            raise ValueError(f"{name} must be {_describe(spec)} for this {owner} (as init_state gives), got a "
                             f"{got[3]} tensor {tuple(state.shape)} {state.dtype}; is the state from another mixer "
                             "or a layer of another size?")
        return
    if tag == "other":
        if not isinstance(state, spec[1]):
            raise ValueError(f"{name} must be {_describe(spec)} for this {owner}, got {type(state).__name__}")
        return
    if type(state) is not tag:
        raise ValueError(f"{name} must be {_describe(spec)} for this {owner} (as init_state and forward return), "
                         f"got {type(state).__name__}; is the state from another mixer?")
    children = spec[1]
    if tag is dict:
        if set(state) != set(children):
            raise ValueError(f"{name} must have the keys {sorted(children)} for this {owner}, got {sorted(state)}")
        for k, v in children.items():
            check_state_like(state[k], v, owner, f"{name}[{k!r}]")
        return
    if len(state) != len(children):
        raise ValueError(f"{name} must hold {len(children)} entries for this {owner} (as init_state gives), "
                         f"got {len(state)}; is the state from another mixer or configuration?")
    fields = getattr(tag, "_fields", None)
    for i, (t, c) in enumerate(zip(state, children)):
        check_state_like(t, c, owner, f"{name}.{fields[i]}" if fields else f"{name}[{i}]")


# Device types torch.is_autocast_enabled accepts (it raises for others, e.g. "meta").
_AUTOCAST_DEVICES = frozenset({"cpu", "cuda", "xpu", "hpu", "mps", "xla", "ipu", "mtia"})
_SIMPLE_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def check_field_types(owner: str, config_class: type, values: dict[str, Any]) -> None:
    """Raise a ``TypeError`` naming the field when a value for an ``int``/``float``/``bool``/``str`` field (also
    ``X | None``) of the dataclass ``config_class`` has another type, before ``__post_init__`` compares it.

    ``True``/``False`` are refused for numbers.  Fields of other types are left to the config's own checks.
    """
    hints = {f.name: f.type for f in dataclasses.fields(config_class)} if dataclasses.is_dataclass(config_class) else {}
    for name, value in values.items():
        hint = hints.get(name)
        if not isinstance(hint, str):
            continue
        parts = [t.strip() for t in hint.split("|")]
        optional = "None" in parts
        kinds = [t for t in parts if t != "None"]
        if len(kinds) != 1 or kinds[0] not in _SIMPLE_TYPES or (value is None and optional):
            continue
        ok = isinstance(value, _SIMPLE_TYPES[kinds[0]]) and (kinds[0] == "bool" or not isinstance(value, bool))
        if not ok:
            raise TypeError(f"{owner}: {name} must be {'an' if kinds[0] == 'int' else 'a'} {kinds[0]}"
                            f"{' or None' if optional else ''}, got {value!r} ({type(value).__name__})")


def renamed_options(owner: str, config_class: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with the old names of renamed fields replaced by the new ones, a ``DeprecationWarning`` each.

    A config class lists its renames in ``_renamed_fields`` (old -> new); they are accepted for one release.
    """
    renamed = getattr(config_class, "_renamed_fields", None)
    if not renamed or not any(k in renamed for k in values):
        return values
    out = {}
    for key, value in values.items():
        new = renamed.get(key)
        if new is None:
            out[key] = value
            continue
        if new in values:
            raise TypeError(f"{owner}: {key!r} is the old name of {new!r}; pass only {new!r}")
        warnings.warn(f"{owner}: the option {key!r} is now {new!r}; the old name will be removed in the next release",
                      DeprecationWarning, stacklevel=4)
        out[new] = value
    return out


def config_from_args(owner: str, config_class: type, config: Any, kwargs: dict[str, Any]) -> Any:
    """The config a module was built with: ``config`` itself, or ``config_class(**kwargs)``, never both.

    Raises:
        TypeError: both were given, ``config`` is not a ``config_class``, or a keyword has the wrong type.
    """
    if config is None:
        kwargs = renamed_options(owner, config_class, kwargs)
        check_field_types(owner, config_class, kwargs)
        return config_class(**kwargs)
    if kwargs:
        raise TypeError(f"{owner}: pass either a config or keyword arguments, not both")
    if not isinstance(config, config_class):
        raise TypeError(f"{owner} expects a {config_class.__name__}, got {type(config).__name__}")
    return config


def check_batch_size(batch_size: Any, name: str = "batch_size") -> None:
    """``batch_size`` must be an int >= 1 (skipped under torch.compile, where it may be symbolic)."""
    if torch.compiler.is_compiling():
        return
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{name} must be an int >= 1, got {batch_size!r}")


def _checked_init_state(fn: Any) -> Any:
    @functools.wraps(fn)
    def init_state(self: Mixer, batch_size: int, *args: Any, **kwargs: Any) -> Any:
        check_batch_size(batch_size)
        return fn(self, batch_size, *args, **kwargs)

    init_state.__memzoo_checked__ = True
    return init_state


def _checked_reset_state(fn: Any) -> Any:
    @functools.wraps(fn)
    def reset_state(self: Mixer, state: Any, mask: Any) -> Any:
        if state is None:
            raise ValueError(f"state must be a state of this {type(self).__name__} (from forward or init_state) "
                             "to reset rows of, got None")
        batch = state_batch_size(state)
        self.check_state(state, batch)
        if not isinstance(mask, Tensor) or mask.dim() != 1 or mask.dtype != torch.bool or mask.shape[0] != batch:
            got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a bool tensor [B={batch}], got {got}")
        return fn(self, state, mask)

    return reset_state


class Mixer(nn.Module):
    """Base class of every memzoo token mixer.  Subclasses implement ``_forward``,
    ``init_state`` and ``state_size``; they may override ``_step`` with a faster exact path and
    ``reset_state`` when their state shapes vary (e.g. a growing KV cache).

    Class attributes:
        config_class: the frozen dataclass holding the layer's hyper-parameters.
    """

    config_class: ClassVar[type]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # The argument checks of init_state and reset_state live here, so a layer implements only the work.
        super().__init_subclass__(**kwargs)
        if "init_state" in cls.__dict__:
            cls.init_state = _checked_init_state(cls.__dict__["init_state"])
        if "reset_state" in cls.__dict__:
            cls.reset_state = _checked_reset_state(cls.__dict__["reset_state"])
    # Sequence lengths / split points must be multiples of this for exact results (1: any split is
    # exact, e.g. because partial chunks are carried in the state).  Trainers check seq_len against it.
    split_multiple: ClassVar[int] = 1
    # True for layers without a packed-sequence path of their own: ``forward`` with ``cu_seqlens`` then runs
    # each packed sequence through ``_forward`` on its own (``forward_each_sequence``), so ``_forward`` only
    # ever sees ``cu_seqlens=None``.
    packs_by_loop: ClassVar[bool] = False

    def __init__(self, config: Any = None, /, **kwargs: Any) -> None:
        super().__init__()
        self.config = config = config_from_args(type(self).__name__, self.config_class, config, kwargs)
        self.d_model: int = config.d_model
        self._aux_losses: dict[str, Tensor] = {}

    def forward(self, x: Tensor, state: Any = None, *, cu_seqlens: Tensor | None = None) -> tuple[Tensor, Any]:
        """Mix a sequence.

        Args:
            x: ``[B, T, D]`` floating-point input.
            state: ``None`` (fresh sequences) or the state returned by a previous call.
            cu_seqlens: optional ``[N+1]`` offsets of N packed sequences (requires B=1).

        Returns:
            ``(y, state)``: ``y`` is ``[B, T, D]`` in the dtype of ``x``; ``state`` has batch
            ``B`` (or ``N`` with ``cu_seqlens``).
        """
        self._check_x(x, "x", rank=3)
        batch = x.shape[0]
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[1])
            batch = cu_seqlens.numel() - 1
        self.check_state(state, batch, device=x.device)
        if cu_seqlens is not None and self.packs_by_loop:
            return self.forward_each_sequence(x, state, cu_seqlens)
        return self._forward(x, state, cu_seqlens=cu_seqlens)

    def forward_each_sequence(self, x: Tensor, state: Any, cu_seqlens: Tensor) -> tuple[Tensor, Any]:
        """Packed sequences one at a time: sequence i runs through ``_forward`` as a batch of one from row i
        of ``state`` (fresh when ``state`` is None); an empty sequence keeps its row.

        Exact by the contract (a packed sequence is an independent sequence), at the cost of one host sync to
        read the offsets and one call per sequence.
        """
        bounds = cu_seqlens.tolist()
        ys, rows = [], []
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            row = None if state is None else index_state(state, torch.tensor([i], device=x.device))
            if b > a:
                y, row = self._forward(x[:, a:b], row, cu_seqlens=None)
                ys.append(y)
            elif row is None:
                row = self.init_state(1, device=x.device, dtype=x.dtype)
            rows.append(row)
        return torch.cat(ys, 1), cat_states(rows)

    def step(self, x_t: Tensor, state: Any) -> tuple[Tensor, Any]:
        """Decode one token: ``x_t`` ``[B, D]`` -> ``(y_t [B, D], state)``; exact, equal to ``forward``.

        ``state=None`` starts fresh sequences, exactly like ``init_state(B)``.
        """
        self._check_x(x_t, "x_t", rank=2)
        self.check_state(state, x_t.shape[0], device=x_t.device)
        if state is None:
            state = self.init_state(x_t.shape[0], device=x_t.device, dtype=x_t.dtype)
        return self._step(x_t, state)

    def _forward(self, x: Tensor, state: Any, *, cu_seqlens: Tensor | None) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def _step(self, x_t: Tensor, state: Any) -> tuple[Tensor, Any]:
        y, state = self._forward(x_t.unsqueeze(1), state, cu_seqlens=None)
        return y.squeeze(1), state

    def init_state(self, batch_size: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> Any:
        """The state of ``batch_size`` fresh sequences; ``forward(x, None)`` behaves exactly like it."""
        raise NotImplementedError

    def state_size(self, seq_len: int | None = None) -> int:
        """Floats of state carried per sequence after ``seq_len`` tokens (the recall-vs-memory axis).

        Recurrent layers ignore ``seq_len``; layers whose memory grows with the context (attention)
        need it.
        """
        raise NotImplementedError

    def reset_state(self, state: Any, mask: Tensor) -> Any:
        """Return ``state`` with the rows where ``mask`` ``[B]`` (bool) is true replaced by fresh ones.

        The default works for fixed-shape states; layers whose state shape changes override it.
        """
        batch = state_batch_size(state)
        if mask.dim() != 1 or mask.dtype != torch.bool or mask.shape[0] != batch:
            raise ValueError(f"mask must be a bool tensor [B={batch}], got {tuple(mask.shape)} {mask.dtype}")
        leaves = state_leaves(state)
        dtype = next((t.dtype for t in leaves if t.is_floating_point()), None)
        fresh = state_leaves(self.init_state(batch, device=leaves[0].device, dtype=dtype))
        if [t.shape for t in fresh] != [t.shape for t in leaves]:
            raise NotImplementedError(f"{type(self).__name__} must override reset_state: its state shape varies")
        fresh_iter = iter(fresh)

        def reset(t: Tensor) -> Tensor:
            f = next(fresh_iter).to(t.dtype)
            return torch.where(mask.view(-1, *([1] * (t.dim() - 1))), f, t)

        return tree_map(reset, state)

    detach_state = staticmethod(detach_state)

    def extra_flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs (forward + backward) per token beyond the ``6 x parameters`` of its matmuls,
        at context length ``seq_len``: attention scores, recurrent-state updates.  Used for MFU."""
        return 0

    def num_activated_parameters(self) -> int:
        """Parameters used per token; sparse layers (routed memories) override this."""
        return sum(p.numel() for p in self.parameters())

    def record_aux_loss(self, name: str, value: Tensor) -> None:
        """Store a weighted scalar auxiliary loss from inside ``forward`` (replaces one of the same name)."""
        self._aux_losses[name] = value

    def pop_aux_losses(self) -> dict[str, Tensor]:
        """Return and clear the auxiliary losses recorded since the last pop."""
        out, self._aux_losses = self._aux_losses, {}
        return out

    def _check_x(self, x: Any, name: str, rank: int) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        shape = "[B, T, D]" if rank == 3 else "[B, D]"
        if x.dim() != rank:
            raise ValueError(f"{name} must have shape {shape} with D={self.d_model}, got {tuple(x.shape)}")
        if x.shape[-1] != self.d_model:
            raise ValueError(f"{name} must have last dimension d_model={self.d_model}, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} must hold at least one sequence (B >= 1), got {tuple(x.shape)}")
        if rank == 3 and x.shape[1] == 0:
            raise ValueError(f"{name} must hold at least one token, got {tuple(x.shape)}")
        self._check_dtype(x, name)

    def _check_dtype(self, x: Tensor, name: str) -> None:
        first = next(self.parameters(), None)
        if first is not None and first.device != x.device:
            raise ValueError(f"{name} is on {x.device}, but {type(self).__name__}'s weights are on {first.device}")
        # Under autocast the layer's matmuls run in the autocast dtype whatever the input's dtype.
        if x.device.type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(x.device.type):
            return
        if first is None or first.dtype == x.dtype:
            return
        dtypes = {p.dtype for p in self.parameters() if p.is_floating_point()}
        if x.dtype not in dtypes:
            expected = " or ".join(sorted(str(d) for d in dtypes))
            raise TypeError(
                f"{name} must have the dtype of {type(self).__name__}'s weights ({expected}), got {x.dtype}: cast "
                f"the input ({name}.to(...)) or the layer (layer.to(...)), or run under torch.autocast"
            )

    def state_spec(self) -> Any:
        """The structure every state of this layer has (see ``state_spec``), from ``init_state(1)``, cached."""
        spec = self.__dict__.get("_state_spec_cache")
        if spec is None:
            with torch.no_grad():
                spec = state_spec(self.init_state(1))
            self.__dict__["_state_spec_cache"] = spec
        return spec

    def check_state(self, state: Any, batch_size: int, name: str = "state", device: torch.device | None = None
                    ) -> None:
        """Raise a ``ValueError`` naming ``name`` if ``state`` is not a state of this layer for ``batch_size`` rows
        (on ``device``, when given).

        ``None`` (fresh sequences) always passes.
        """
        if state is None:
            return
        if "_state_spec_cache" in self.__dict__ or not torch.compiler.is_compiling():
            check_state_like(state, self.state_spec(), type(self).__name__, name)
        if device is not None:
            for leaf in state_leaves(state):
                if leaf.device != device:
                    raise ValueError(f"{name} is on {leaf.device}, but the input is on {device}: move the state "
                                     "(memzoo.models.state.tree_map(lambda t: t.to(device), state))")
        try:
            batch = state_batch_size(state)
        except ValueError as e:
            raise ValueError(f"{name} is malformed: {e}") from None
        if batch is not None and batch != batch_size:
            raise ValueError(
                f"{name} has batch size {batch}, but the input has {batch_size} sequences "
                "(with cu_seqlens, one state row per packed sequence)"
            )


# The base class's own reset_state gets the same argument checks as the overrides (__init_subclass__ wraps those).
Mixer.reset_state = _checked_reset_state(Mixer.reset_state)
