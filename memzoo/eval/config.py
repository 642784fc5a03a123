"""Frozen configs of a benchmark run: which models, which data, how to train, which sweep.

Every config is a frozen dataclass with a JSON round trip (``to_dict`` / ``from_dict``) that
rejects unknown keys, so a misspelled field is an error instead of a silent default (zoology's
Fig. 2 config passes ``train_power_a``, which its pydantic model quietly drops).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from .._deprecation import renamed_attributes
from .tasks import TASKS

__all__ = ["BenchConfig", "DataSpec", "ModelSpec", "BenchTrainConfig", "from_fields", "log_lrs", "HMT_BENCH_DEFAULTS",
           "LONGMEM_BENCH_DEFAULTS"]


def from_fields(cls: type, d: dict[str, Any], where: str) -> Any:
    """``cls(**d)`` after checking that every key of ``d`` is a field of ``cls``."""
    if not isinstance(d, dict):
        raise TypeError(f"{where} must be a dict, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {where} keys {sorted(unknown)}; known: {sorted(known)}")
    return cls(**d)


def log_lrs(low: float, high: float, n: int) -> tuple[float, ...]:
    """``n`` log-spaced learning rates from ``low`` to ``high`` (numpy's ``logspace`` on the exponents)."""
    if n < 1 or not 0 < low <= high:
        raise ValueError(f"need n >= 1 and 0 < low <= high for an LR sweep, got n={n}, low={low}, high={high}")
    if n == 1:
        return (low,)
    a, b = math.log10(low), math.log10(high)
    return tuple(float(f"{10 ** (a + (b - a) * i / (n - 1)):.6g}") for i in range(n))


def _bench_defaults(name: str) -> dict[str, Any]:
    from memzoo.models.wrappers.base import WRAPPERS

    return dict(WRAPPERS[name].bench_defaults)


# Each wrapper's options sized for the synthetic tasks (``Wrapper.bench_defaults``), under their old names.
HMT_BENCH_DEFAULTS: dict[str, Any] = _bench_defaults("hmt")
LONGMEM_BENCH_DEFAULTS: dict[str, Any] = _bench_defaults("longmem")


@dataclass(frozen=True)
class ModelSpec:
    """A small LM around one mixer or a layer pattern: embedding, n_layers blocks, norm, tied head."""

    # Mixer names cycled over the layers, e.g. ("gated_delta", "attention").
    pattern: tuple[str, ...]
    # Per-mixer options (ModelConfig.mixers); options for mixers outside the pattern are dropped.
    mixers: dict[str, dict[str, Any]] = field(default_factory=dict)
    n_layers: int = 2
    # 0 = no MLP (the zoology sweeps); None = SwiGLU of the default width.
    d_ff: int | None = 0
    # Display name; defaults to the pattern joined by "+" (wrapped as "hmt(...)" / "longmem(...)").
    name: str = ""
    # A model-level wrapper around the LM: {"name": NAME, **options}, NAME one of memzoo.models.WRAPPERS
    # ("hmt", "longmem"); None = the plain LM.  LongMem's "backbone" (a memzoo export folder) is the frozen
    # backbone; without it the backbone is the freshly built, randomly initialised LM of this pattern (an
    # ablation, not the paper's setting).
    wrapper: dict[str, Any] | None = None
    # Deprecated (one release): hmt={...} / longmem={...} are wrapper={"name": "hmt", ...}.
    hmt: dict[str, Any] | None = None
    longmem: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        pattern = (self.pattern,) if isinstance(self.pattern, str) else tuple(self.pattern)
        if not pattern or not all(isinstance(p, str) and p for p in pattern):
            raise ValueError(f"pattern must be a non-empty sequence of mixer names, got {self.pattern!r}")
        object.__setattr__(self, "pattern", pattern)
        from memzoo.models.registry import MIXERS, unknown_name

        unknown = [p for p in pattern if p not in MIXERS]
        if unknown:
            raise ValueError(f"pattern: {unknown_name('mixer', unknown[0], MIXERS)}")
        mixers = {k: dict(v) for k, v in copy.deepcopy(self.mixers).items() if k in pattern}
        object.__setattr__(self, "mixers", mixers)
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")
        legacy = [k for k in ("hmt", "longmem") if getattr(self, k) is not None]
        if legacy:
            if len(legacy) > 1 or self.wrapper is not None:
                raise ValueError("a ModelSpec takes one wrapper: wrapper=, hmt= or longmem=")
            warnings.warn(f"ModelSpec({legacy[0]}=...) is deprecated; use wrapper={{'name': '{legacy[0]}', ...}}",
                          DeprecationWarning, stacklevel=3)
            object.__setattr__(self, "wrapper", {"name": legacy[0], **getattr(self, legacy[0])})
            object.__setattr__(self, legacy[0], None)
        if self.wrapper is not None:
            self.wrapper_config()
        if not self.name:
            name = "+".join(pattern)
            object.__setattr__(self, "name", f"{self.wrapper['name']}({name})" if self.wrapper else name)

    def wrapper_config(self) -> tuple[type, Any]:
        """(the wrapper class, its config) for ``wrapper`` (checks the options)."""
        from memzoo.models.wrappers.base import resolve_wrapper

        if not isinstance(self.wrapper, dict):
            raise TypeError(f"wrapper must be a dict with a 'name' and the wrapper's options, got "
                            f"{type(self.wrapper).__name__}")
        return resolve_wrapper(self.wrapper)

    @classmethod
    def parse(cls, text: str, mixers: dict[str, dict[str, Any]] | None = None, **kw: Any) -> ModelSpec:
        """``"attention"``, a pattern ``"gated_delta+gated_delta+attention"``, or either behind a wrapper's name
        (``"hmt:attention"``, ``"longmem:attention"``) to wrap it with that wrapper's ``bench_defaults`` (sized for
        the synthetic tasks; LongMem's backbone is then this pattern, frozen at random init)."""
        from memzoo.models.wrappers.base import WRAPPERS

        prefix, sep, rest = text.partition(":")
        if sep and prefix in WRAPPERS:
            text = rest
            kw.setdefault("wrapper", {"name": prefix, **WRAPPERS[prefix].bench_defaults})
        return cls(pattern=tuple(p.strip() for p in text.split("+")), mixers=mixers or {}, **kw)

    def build(self, vocab_size: int, d_model: int) -> Any:
        """The model: ``build_model(model_config(...))``, or the wrapper's ``build`` around it (the same build path
        as memzoo-train's; a wrapper with a backbone of its own may replace the width and depth)."""
        from memzoo.models import build_model

        model_config = self.model_config(vocab_size, d_model)
        if self.wrapper is None:
            return build_model(model_config)
        cls, config = self.wrapper_config()
        model_config = cls.backbone_config(model_config, config, required=True)
        model = cls.build(model_config, config, say=lambda *a, **k: None)
        if model_config.vocab_size < vocab_size:
            raise ValueError(f"{self.name}: the backbone has vocab_size {model_config.vocab_size} < the task's "
                             f"{vocab_size}")
        return model

    def model_config(self, vocab_size: int, d_model: int) -> Any:
        from memzoo.models import ModelConfig

        return ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=self.n_layers, pattern=self.pattern,
                           mixers=self.mixers, d_ff=self.d_ff)


@dataclass(frozen=True)
class BenchTrainConfig:
    epochs: int = 64
    batch_size: int = 64
    eval_batch_size: int = 256
    weight_decay: float = 0.1
    # Linear warmup (steps) in front of the cosine; zoology uses none, RegBench does.
    warmup_steps: int = 0
    # Stop once the test accuracy exceeds this (zoology: 0.99); None never stops early.
    early_stop: float | None = 0.99
    # Hard cap on optimizer steps across epochs (CI budgets); None = epochs only.
    max_steps: int | None = None
    grad_clip: float | None = None
    # "fp32", or "bf16" autocast (CUDA).
    precision: str = "fp32"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("weight_decay and warmup_steps must be >= 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be None or >= 1, got {self.max_steps}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")


@dataclass(frozen=True)
class DataSpec:
    """Train and test segments of one task (zoology's ``DataConfig``); segments never share a batch."""

    train: tuple[Any, ...]
    test: tuple[Any, ...]
    # Overrides BenchTrainConfig.batch_size for this data (zoology shrinks batches as sequences grow).
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be None or >= 1, got {self.batch_size}")
        object.__setattr__(self, "train", tuple(self.train))
        object.__setattr__(self, "test", tuple(self.test))
        if not self.train or not self.test:
            raise ValueError("DataSpec needs at least one train and one test segment")
        kinds = {type(c) for c in self.train + self.test}
        if len(kinds) != 1:
            raise ValueError(f"all segments of a DataSpec must share one task config class, got {kinds}")

    @property
    def vocab_size(self) -> int:
        sizes = {c.vocab_size for c in self.train + self.test}
        if len(sizes) != 1:
            raise ValueError(f"train and test segments must share vocab_size, got {sorted(sizes)}")
        return sizes.pop()


@dataclass(frozen=True)
class BenchConfig:
    task: str
    models: tuple[ModelSpec, ...]
    d_models: tuple[int, ...]
    data: tuple[DataSpec, ...]
    lrs: tuple[float, ...]
    seeds: tuple[int, ...] = (0,)
    train: BenchTrainConfig = field(default_factory=BenchTrainConfig)
    # Free-form label stored with the results (the preset name).
    name: str = ""

    def __post_init__(self) -> None:
        if self.task not in TASKS or TASKS[self.task].trainable is False:
            trainable = sorted(k for k, t in TASKS.items() if t.trainable)
            raise ValueError(f"task must be one of {trainable}, got {self.task!r}")
        for name in ("models", "d_models", "data", "lrs", "seeds"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        if any(d < 1 for d in self.d_models):
            raise ValueError(f"d_models must be positive, got {self.d_models}")
        if any(not lr > 0 for lr in self.lrs):
            raise ValueError(f"lrs must be positive, got {self.lrs}")
        cls = TASKS[self.task].config_class
        for spec in self.data:
            if not isinstance(spec.train[0], cls):
                raise TypeError(f"task {self.task!r} needs {cls.__name__} segments, got {type(spec.train[0]).__name__}")
            vocab = spec.vocab_size
            # Building every ModelConfig checks the mixer options at every width before any training.
            for model in self.models:
                for d in self.d_models:
                    model.model_config(vocab, d)

    def replace(self, **changes: Any) -> BenchConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "models": [dataclasses.asdict(m) for m in self.models],
            "d_models": list(self.d_models),
            "data": [{"train": [dataclasses.asdict(c) for c in s.train],
                      "test": [dataclasses.asdict(c) for c in s.test], "batch_size": s.batch_size}
                     for s in self.data],
            "lrs": list(self.lrs),
            "seeds": list(self.seeds),
            "train": dataclasses.asdict(self.train),
            "name": self.name,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown BenchConfig keys {sorted(unknown)}; known: {sorted(known)}")
        task = d.get("task")
        if task not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
        task_cls = TASKS[task].config_class

        def segs(items: list[dict[str, Any]], where: str) -> tuple[Any, ...]:
            return tuple(from_fields(task_cls, dict(c), where) for c in items)

        def data_spec(s: dict[str, Any]) -> DataSpec:
            extra = set(s) - {"train", "test", "batch_size"}
            if extra:
                raise ValueError(f"unknown data keys {sorted(extra)}; known: ['batch_size', 'test', 'train']")
            return DataSpec(segs(s["train"], f"{task} train segment"), segs(s["test"], f"{task} test segment"),
                            s.get("batch_size"))

        d["models"] = tuple(from_fields(ModelSpec, m, "model") for m in d.get("models", ()))
        d["data"] = tuple(data_spec(s) for s in d.get("data", ()))
        if "train" in d:
            d["train"] = from_fields(BenchTrainConfig, d["train"], "train")
        return cls(**d)


# Old names, accepted for one release with a DeprecationWarning.
__getattr__ = renamed_attributes(__name__, globals(), {"TrainConfig": "BenchTrainConfig"})
