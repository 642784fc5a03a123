"""Token mixers: one file per architecture, each a ``memzoo.models.contract.Mixer``."""

from .attention import Attention, AttentionConfig, AttentionState

__all__ = ["Attention", "AttentionConfig", "AttentionState"]
