"""``ModelConfig``: the frozen, JSON-round-trippable description of a memzoo language model."""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .contract import check_field_types
from .registry import mixer_config

__all__ = ["ModelConfig"]


def _check_ffn(kind: str, d_model: int, opts: dict[str, Any]) -> None:
    """Fail at config time on an unknown channel mixer or bad options (builds the DKVB config, not the module)."""
    from .block import FFN_KINDS

    if kind not in FFN_KINDS:
        raise ValueError(f"ffn must be one of {FFN_KINDS}, got {kind!r}")
    if kind == "swiglu" and opts:
        raise ValueError(f"ffn_opts apply to ffn='dkvb' only, got {sorted(opts)} for ffn='swiglu'")
    if kind == "dkvb":
        from .wrappers.dkvb import DKVBConfig, DKVBFeedForward

        fixed = {"d_in", "decoder", "d_out"}
        if fixed & set(opts):
            raise ValueError(f"ffn_opts may not set {sorted(fixed & set(opts))}: the FFN slot fixes d_in = d_out = "
                             "d_model and the linear decoder")
        known = {f.name for f in dataclasses.fields(DKVBConfig)} - fixed
        unknown = set(opts) - known
        if unknown:
            raise ValueError(f"unknown ffn_opts {sorted(unknown)} for ffn='dkvb'; known: {sorted(known)}")
        DKVBConfig(d_in=d_model, decoder="linear", d_out=d_model, **{**DKVBFeedForward.DEFAULTS, **opts})


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    # Mixer names cycled over the layers: ("gated_delta",) * 3 + ("attention",) makes a 3:1 hybrid.
    pattern: tuple[str, ...] = ("attention",)
    # Per-mixer keyword overrides, keyed by mixer name, e.g. {"attention": {"n_heads": 8}}.
    mixers: dict[str, dict[str, Any]] = field(default_factory=dict)
    # SwiGLU hidden width; None = 8/3 * d_model rounded up to a multiple of 64; 0 = no MLP.
    d_ff: int | None = None
    # The channel mixer of every block: "swiglu" (d_ff wide) or "dkvb" (discrete key-value bottleneck per token).
    ffn: str = "swiglu"
    # Keyword options of the channel mixer (DKVBConfig fields for "dkvb", e.g. {"n_keys": 1024}).
    ffn_opts: dict[str, Any] = field(default_factory=dict)
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    # Std of the normal init; residual output projections are scaled by 1/sqrt(2 n_layers).
    init_std: float = 0.02

    def __post_init__(self) -> None:
        check_field_types("ModelConfig", type(self), {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        if self.vocab_size <= 0 or self.d_model <= 0 or self.n_layers <= 0:
            raise ValueError(
                f"vocab_size, d_model and n_layers must be positive, got "
                f"{self.vocab_size}, {self.d_model}, {self.n_layers}"
            )
        if isinstance(self.pattern, str):
            object.__setattr__(self, "pattern", (self.pattern,))
        object.__setattr__(self, "pattern", tuple(self.pattern))
        if not self.pattern:
            raise ValueError("pattern must name at least one mixer")
        if not isinstance(self.mixers, dict):
            raise TypeError(f"mixers must be a dict of mixer name -> options, got {type(self.mixers).__name__}")
        object.__setattr__(self, "mixers", copy.deepcopy(self.mixers))
        unused = set(self.mixers) - set(self.pattern)
        if unused:
            raise ValueError(f"mixers has options for {sorted(unused)}, which the pattern {self.pattern} never uses")
        for name in set(self.pattern):
            mixer_config(name, self.d_model, self.mixers.get(name))
        if self.d_ff is not None and self.d_ff < 0:
            raise ValueError(f"d_ff must be None, 0 (no MLP) or positive, got {self.d_ff}")
        if not isinstance(self.ffn_opts, dict):
            raise TypeError(f"ffn_opts must be a dict of options, got {type(self.ffn_opts).__name__}")
        object.__setattr__(self, "ffn_opts", copy.deepcopy(self.ffn_opts))
        _check_ffn(self.ffn, self.d_model, self.ffn_opts)
        if self.norm_eps <= 0 or self.init_std <= 0:
            raise ValueError("norm_eps and init_std must be positive")

    @property
    def layer_types(self) -> tuple[str, ...]:
        """The mixer name of every layer: the pattern repeated up to ``n_layers``."""
        return tuple(self.pattern[i % len(self.pattern)] for i in range(self.n_layers))

    @property
    def ffn_hidden(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        return -(-(8 * self.d_model // 3) // 64) * 64

    def mixer_config(self, name: str) -> Any:
        """The resolved config dataclass of mixer ``name`` in this model."""
        return mixer_config(name, self.d_model, self.mixers.get(name))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pattern"] = list(self.pattern)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)
