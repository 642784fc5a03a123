"""``memzoo.train``: the Accelerate pretraining loop behind ``memzoo-train`` / ``python -m memzoo.train``.

    from memzoo.train import resolve_config, train
    summary = train(resolve_config("tiny", overrides={"train.max_steps": 100, "out_dir": "runs/t"}))
    model = memzoo.from_pretrained(summary["final"])

Importing this package is cheap (``import memzoo`` imports it for ``from_pretrained``): numpy,
Accelerate, datasets, tokenizers and the trackers are imported only by the code that needs them.
"""

from .checkpoint import TrainState, from_pretrained, latest_checkpoint
from .config import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    LogConfig,
    LoopConfig,
    OptimConfig,
    SchedConfig,
    TrainConfig,
    resolve_config,
    train_presets,
    validate_config,
)

_DATA_NAMES = ("Batch", "BPETokenizer", "ByteTokenizer", "load_tokenizer", "make_packer", "prepare")


def __getattr__(name: str):
    # The data module needs numpy, which a bare ``pip install memzoo`` (torch, einops) may lack.
    if name in _DATA_NAMES:
        from . import data

        return getattr(data, name)
    raise AttributeError(f"module 'memzoo.train' has no attribute {name!r}")


def train(cfg: TrainConfig) -> dict:
    """Run training (see ``memzoo.train.loop.train``); imported lazily so ``import memzoo`` stays light."""
    from .loop import train as _train

    return _train(cfg)


__all__ = [
    "BPETokenizer", "Batch", "ByteTokenizer", "CheckpointConfig", "ConfigError", "DataConfig", "LogConfig",
    "LoopConfig", "OptimConfig", "SchedConfig", "TrainConfig", "TrainState", "from_pretrained", "latest_checkpoint",
    "load_tokenizer", "make_packer", "prepare", "resolve_config", "train", "train_presets", "validate_config",
]
