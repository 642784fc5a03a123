"""GatedLinearAttention: a float64 per-token oracle written from the paper (checked in test_qkv_memory.py with Gated
DeltaNet's), plus the layer's own details."""

import math

import pytest
import torch
import torch.nn.functional as F

from memzoo.models import GatedLinearAttention, GatedLinearAttentionConfig

D = 16


def conv_stream(proj, conv, t):
    """Causal depthwise conv + SiLU of one projected stream ``[B, T, C]`` at token t; no conv: unchanged."""
    if conv is None:
        return proj[:, t]
    W = conv.kernel_size
    w = conv.weight.double()
    return F.silu(sum(w[:, j] * proj[:, t - W + 1 + j] for j in range(W) if t - W + 1 + j >= 0))


def oracle(layer: GatedLinearAttention, x: torch.Tensor):
    """The layer token by token in float64: returns the output ``[B, T, D]`` and the memory ``[B, H, K, V]``."""
    c = layer.config
    B, T, _ = x.shape
    H, K, V = c.n_heads, c.head_k, c.head_v
    xd = x.double()

    def lin(m, inp=xd):
        out = inp @ m.weight.double().T
        return out if m.bias is None else out + m.bias.double()

    q_all, k_all, v_all = lin(layer.q_proj), lin(layer.k_proj), lin(layer.v_proj)
    # The low-rank gate: logsigmoid(W2 W1 x + b2) / normaliser, per key channel.
    gk = F.logsigmoid(lin(layer.gk_proj[1], lin(layer.gk_proj[0]))) / c.gate_logit_normalizer  # [B, T, H*K]
    S = [torch.zeros(B, K, V, dtype=torch.float64) for _ in range(H)]  # one memory per head
    ys = []
    for t in range(T):
        q = conv_stream(q_all, layer.q_conv, t).view(B, H, K)
        k = conv_stream(k_all, layer.k_conv, t).view(B, H, K)
        v = conv_stream(v_all, layer.v_conv, t).view(B, H, V)
        alpha = gk[:, t].view(B, H, K).exp()
        for h in range(H):
            S[h] = alpha[:, h, :, None] * S[h] + torch.einsum("bk,bv->bkv", k[:, h], v[:, h])
        o = torch.stack([torch.einsum("bkv,bk->bv", S[h], q[:, h]) for h in range(H)], 1) / math.sqrt(K)
        o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + c.norm_eps) * layer.o_norm.weight.double()
        if layer.g_proj is not None:
            o = o * F.silu((xd[:, t] @ layer.g_proj.weight.double().T).view(B, H, V))
        ys.append(o.reshape(B, H * V) @ layer.o_proj.weight.double().T)
    return torch.stack(ys, 1), torch.stack(S, 1)


def make(**opts):
    torch.manual_seed(0)
    layer = GatedLinearAttention(d_model=D, **opts)
    with torch.no_grad():
        layer.o_norm.weight.normal_(1.0, 0.5)
        layer.gk_proj[1].bias.normal_(2.0, 1.0)
    return layer


ORACLE_CASES = [
    pytest.param({"n_heads": 2}, id="default-2heads"),
    pytest.param({"n_heads": 2, "use_short_conv": True, "use_gate": False}, id="conv-no-gate"),
    pytest.param({"n_heads": 1, "expand_k": 1.0, "expand_v": 1.5, "use_short_conv": True, "conv_size": 2,
                  "gate_low_rank_dim": 4, "gate_logit_normalizer": 2.0, "chunk_size": 16}, id="wide-conv2"),
]


def test_decay_in_unit_interval_and_fp32():
    layer = make()
    g = layer.gates(3 * torch.randn(4, 50, D))
    assert g.dtype == torch.float32 and g.shape == (4, 50, 4, 2)
    alpha = g.exp()
    assert bool((alpha > 0).all() and (alpha < 1).all())
    # At zero logits the log-decay is logsigmoid(0) / normaliser = log(1/2) / 16.
    layer.gk_proj[1].bias.data.zero_()
    layer.gk_proj[0].weight.data.zero_()
    assert torch.allclose(layer.gates(torch.randn(1, 2, D)), torch.tensor(math.log(0.5) / 16))
    bf16 = make().to(torch.bfloat16)
    assert bf16.gates(torch.randn(1, 3, D, dtype=torch.bfloat16)).dtype == torch.float32


def test_sizes_and_state_size():
    layer = GatedLinearAttention(d_model=32, n_heads=4)
    assert (layer.head_k, layer.head_v) == (4, 8)
    assert layer.state_size() == layer.state_size(1000) == 4 * 4 * 8
    assert layer.q_conv is None and all(t is None for t in layer.init_state(2)[:3])
    assert layer.gk_proj[0].weight.shape == (16, 32) and layer.gk_proj[1].bias.shape == (16,)
    assert layer.init_state(2).memory.dtype == torch.float32


@pytest.mark.parametrize("opts,match", [
    ({"n_heads": 0}, "positive"),
    ({"expand_k": 0.3}, "expand_k"),
    ({"expand_k": 0.5, "n_heads": 32}, "expand_k"),
    ({"expand_v": 0.0}, "expand_v"),
    ({"gate_low_rank_dim": 0}, "gate_low_rank_dim"),
    ({"gate_logit_normalizer": 0.0}, "gate_logit_normalizer"),
    ({"conv_size": 0}, "conv_size"),
    ({"norm_eps": -1.0}, "norm_eps"),
    ({"chunk_size": 512}, "chunk_size"),
    ({"chunk_size": 24}, "chunk_size"),
    ({"impl": "fast"}, "impl"),
])
def test_bad_config_raises(opts, match):
    with pytest.raises(ValueError, match=match):
        GatedLinearAttentionConfig(d_model=32, **opts)


def test_extra_flops_count_the_chunked_memory():
    from memzoo.models.layers.gated_delta import chunked_memory_flops

    layer = GatedLinearAttention(d_model=64, n_heads=2, chunk_size=16)
    k, v = layer.head_k, layer.head_v
    assert layer.extra_flops_per_token(1024) == 3 * 2 * (4 * k * v + 2 * 16 * (k + v))
    # Short contexts attend within fewer keys per chunk.
    assert layer.extra_flops_per_token(4) == chunked_memory_flops(2, k, v, 4, 4) < layer.extra_flops_per_token(1024)
