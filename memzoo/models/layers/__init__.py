"""Token mixers: one file per architecture, each a ``memzoo.models.contract.Mixer``."""

from .attention import Attention, AttentionConfig, AttentionState
from .conv import ShortConvolution
from .gated_delta import GatedDeltaNet, GatedDeltaNetConfig, GatedDeltaState
from .gla import GatedLinearAttention, GatedLinearAttentionConfig, GLAState
from .lssl import LSSL, LSSLConfig, LSSLState
from .mom import MixtureOfMemories, MoMConfig, MoMState
from .s4d import S4D, S4DConfig, S4DState
from .titans import NeuralMemory, TitansConfig, TitansMemory, TitansState
from .titans_arch import TitansMAG, TitansMAGConfig, TitansMAL, TitansMALConfig, TitansSWAState
from .titans_arch_mac import TitansMAC, TitansMACConfig, TitansMACState

__all__ = [
    "NeuralMemory", "TitansConfig", "TitansMemory", "TitansState",
    "Attention", "AttentionConfig", "AttentionState", "GLAState", "GatedDeltaNet", "GatedDeltaNetConfig",
    "GatedDeltaState", "GatedLinearAttention", "GatedLinearAttentionConfig", "ShortConvolution",
    "LSSL", "LSSLConfig", "LSSLState", "S4D", "S4DConfig", "S4DState",
    "MixtureOfMemories", "MoMConfig", "MoMState",
    "TitansMAC", "TitansMACConfig", "TitansMACState", "TitansMAG", "TitansMAGConfig", "TitansMAL", "TitansMALConfig",
    "TitansSWAState",
]
