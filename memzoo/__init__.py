"""memzoo: memory-augmented sequence models behind one layer contract.

    import memzoo
    model = memzoo.build_model("attention-tiny")
    out = model(input_ids, labels=input_ids)        # out.loss, out.logits, out.state
    layer = memzoo.Attention(d_model=512, n_heads=8)
    y, state = layer(x)                              # x: [B, T, 512]
"""

from .models import (
    MIXERS,
    PRESETS,
    Attention,
    AttentionConfig,
    Block,
    LanguageModel,
    LMOutput,
    Mixer,
    ModelConfig,
    build_mixer,
    build_model,
    detach_state,
    index_state,
)

__version__ = "0.1.0"

__all__ = [
    "MIXERS", "PRESETS", "Attention", "AttentionConfig", "Block", "LMOutput", "LanguageModel", "Mixer",
    "ModelConfig", "__version__", "build_mixer", "build_model", "detach_state", "index_state",
]
