"""Model presets: plain functions returning a ``ModelConfig``; ``PRESETS`` maps their names.

These are model shapes (``build_model("attention-tiny")``, ``memzoo-train --model.preset``), named
``<mixer>-<size>``.  Training recipes (data, optimizer, steps and a model) are the ``memzoo-train``
presets, named ``<size>-<mixer>`` (``tiny-attention``); ``python -m memzoo`` lists both sets.

Sizes follow the GPT-2/Pythia ladder so results line up with published baselines.  Byte-level
vocabulary (256) by default: it needs no tokenizer files.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable

from .config import ModelConfig

__all__ = ["PRESETS", "get_preset"]


def attention_tiny() -> ModelConfig:
    """2 layers, d_model 64: trains in seconds on a laptop CPU (smoke tests, examples)."""
    return ModelConfig(vocab_size=256, d_model=64, n_layers=2, mixers={"attention": {"n_heads": 4}})


def attention_small() -> ModelConfig:
    """6 layers, d_model 256, GQA 8/2 heads: a CPU-friendly model for the recall tasks."""
    return ModelConfig(vocab_size=256, d_model=256, n_layers=6,
                       mixers={"attention": {"n_heads": 8, "n_kv_heads": 2}})


def attention_125m() -> ModelConfig:
    """GPT-2 small shape (12 x 768, 12 heads) with a 32k vocabulary: ~110M parameters tied."""
    return ModelConfig(vocab_size=32_000, d_model=768, n_layers=12, mixers={"attention": {"n_heads": 12}})


def attention_350m() -> ModelConfig:
    """GPT-2 medium shape (24 x 1024, 16 heads) with a 32k vocabulary: ~335M parameters tied."""
    return ModelConfig(vocab_size=32_000, d_model=1024, n_layers=24, mixers={"attention": {"n_heads": 16}})


# Titans v2 Table 5 (arXiv 2501.00663): blocks, d_model, heads; Llama-2 32k vocabulary.
_TITANS_SIZES = {"170m": (12, 768, 16), "340m": (24, 1024, 16), "760m": (24, 1536, 16)}
_TITANS_MIXERS = {"lmm": "titans", "mac": "titans_mac", "mag": "titans_mag", "mal": "titans_mal"}


def titans(variant: str, size: str) -> ModelConfig:
    """Titans LMM/MAC/MAG/MAL at the paper's 170M/340M/760M shapes: 16 memory and attention heads, the layers'
    paper defaults (b = 16, N_p = 128, segment 512, window 2048)."""
    n_layers, d_model, heads = _TITANS_SIZES[size]
    mixer = _TITANS_MIXERS[variant]
    opts = {"n_heads": heads} if mixer == "titans" else {"n_heads": heads, "memory": {"n_heads": heads}}
    return ModelConfig(vocab_size=32_000, d_model=d_model, n_layers=n_layers, pattern=(mixer,), mixers={mixer: opts})


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    **{f"titans-{v}-{s}": functools.partial(titans, v, s) for v in _TITANS_MIXERS for s in _TITANS_SIZES},
    "attention-tiny": attention_tiny,
    "attention-small": attention_small,
    "attention-125m": attention_125m,
    "attention-350m": attention_350m,
}


def get_preset(name: str) -> ModelConfig:
    """The model shape ``name`` (see ``PRESETS``).  Training recipes are ``memzoo-train`` presets, a separate set."""
    if name not in PRESETS:
        from ..train.config import train_presets
        from .registry import unknown_name

        message = unknown_name("model preset", name, PRESETS)
        recipes = train_presets()
        # Shapes are <mixer>-<size> and recipes <size>-<mixer>: a swapped name is the likeliest slip.
        swapped = "-".join(reversed(str(name).split("-")))
        similar = [swapped] if swapped in recipes else difflib.get_close_matches(name, recipes, n=2, cutoff=0.6)
        if name in recipes:
            message = (f"{name!r} is a memzoo-train preset (a training recipe), not a model preset; its model is "
                       f"memzoo.train.resolve_config({name!r}).model. {message}")
        elif similar:
            message += f" (memzoo-train presets with a similar name: {', '.join(map(repr, similar))})"
        raise ValueError(message)
    return PRESETS[name]()
