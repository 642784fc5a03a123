"""memzoo models: the layer contract, the mixers, the block and the language model."""

from __future__ import annotations

from typing import Any

from .block import Block, RMSNorm, SwiGLU
from .config import ModelConfig
from .contract import Mixer
from .layers import (
    LSSL,
    S4D,
    Attention,
    AttentionConfig,
    AttentionState,
    GatedDeltaNet,
    GatedDeltaNetConfig,
    GatedDeltaState,
    GatedLinearAttention,
    GatedLinearAttentionConfig,
    GLAState,
    LSSLConfig,
    LSSLState,
    MixtureOfMemories,
    MoMConfig,
    MoMState,
    NeuralMemory,
    S4DConfig,
    S4DState,
    ShortConvolution,
    TitansConfig,
    TitansMAC,
    TitansMACConfig,
    TitansMAG,
    TitansMAGConfig,
    TitansMAL,
    TitansMALConfig,
    TitansMemory,
    TitansState,
)
from .lm import LanguageModel, LMOutput, sample_next
from .presets import PRESETS, get_preset
from .registry import MIXERS, build_mixer, mixer_config
from .state import detach_state, index_state, state_batch_size, tree_map
from .wrappers import HMT, HMTConfig, HMTState

__all__ = [
    "NeuralMemory", "TitansConfig", "TitansMemory", "TitansState",
    "Attention", "AttentionConfig", "AttentionState", "Block", "GLAState", "GatedDeltaNet", "GatedDeltaNetConfig",
    "GatedDeltaState", "GatedLinearAttention", "GatedLinearAttentionConfig", "LMOutput", "LanguageModel", "MIXERS",
    "Mixer", "ModelConfig", "PRESETS", "RMSNorm", "ShortConvolution", "SwiGLU", "build_mixer", "build_model",
    "detach_state", "get_preset", "index_state", "mixer_config", "sample_next", "state_batch_size", "tree_map",
    "HMT", "HMTConfig", "HMTState",
    "LSSL", "LSSLConfig", "LSSLState", "S4D", "S4DConfig", "S4DState",
    "MixtureOfMemories", "MoMConfig", "MoMState",
    "TitansMAC", "TitansMACConfig", "TitansMAG", "TitansMAGConfig", "TitansMAL", "TitansMALConfig",
]


def build_model(config: ModelConfig | dict[str, Any] | str, **overrides: Any) -> LanguageModel:
    """Build a ``LanguageModel`` from a config, a config dict (JSON) or a preset name.

    ``overrides`` replace top-level config fields, e.g. ``build_model("attention-tiny", n_layers=4)``.
    """
    if isinstance(config, str):
        config = get_preset(config)
    elif isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    elif not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, a dict or a preset name, got {type(config).__name__}")
    if overrides:
        config = ModelConfig.from_dict({**config.to_dict(), **overrides})
    return LanguageModel(config)
