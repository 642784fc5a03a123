"""The wrapper protocol: a model-level memory around a whole backbone ``LanguageModel``, and its registry.

A wrapper (HMT, LongMem) is an ``nn.Module`` with the language-model interface (``forward(input_ids,
state=None, labels=None) -> LMOutput``, ``generate``, ``init_state`` / ``reset_state`` / ``index_state``,
``split_multiple``, ``num_parameters``, ``flops_per_token``, ``state_size``) plus the hooks below,
which are all that the trainer (``memzoo-train``) and the benchmarks (``memzoo-bench``) use.
A new wrapper subclasses ``Wrapper``, sets ``name`` and ``config_class`` and adds one line to
``WRAPPERS``; nothing in ``train/`` or ``eval/`` names a wrapper.

Build path (train and eval alike)::

    cls, config = resolve_wrapper({"name": "hmt", "segment_len": 64})
    model_config = cls.backbone_config(model_config, config)      # LongMem: the backbone export's config
    model = cls.build(model_config, config, resume=False, say=print)

Export: ``export_tensors`` (what goes into ``model.safetensors``) and ``export_meta`` (``wrapper.json``);
``memzoo.from_pretrained`` reads ``wrapper.json`` and calls ``load`` of the class it names.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from ..state import index_state

__all__ = ["Wrapper", "WRAPPERS", "WRAPPER_FILE", "resolve_wrapper", "register_wrapper",
           "export_wrapper", "read_wrapper_meta", "load_wrapper"]

# Written next to a wrapper's export: {"format": "memzoo-wrapper", "name": ..., "config": {...}, ...}.
WRAPPER_FILE = "wrapper.json"
_FORMAT = "memzoo-wrapper"


class Wrapper(nn.Module):
    """Base class of the model-level wrappers; see the module docstring for the protocol."""

    # Registry key ("hmt", "longmem") and the frozen dataclass of the wrapper's options.
    name: ClassVar[str]
    config_class: ClassVar[type]
    # Options sized for memzoo-bench's synthetic tasks (32-512 tokens), used by ``memzoo-bench --model NAME:pattern``.
    bench_defaults: ClassVar[dict[str, Any]] = {}

    backbone: nn.Module
    config: Any

    # ---- building -------------------------------------------------------------------------------------------
    @classmethod
    def backbone_config(cls, model_config: Any, config: Any, *, required: bool = False) -> Any:
        """The backbone's ``ModelConfig`` given the run's ``model`` section (default: that section unchanged).

        ``required``: the backbone must be found now (the trainer); otherwise a backbone that does not exist
        yet leaves ``model_config`` as it is (config resolution before stage 1 has run).
        """
        return model_config

    @classmethod
    def build(cls, model_config: Any, config: Any, *, resume: bool = False, say: Any = print) -> Wrapper:
        """The wrapper around a freshly built backbone (default: ``cls(build_model(model_config), config)``).

        ``resume``: the trainer restores the weights from a checkpoint next, so initial loads can be skipped.
        ``say``: where to report what was built.
        """
        return cls(_build_model(model_config), config)

    @classmethod
    def check_data(cls, config: Any, *, pack: str, seq_len: int, segment_len: int | None, tokenizer: str) -> None:
        """Raise ``ValueError`` naming the field when the trainer's data settings cannot feed this wrapper."""

    @classmethod
    def check_paths(cls, config: Any, *, resuming: bool) -> None:
        """Raise ``ValueError`` naming the field when a file the build will read is missing (checked before the
        trainer prints or creates anything); ``resuming``: weights come from a checkpoint instead."""

    def describe(self) -> str:
        """One line for the trainer's log: what the wrapper adds."""
        return f"{type(self).__name__} adds {self.added_parameters():,} parameters"

    # ---- parameters and state ------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """What an optimizer should see (default: every parameter that requires a gradient)."""
        return [p for p in self.parameters() if p.requires_grad]

    def added_parameters(self) -> int:
        """Parameters the wrapper adds to its backbone."""
        return sum(p.numel() for name, p in self.named_parameters() if not name.startswith("backbone."))

    def index_state(self, state: Any, index: Tensor) -> Any:
        """Select / reorder batch rows of a state (beam search, dropping finished rows)."""
        return index_state(state, index)

    # The defaults below delegate to the backbone: right for a wrapper that carries the backbone's state as its
    # own and adds no compute of its own worth counting; HMT and LongMem override them.
    def init_state(self, batch_size: int, *, device: Any = None, dtype: Any = None) -> Any:
        return self.backbone.init_state(batch_size, device=device, dtype=dtype)

    def reset_state(self, state: Any, mask: Tensor) -> Any:
        """Fresh state for the rows where ``mask`` ``[B]`` is true (document starts)."""
        return tuple(m.reset_state(s, mask) for m, s in zip(self.backbone.mixers, state))

    def state_size(self, seq_len: int | None = None) -> int:
        return self.backbone.state_size(seq_len)

    @property
    def split_multiple(self) -> int:
        return self.backbone.split_multiple

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.backbone.embed.weight.numel() if exclude_embeddings else n

    def flops_per_token(self, seq_len: int) -> int:
        return self.backbone.flops_per_token(seq_len) + 6 * self.added_parameters()

    # ---- export ---------------------------------------------------------------------------------------------
    def export_tensors(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The tensors of ``model.safetensors`` from the (gathered) ``state_dict`` (default: all of it)."""
        return state

    def export_meta(self, state: dict[str, Tensor], directory: Path) -> dict[str, Any]:
        """Extra entries of ``wrapper.json`` besides the name and config (LongMem: the backbone's path and hash);
        ``directory`` is where the export will live."""
        return {}

    def export_config(self) -> Any:
        """The ``ModelConfig`` written as ``config.json`` (the backbone's)."""
        return self.backbone.config

    @classmethod
    def load(cls, directory: Path, meta: dict[str, Any], tensors: dict[str, Tensor], model_config: Any) -> Wrapper:
        """Rebuild from an export: ``meta`` is ``wrapper.json``, ``tensors`` ``model.safetensors``, ``model_config``
        ``config.json`` (default: a fresh backbone of that config, then every weight, strictly)."""
        model = cls(_build_model(model_config), cls.config_class(**meta["config"]))
        load_all_weights(model, tensors, model_config.tie_embeddings, f"{cls.__name__} export {str(directory)!r}")
        return model


def load_all_weights(model: nn.Module, tensors: dict[str, Tensor], tie_embeddings: bool, what: str) -> None:
    """Every weight of ``model`` from ``tensors``, strictly, except a tied ``lm_head.weight`` (stored once)."""
    tied = {k for k in model.state_dict() if k.endswith("lm_head.weight")} if tie_embeddings else set()
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"{what}: weights do not match: missing {missing}, unexpected {unexpected}")


def _build_model(config: Any) -> nn.Module:
    from .. import build_model

    return build_model(config)


WRAPPERS: dict[str, type[Wrapper]] = {}


def register_wrapper(cls: type[Wrapper]) -> type[Wrapper]:
    """Class decorator: add ``cls`` to ``WRAPPERS`` under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Wrapper)):
        raise TypeError(f"register_wrapper takes a Wrapper subclass, got {cls!r}")
    if cls.name in WRAPPERS and WRAPPERS[cls.name] is not cls:
        raise ValueError(f"a wrapper named {cls.name!r} is already registered ({WRAPPERS[cls.name].__name__})")
    WRAPPERS[cls.name] = cls
    return cls


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=2)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


def resolve_wrapper(spec: dict[str, Any], where: str = "wrapper") -> tuple[type[Wrapper], Any]:
    """``{"name": NAME, **options}`` -> (the wrapper class, its config).  Unknown names and options are
    ``ValueError``s that name them, suggest the nearest and list the known ones."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError(f"{where} must be a mapping with a 'name' (one of {sorted(WRAPPERS)}) and the wrapper's "
                         f"options, got {spec!r}")
    name = spec["name"]
    if name not in WRAPPERS:
        raise ValueError(f"{where}.name: unknown wrapper {name!r}{_suggest(name, list(WRAPPERS))}; registered: "
                         f"{', '.join(sorted(WRAPPERS))}")
    cls = WRAPPERS[name]
    known = [f.name for f in dataclasses.fields(cls.config_class)]
    options = {k: v for k, v in spec.items() if k != "name"}
    for key in options:
        if key not in known:
            raise ValueError(f"{where}.{key}: unknown {name} option{_suggest(key, known)}; known: {', '.join(known)}")
    try:
        return cls, cls.config_class(**options)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where} ({name}): {e}") from None


def export_wrapper(model: Wrapper, state: dict[str, Tensor], staging: Path, directory: Path) -> dict[str, Tensor]:
    """Write ``wrapper.json`` into the ``staging`` folder of the export ``directory``; returns the tensors to save."""
    meta = {"format": _FORMAT, "version": 1, "name": model.name, "config": dataclasses.asdict(model.config),
            **model.export_meta(state, directory)}
    (staging / WRAPPER_FILE).write_text(json.dumps(meta, indent=2))
    return model.export_tensors(state)


def read_wrapper_meta(directory: Path) -> dict[str, Any] | None:
    """``wrapper.json`` of an export folder, or None when the folder holds a plain language model."""
    path = directory / WRAPPER_FILE
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    if meta.get("format") != _FORMAT or meta.get("name") not in WRAPPERS:
        raise ValueError(f"{str(path)!r}: not a memzoo wrapper export (format {meta.get('format')!r}, name "
                         f"{meta.get('name')!r}; registered wrappers: {sorted(WRAPPERS)})")
    return meta


def load_wrapper(directory: Path, meta: dict[str, Any], tensors: dict[str, Tensor], model_config: Any) -> Wrapper:
    return WRAPPERS[meta["name"]].load(directory, meta, tensors, model_config)
