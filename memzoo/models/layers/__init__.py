"""Token mixers: one file per architecture, each a ``memzoo.models.contract.Mixer``."""

from .attention import Attention, AttentionConfig, AttentionState
from .conv import ShortConvolution
from .gated_delta import GatedDeltaNet, GatedDeltaNetConfig, GatedDeltaState
from .gla import GatedLinearAttention, GatedLinearAttentionConfig, GLAState

__all__ = [
    "Attention", "AttentionConfig", "AttentionState", "GLAState", "GatedDeltaNet", "GatedDeltaNetConfig",
    "GatedDeltaState", "GatedLinearAttention", "GatedLinearAttentionConfig", "ShortConvolution",
]
