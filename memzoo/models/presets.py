"""Model presets: plain functions returning a ``ModelConfig``; ``PRESETS`` maps their names.

Sizes follow the GPT-2/Pythia ladder so results line up with published baselines.  Byte-level
vocabulary (256) by default: it needs no tokenizer files.
"""

from __future__ import annotations

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


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "attention-tiny": attention_tiny,
    "attention-small": attention_small,
    "attention-125m": attention_125m,
    "attention-350m": attention_350m,
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name]()
