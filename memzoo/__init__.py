"""memzoo: memory-augmented sequence models behind one layer contract.

    import memzoo
    model = memzoo.build_model("attention-tiny")
    out = model(input_ids, labels=input_ids)        # out.loss, out.logits, out.state
    model = memzoo.from_pretrained("runs/tiny-attention/final")   # a model trained by memzoo-train
    layer = memzoo.Attention(d_model=512, n_heads=8)
    y, state = layer(x)                              # x: [B, T, 512]
"""

from .models import (
    HMT,
    LSSL,
    MIXERS,
    PRESETS,
    S4D,
    Attention,
    AttentionConfig,
    Block,
    GatedDeltaNet,
    GatedDeltaNetConfig,
    GatedLinearAttention,
    GatedLinearAttentionConfig,
    HMTConfig,
    LanguageModel,
    LMOutput,
    LSSLConfig,
    Mixer,
    MixtureOfMemories,
    ModelConfig,
    MoMConfig,
    S4DConfig,
    TitansConfig,
    TitansMAC,
    TitansMACConfig,
    TitansMAG,
    TitansMAGConfig,
    TitansMAL,
    TitansMALConfig,
    TitansMemory,
    build_mixer,
    build_model,
    detach_state,
    index_state,
)
from .models.wrappers import DiscreteKVBottleneck, DKVBConfig, LongMem, LongMemConfig
from .train.checkpoint import from_pretrained

__version__ = "0.1.0"

__all__ = [
    "MIXERS", "PRESETS", "Block", "LMOutput", "LanguageModel", "Mixer", "ModelConfig",
    # Every registered mixer (memzoo.MIXERS) and its config, by class name.
    "Attention", "AttentionConfig", "GatedDeltaNet", "GatedDeltaNetConfig", "GatedLinearAttention",
    "GatedLinearAttentionConfig", "LSSL", "LSSLConfig", "MixtureOfMemories", "MoMConfig", "S4D", "S4DConfig",
    "TitansConfig", "TitansMAC", "TitansMACConfig", "TitansMAG", "TitansMAGConfig", "TitansMAL", "TitansMALConfig",
    "TitansMemory",
    # Wrappers: model-level memory around a backbone.
    "DKVBConfig", "DiscreteKVBottleneck", "HMT", "HMTConfig", "LongMem", "LongMemConfig",
    "__version__", "build_mixer", "build_model", "detach_state", "from_pretrained", "index_state",
]
