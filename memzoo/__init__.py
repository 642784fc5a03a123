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
    MIXERS,
    PRESETS,
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
    Mixer,
    ModelConfig,
    build_mixer,
    build_model,
    detach_state,
    index_state,
)
from .train.checkpoint import from_pretrained

__version__ = "0.1.0"

__all__ = [
    "MIXERS", "PRESETS", "Attention", "AttentionConfig", "Block", "GatedDeltaNet", "GatedDeltaNetConfig",
    "GatedLinearAttention", "GatedLinearAttentionConfig", "LMOutput", "LanguageModel", "Mixer", "ModelConfig",
    "HMT", "HMTConfig",
    "__version__", "build_mixer", "build_model", "detach_state", "from_pretrained", "index_state",
]
