"""Training configuration: typed frozen dataclasses, presets, and the file / command-line merge.

    cfg = resolve_config(preset="tiny", file="run.yaml", overrides={"optim.lr": "1e-3"})

Precedence is command line > file > preset > dataclass defaults.  Every layer is a nested dict
merged key by key; unknown keys are errors that name the key and list the known ones.  The
``model`` section is a ``memzoo.ModelConfig``; a ``model.preset`` key in a file or on the command
line swaps in a model preset (``attention-350m``) before the other model keys of that layer apply.
Training presets are plain functions generated from ``memzoo.models.MIXERS`` at lookup time, so
a newly registered mixer gets ``tiny-<mixer>`` and ``gpu-125m-<mixer>`` presets without edits here.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models.config import ModelConfig
from ..models.presets import PRESETS as MODEL_PRESETS
from ..models.presets import get_preset as get_model_preset
from ..models.registry import unknown_name
from ..models.wrappers.base import resolve_wrapper
from .data import DECODE_ERRORS, source_files

__all__ = [
    "ConfigError", "DataConfig", "OptimConfig", "SchedConfig", "LoopConfig", "CheckpointConfig", "LogConfig",
    "TrainConfig", "train_presets", "resolve_config", "validate_config", "split_multiple_of", "apply_wrapper_backbone",
    "check_paths",
]

PACK_MODES = ("block", "varlen", "stream")
DECAYS = ("cosine", "wsd", "linear", "constant")
PRECISIONS = ("no", "bf16", "fp16")
TRACKERS = ("tensorboard", "wandb", "trackio")


class ConfigError(ValueError):
    """A bad training configuration, raised before any training work starts."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    # "pydoc" | "stdlib-code" | "file:GLOB" (txt/jsonl/parquet) | "hf:NAME[:SPLIT]" | "prepared:DIR" (memzoo-prepare)
    source: str = "pydoc"
    # "byte" | "bpe:PATH/tokenizer.json" | "train:VOCAB" (ByteLevel BPE trained on the source, saved to out_dir)
    tokenizer: str = "byte"
    # Tokens per row; must be a multiple of the model's split_multiple.
    seq_len: int = 256
    # Recurrent segment mode: rows are fed in segments of this length, carrying the state (None: one pass).
    segment_len: int | None = None
    # Truncated backprop: cut the gradient through the carried state every k segments.
    detach_every: int = 1
    # "block" (concatenate + cut) | "varlen" (one packed row per micro-batch, cu_seqlens) | "stream" (carried state)
    pack: str = "block"
    val_fraction: float = 0.05
    # Column holding the text in jsonl / parquet / hub datasets.
    text_field: str = "text"
    # Text that is not UTF-8: "replace" (bad bytes -> U+FFFD, one warning with their count) | "strict" (an error
    # naming the file and byte offset).
    decode_errors: str = "replace"


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    eps: float = 1e-8
    # Fused AdamW kernel; None = on when training on CUDA.
    fused: bool | None = None


@dataclass(frozen=True, kw_only=True)
class SchedConfig:
    warmup_steps: int = 100
    # "cosine" | "wsd" (warmup-stable-decay) | "linear" | "constant", from lr down to lr * min_lr_ratio.
    decay: str = "cosine"
    min_lr_ratio: float = 0.1
    # WSD only: the final fraction of the steps that decays linearly.
    decay_fraction: float = 0.2


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    max_steps: int | None = 1000
    # If set, overrides max_steps: ceil(max_tokens / tokens per optimizer step).
    max_tokens: int | None = None
    # Rows per process per micro-step (varlen packs them into one row of micro_bs * seq_len tokens).
    micro_bs: int = 16
    grad_accum: int = 1
    # Gradient clipping norm; 0 turns clipping off (the norm is still measured and logged).
    max_norm: float = 1.0
    precision: str = "no"
    compile: bool = False
    seed: int = 0
    # Skip (and count) optimizer steps whose gradient norm is inf/nan.
    skip_nan_inf: bool = True


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    # Save every N optimizer steps (0: only at the end).
    every: int = 500
    # Keep the newest k checkpoints.
    keep: int = 3
    # "none" | "auto" (newest complete checkpoint in out_dir, or a fresh start) | a checkpoint directory.
    resume: str = "none"
    # Write final/model.safetensors + config.json (memzoo.from_pretrained) at the end.
    export_safetensors: bool = True


@dataclass(frozen=True, kw_only=True)
class LogConfig:
    # Comma-separated extra trackers: none | tensorboard | wandb | trackio | all (metrics.jsonl is always on).
    report_to: str = "none"
    every: int = 10
    eval_every: int = 200
    eval_iters: int = 20
    run_name: str | None = None
    # tqdm bar on the main process (plain log lines otherwise).
    progress: bool = True


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # A model-level wrapper around the model: {"name": NAME, **its options}, NAME one of memzoo.models.WRAPPERS
    # ("hmt", "longmem"); --wrapper.name hmt --wrapper.segment_len 64 on the command line.  None: the bare model.
    wrapper: dict[str, Any] | None = None
    out_dir: str = "runs/default"
    # The training preset this config started from (recorded, not interpreted).
    preset: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in d.items():
            if isinstance(value, ModelConfig):
                d[name] = value.to_dict()
            elif dataclasses.is_dataclass(value):
                d[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(value).items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return _build(cls, _legacy_wrappers(d, "config"), "")

    def resolved_wrapper(self) -> tuple[type, Any] | None:
        """(the wrapper class, its config) for ``wrapper``, or None for the bare model."""
        if self.wrapper is None:
            return None
        try:
            return resolve_wrapper(self.wrapper)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step per process."""
        return self.train.micro_bs * self.data.seq_len * self.train.grad_accum


_SECTIONS = {f.name: f for f in dataclasses.fields(TrainConfig)}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}; known keys here: {', '.join(sorted(known))}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the type ``hint`` of field ``key``; strings from the command line are converted."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key} must not be None")
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("()[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            raise ConfigError(f"{key} must have {len(items)} items, got {value!r}")
        return tuple(_coerce(v, t, key) for v, t in zip(value, items))
    if origin is dict or hint is dict:
        if isinstance(value, str):
            value = _parse_literal(value, key)
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, str):
            try:
                value = int(value.replace("_", ""))
            except ValueError:
                # "1e6" is a common way to write step and token counts.
                try:
                    value = float(value)
                except ValueError:
                    raise ConfigError(f"{key} must be an integer, got {value!r}") from None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value


def _parse_literal(text: str, key: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse {text!r}: {e}") from None


def _build(cls: type, d: Any, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from the nested dict ``d``, checking keys and types."""
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {d!r}")
    hints = _hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if k not in known:
            raise _unknown(key, known)
        hint = hints[k]
        if hint is ModelConfig:
            kwargs[k] = _build_model(v, key)
        elif k == "wrapper" and cls is TrainConfig:
            kwargs[k] = _build_wrapper(v, key)
        elif dataclasses.is_dataclass(hint):
            kwargs[k] = _build(hint, v, key + ".")
        else:
            kwargs[k] = _coerce(v, hint, key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def _build_model(d: Any, key: str) -> ModelConfig:
    if isinstance(d, ModelConfig):
        return d
    if not isinstance(d, dict):
        raise ConfigError(f"{key} must be a mapping of ModelConfig fields, got {d!r}")
    hints = _hints(ModelConfig)
    known = list(hints)
    fields = {}
    for k, v in d.items():
        if k not in hints:
            raise _unknown(f"{key}.{k}", known)
        fields[k] = _coerce(v, hints[k], f"{key}.{k}")
    try:
        return ModelConfig.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from None


def _build_wrapper(d: Any, key: str) -> dict[str, Any] | None:
    """``{"name": ..., **options}`` with each option converted to its field's type (strings from the command line)."""
    from ..models.wrappers.base import WRAPPERS

    if d is None or (isinstance(d, str) and d.lower() in ("none", "null")):
        return None
    try:
        if not isinstance(d, dict) or d.get("name") not in WRAPPERS:
            resolve_wrapper(d, key)  # raises, naming the problem
        hints = _hints(WRAPPERS[d["name"]].config_class)
        options = {k: _coerce(v, hints[k], f"{key}.{k}") if k in hints else v for k, v in d.items() if k != "name"}
        cls, config = resolve_wrapper({"name": d["name"], **options}, key)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return {"name": cls.name, **dataclasses.asdict(config)}


# Sections of configs written before the wrapper protocol: ``hmt: {...}`` is ``wrapper: {name: hmt, ...}``.
_LEGACY_WRAPPER_SECTIONS = ("hmt", "longmem")


def _legacy_wrappers(layer: dict[str, Any], where: str) -> dict[str, Any]:
    """``layer`` with old ``hmt`` / ``longmem`` sections moved into ``wrapper`` (a DeprecationWarning each)."""
    if not any(k in layer for k in _LEGACY_WRAPPER_SECTIONS):
        return layer
    layer = dict(layer)
    for name in _LEGACY_WRAPPER_SECTIONS:
        if name not in layer:
            continue
        value = layer.pop(name)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            continue
        warnings.warn(f"{where}: the config section {name!r} is deprecated and will be removed in the next release; "
                      f"write it as wrapper: {{name: {name}, ...}} (--wrapper.name {name} --wrapper.FIELD VALUE)",
                      DeprecationWarning, stacklevel=3)
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping of {name} options, got {value!r}")
        if layer.get("wrapper") not in (None, {}) and layer["wrapper"].get("name") not in (None, name):
            raise ConfigError(f"set either wrapper or {name}, not both")
        layer["wrapper"] = {**(layer.get("wrapper") or {}), "name": name, **value}
    return layer


def _merge(base: dict[str, Any], layer: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Merge ``layer`` into a copy of ``base``; a ``model.preset`` key first replaces the model section."""
    out = dict(base)
    for k, v in layer.items():
        key = f"{prefix}{k}"
        if key == "model" and isinstance(v, dict) and "preset" in v:
            v = dict(v)
            name = v.pop("preset")
            try:
                out["model"] = get_model_preset(name).to_dict()
            except ValueError as e:
                raise ConfigError(f"model.preset: {e}") from None
        if key == "wrapper" and isinstance(v, dict) and isinstance(out.get(k), dict) and \
                v.get("name", out[k].get("name")) != out[k].get("name"):
            # Another wrapper replaces the section (its options are not the previous wrapper's).
            out[k] = v
        elif isinstance(v, dict) and v and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, key + ".")
        else:
            # An empty mapping replaces (--model.mixers {} clears the preset's mixer options).
            out[k] = v
    if prefix == "model." and "pattern" in layer and "mixers" not in layer and isinstance(out.get("mixers"), dict):
        # A new pattern drops the options of mixers it no longer uses (--preset tiny --model.pattern gla).
        pattern = set(_coerce(layer["pattern"], tuple[str, ...], "model.pattern"))
        out["mixers"] = {name: o for name, o in out["mixers"].items() if name in pattern}
    return out


def _model_width(mixer: str, d_model: int) -> dict[str, Any]:
    """Mixer options for a preset at width ``d_model``: 64-wide heads when the mixer has ``n_heads``."""
    from ..models.registry import MIXERS

    names = {f.name for f in dataclasses.fields(MIXERS[mixer].config_class)}
    return {"n_heads": max(2, d_model // 64)} if "n_heads" in names else {}


def split_multiple_of(model: ModelConfig) -> int:
    """The model's ``split_multiple`` from its mixer classes, without building it."""
    from ..models.registry import MIXERS

    return math.lcm(*(MIXERS[n].split_multiple for n in model.layer_types if n in MIXERS))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _tiny(mixer: str) -> TrainConfig:
    opts = _model_width(mixer, 128)
    model = ModelConfig(vocab_size=320, d_model=128, n_layers=4, pattern=(mixer,), mixers={mixer: opts} if opts else {})
    return TrainConfig(
        model=model,
        data=DataConfig(seq_len=_round_up(128, split_multiple_of(model))),
        optim=OptimConfig(lr=3e-3, weight_decay=0.1),
        sched=SchedConfig(warmup_steps=30),
        train=LoopConfig(max_steps=600, micro_bs=16),
        ckpt=CheckpointConfig(every=200, keep=2),
        log=LogConfig(every=10, eval_every=100, eval_iters=10),
        out_dir=f"runs/tiny-{mixer}", preset=f"tiny-{mixer}",
    )


def _layers_for(model: ModelConfig, reference: ModelConfig) -> int:
    """The depth that gives ``model`` about as many parameters as ``reference`` (counted on the meta device)."""
    import torch

    from ..models import build_model

    with torch.device("meta"):
        target = build_model(reference).num_parameters()
        one, two = (build_model(model.replace(n_layers=n)).num_parameters() for n in (1, 2))
    return max(1, round((target - (2 * one - two)) / (two - one)))


def _gpu(mixer: str, size: str) -> TrainConfig:
    d_model, n_layers, seq_len, micro_bs, lr = {
        "125m": (768, 12, 1024, 32, 6e-4), "350m": (1024, 24, 2048, 16, 3e-4)}[size]
    if mixer == "attention":
        model = get_model_preset(f"attention-{size}")
    else:
        opts = _model_width(mixer, d_model)
        model = ModelConfig(vocab_size=32_000, d_model=d_model, n_layers=n_layers, pattern=(mixer,),
                            mixers={mixer: opts} if opts else {})
        model = model.replace(n_layers=_layers_for(model, get_model_preset(f"attention-{size}")))
    return TrainConfig(
        model=model,
        data=DataConfig(source="stdlib-code", tokenizer="train:32000",
                        seq_len=_round_up(seq_len, split_multiple_of(model))),
        optim=OptimConfig(lr=lr, weight_decay=0.1),
        sched=SchedConfig(warmup_steps=1000, decay="cosine"),
        train=LoopConfig(max_steps=20_000, micro_bs=micro_bs, precision="bf16"),
        ckpt=CheckpointConfig(every=1000, keep=3),
        log=LogConfig(every=10, eval_every=500, eval_iters=50),
        out_dir=f"runs/gpu-{size}-{mixer}", preset=f"gpu-{size}-{mixer}",
    )


def _hmt(stage: int) -> TrainConfig:
    """HMT's two-stage recipe on a tiny short-window attention backbone (CPU-sized; swap the model for real runs).

    Stage 1 trains the memory token and sensory path without recall (BPTT over 2 segments);
    stage 2 loads stage 1, adds the recall parameters and back-propagates through up to 15 segments.
    Rows stream whole documents, so the memory carries across rows and resets at document starts.
    """
    model = ModelConfig(vocab_size=320, d_model=128, n_layers=4, pattern=("attention",),
                        mixers={"attention": {"n_heads": 2}})
    segment_len = 64
    hmt = {"name": "hmt", "segment_len": segment_len, "n_sensory": 16, "cache_size": 300, "recall_dim": 32,
           "use_recall": stage == 2, "init_from": None if stage == 1 else "runs/hmt-stage-1/final/model.safetensors"}
    return TrainConfig(
        model=model,
        data=DataConfig(seq_len=segment_len * (4 if stage == 1 else 15), segment_len=segment_len,
                        detach_every=2 if stage == 1 else 15, pack="stream"),
        optim=OptimConfig(lr=1e-3 if stage == 1 else 3e-4, weight_decay=0.1),
        sched=SchedConfig(warmup_steps=20, decay="cosine"),
        train=LoopConfig(max_steps=200 if stage == 1 else 500, micro_bs=2),
        ckpt=CheckpointConfig(every=100, keep=2),
        log=LogConfig(every=10, eval_every=100, eval_iters=10),
        wrapper=hmt, out_dir=f"runs/hmt-stage-{stage}", preset=f"hmt_stage_{stage}",
    )


def _longmem_tiny() -> TrainConfig:
    """LongMem's second stage on CPU: a SideNet over the frozen ``tiny`` attention backbone.

    Stage 1 is ``memzoo-train --preset tiny`` (exports ``runs/tiny-attention/final``, the default
    ``longmem.backbone``).  Rows are persistent document streams; trainer segments equal LongMem
    segments (32 tokens), so bank resets at document starts fall on LongMem segment boundaries.
    """
    model = ModelConfig(vocab_size=320, d_model=128, n_layers=4, pattern=("attention",),
                        mixers={"attention": {"n_heads": 2}})
    segment_len = 32
    longmem = {"name": "longmem", "backbone": "runs/tiny-attention/final", "segment_len": segment_len,
               "reduction": 2, "capacity": 1024, "chunk_size": 4, "n_chunks": 8}
    return TrainConfig(
        model=model,
        data=DataConfig(seq_len=segment_len * 8, segment_len=segment_len, detach_every=1, pack="stream"),
        optim=OptimConfig(lr=1e-3, betas=(0.9, 0.98), weight_decay=0.01),
        sched=SchedConfig(warmup_steps=20, decay="cosine"),
        train=LoopConfig(max_steps=300, micro_bs=4),
        ckpt=CheckpointConfig(every=100, keep=2),
        log=LogConfig(every=10, eval_every=100, eval_iters=10),
        wrapper=longmem, out_dir="runs/longmem-tiny", preset="longmem_tiny",
    )


def _tiny_dkvb() -> TrainConfig:
    """``tiny`` (4 x 128 attention) with a Discrete Key-Value Bottleneck (arXiv 2207.11240) as every block's channel
    mixer: 8 codebooks of 512 keys (d_key 16), values of 32, a linear decoder; keys warm up by EMA over the first 50
    steps and then freeze."""
    cfg = _tiny("attention")
    model = cfg.model.replace(ffn="dkvb", ffn_opts={"n_codebooks": 8, "n_keys": 512, "d_key": 16, "d_value": 32,
                                                    "ema_steps": 50})
    return dataclasses.replace(cfg, model=model, out_dir="runs/tiny-dkvb", preset="tiny-dkvb")


def train_presets() -> dict[str, Callable[[], TrainConfig]]:
    """Name -> function returning a ``TrainConfig``; one tiny CPU and two GPU presets per registered mixer.

    ``tiny``, ``gpu-125m`` and ``gpu-350m`` are aliases of the attention presets.
    """
    from ..models.registry import MIXERS

    presets: dict[str, Callable[[], TrainConfig]] = {}
    for mixer in sorted(MIXERS):
        presets[f"tiny-{mixer}"] = functools.partial(_tiny, mixer)
        presets[f"gpu-125m-{mixer}"] = functools.partial(_gpu, mixer, "125m")
        presets[f"gpu-350m-{mixer}"] = functools.partial(_gpu, mixer, "350m")
    presets["hmt_stage_1"] = functools.partial(_hmt, 1)
    presets["hmt_stage_2"] = functools.partial(_hmt, 2)
    presets["longmem_tiny"] = _longmem_tiny
    presets["tiny-dkvb"] = _tiny_dkvb
    presets["tiny"] = functools.partial(_tiny, "attention")
    presets["gpu-125m"] = functools.partial(_gpu, "attention", "125m")
    presets["gpu-350m"] = functools.partial(_gpu, "attention", "350m")
    return presets


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON config file as a nested dict (a saved ``config.json`` loads back as-is)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such file {str(path)!r}")
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _nest(overrides: dict[str, Any]) -> dict[str, Any]:
    """``{"optim.lr": "1e-3"}`` -> ``{"optim": {"lr": "1e-3"}}`` (values of dict-typed fields parsed as YAML)."""
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        if parts[0] not in _SECTIONS and parts[0] not in _LEGACY_WRAPPER_SECTIONS:
            raise _unknown(dotted, list(_SECTIONS))
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {dotted!r} sets a field inside a non-mapping value")
        # Below a mapping-typed field (model.mixers.attention.n_heads) the value has no declared type: parse it.
        if len(parts) > 3 or (parts[0] == "model" and len(parts) > 2):
            value = _parse_literal(value, dotted) if isinstance(value, str) else value
        node[parts[-1]] = value
    return nested


def resolve_config(preset: str | None = None, file: str | Path | None = None,
                   overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults < ``preset`` < ``file`` < dotted ``overrides``, checked and validated."""
    if preset is not None:
        presets = train_presets()
        if preset not in presets:
            message = unknown_name("training preset", preset, presets)
            if preset in MODEL_PRESETS:
                message = (f"{preset!r} is a model preset (a model shape), not a training preset: pass it as "
                           f"--model.preset {preset} next to a training preset (--preset tiny). {message}")
            raise ConfigError(message)
        base = presets[preset]().to_dict()
    else:
        base = TrainConfig().to_dict()
    if file is not None:
        base = _merge(base, _legacy_wrappers(load_config_file(file), f"--config {file}"))
    if overrides:
        base = _merge(base, _legacy_wrappers(_nest(overrides), "command line"))
    cfg = apply_wrapper_backbone(TrainConfig.from_dict(base))
    validate_config(cfg)
    return cfg


def apply_wrapper_backbone(cfg: TrainConfig, *, required: bool = False) -> TrainConfig:
    """The ``model`` section the wrapper's backbone has (LongMem over an export: the export's ``config.json``).

    A backbone that does not exist yet leaves the config as it is, unless ``required`` (the trainer).
    """
    wrapper = cfg.resolved_wrapper()
    if wrapper is None:
        return cfg
    cls, config = wrapper
    try:
        model = cls.backbone_config(cfg.model, config, required=required)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg if model == cfg.model else dataclasses.replace(cfg, model=model)


# The name before the wrapper protocol (LongMem was the only wrapper with a backbone of its own).
apply_longmem_backbone = apply_wrapper_backbone


def validate_config(cfg: TrainConfig) -> None:
    """Range and consistency checks that need no data and no model weights."""
    d, o, s, t, c, lg = cfg.data, cfg.optim, cfg.sched, cfg.train, cfg.ckpt, cfg.log

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(o.lr > 0 and math.isfinite(o.lr), f"optim.lr must be a positive number, got {o.lr}")
    need(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    need(all(0 <= b < 1 for b in o.betas), f"optim.betas must be in [0, 1), got {o.betas}")
    need(o.eps > 0, f"optim.eps must be positive, got {o.eps}")
    need(s.warmup_steps >= 0, f"sched.warmup_steps must be >= 0, got {s.warmup_steps}")
    need(s.decay in DECAYS, f"sched.decay must be one of {DECAYS}, got {s.decay!r}")
    need(0 <= s.min_lr_ratio <= 1, f"sched.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
    need(0 < s.decay_fraction <= 1, f"sched.decay_fraction must be in (0, 1], got {s.decay_fraction}")
    need(t.max_steps is not None or t.max_tokens is not None, "set train.max_steps or train.max_tokens")
    need(t.max_steps is None or t.max_steps >= 1, f"train.max_steps must be >= 1, got {t.max_steps}")
    need(t.max_tokens is None or t.max_tokens >= 1, f"train.max_tokens must be >= 1, got {t.max_tokens}")
    need(t.micro_bs >= 1, f"train.micro_bs must be >= 1, got {t.micro_bs}")
    need(t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}")
    need(t.max_norm >= 0, f"train.max_norm must be >= 0 (0 = no clipping), got {t.max_norm}")
    need(t.precision in PRECISIONS, f"train.precision must be one of {PRECISIONS}, got {t.precision!r}")
    need(c.every >= 0, f"ckpt.every must be >= 0, got {c.every}")
    need(c.keep >= 1, f"ckpt.keep must be >= 1, got {c.keep}")
    need(lg.every >= 1 and lg.eval_every >= 0 and lg.eval_iters >= 1,
         "log.every and log.eval_iters must be >= 1 and log.eval_every >= 0")
    requested = [r.strip() for r in lg.report_to.split(",") if r.strip()]
    bad = [r for r in requested if r not in (*TRACKERS, "none", "all")]
    need(not bad, f"log.report_to: unknown tracker(s) {bad}; choose from none, all, {', '.join(TRACKERS)}")
    need(d.pack in PACK_MODES, f"data.pack must be one of {PACK_MODES}, got {d.pack!r}")
    need(d.seq_len >= 2, f"data.seq_len must be >= 2, got {d.seq_len}")
    need(d.decode_errors in DECODE_ERRORS,
         f"data.decode_errors must be {' or '.join(map(repr, DECODE_ERRORS))}, got {d.decode_errors!r}")
    need(0 < d.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    need(d.detach_every >= 1, f"data.detach_every must be >= 1, got {d.detach_every}")
    need(d.tokenizer == "byte" or d.tokenizer.startswith(("bpe:", "train:")),
         f"data.tokenizer must be 'byte', 'bpe:PATH' or 'train:VOCAB', got {d.tokenizer!r}")
    need(d.source in ("pydoc", "stdlib-code") or d.source.startswith(("file:", "hf:", "prepared:")),
         f"data.source must be pydoc, stdlib-code, file:GLOB, hf:NAME or prepared:DIR, got {d.source!r}")
    multiple = split_multiple_of(cfg.model)
    need(d.seq_len % multiple == 0,
         f"data.seq_len={d.seq_len} must be a multiple of the model's split_multiple={multiple} "
         f"(the least common multiple over its mixers {sorted(set(cfg.model.layer_types))})")
    if d.segment_len is not None:
        need(d.segment_len >= 1 and d.seq_len % d.segment_len == 0,
             f"data.segment_len={d.segment_len} must be positive and divide data.seq_len={d.seq_len}")
        need(d.segment_len % multiple == 0,
             f"data.segment_len={d.segment_len} must be a multiple of the model's split_multiple={multiple}")
        need(d.pack != "varlen",
             "data.segment_len needs data.pack 'block' or 'stream': a varlen row resets its state at every "
             "document through cu_seqlens, so there is no state to carry between segments")
    wrapper = cfg.resolved_wrapper()
    if wrapper is not None:
        try:
            wrapper[0].check_data(wrapper[1], pack=d.pack, seq_len=d.seq_len, segment_len=d.segment_len,
                                  tokenizer=d.tokenizer)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def check_paths(cfg: TrainConfig) -> None:
    """The files a run reads and the folder it writes, checked before anything is built, printed or created."""
    d = cfg.data
    if d.source.startswith("file:") and not source_files(d.source):
        raise ConfigError(f"data.source {d.source!r} matches no files")
    if d.source.startswith("prepared:"):
        folder = Path(d.source.removeprefix("prepared:")).expanduser()
        if not (folder / "meta.json").is_file():
            raise ConfigError(f"data.source {d.source!r}: {str(folder)!r} holds no meta.json (write it with "
                              f"memzoo-prepare --out {folder})")
    if d.tokenizer.startswith("bpe:") and not Path(d.tokenizer.removeprefix("bpe:")).expanduser().exists():
        raise ConfigError(f"data.tokenizer {d.tokenizer!r}: no such file or folder")
    wrapper = cfg.resolved_wrapper()
    if wrapper is not None:
        try:
            wrapper[0].check_paths(wrapper[1], resuming=cfg.ckpt.resume != "none")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    out = Path(cfg.out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {str(out)!r} exists and is not a folder")
    parent = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"out_dir {str(out)!r}: {str(parent)!r} is not writable")
    apply_wrapper_backbone(cfg, required=True)
