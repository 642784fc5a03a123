"""GatedDeltaNet: a float64 per-token oracle written from the paper (checked in test_qkv_memory.py with GLA's), plus
the layer's own details."""

import math

import pytest
import torch
import torch.nn.functional as F

from memzoo.models import GatedDeltaNet, GatedDeltaNetConfig

D = 16


def conv_stream(proj, conv, t):
    """Causal depthwise conv + SiLU of one projected stream ``[B, T, C]`` at token t (zeros before 0)."""
    if conv is None:
        return F.silu(proj[:, t])
    W = conv.kernel_size
    w = conv.weight.double()
    acc = sum(w[:, j] * proj[:, t - W + 1 + j] for j in range(W) if t - W + 1 + j >= 0)
    return F.silu(acc)


def oracle(layer: GatedDeltaNet, x: torch.Tensor):
    """The layer token by token in float64: returns the output ``[B, T, D]`` and the memory ``[B, H, K, V]``."""
    c = layer.config
    B, T, _ = x.shape
    H, K, V = c.n_heads, c.head_k, c.head_v
    xd = x.double()

    def lin(m):
        return xd @ m.weight.double().T

    q_all, k_all, v_all = lin(layer.q_proj), lin(layer.k_proj), lin(layer.v_proj)
    a, b = lin(layer.a_proj), lin(layer.b_proj)  # [B, T, H]
    S = [torch.zeros(B, K, V, dtype=torch.float64) for _ in range(H)]  # one memory per head
    ys = []
    for t in range(T):
        q = conv_stream(q_all, layer.q_conv, t).view(B, H, K)
        k = conv_stream(k_all, layer.k_conv, t).view(B, H, K)
        v = conv_stream(v_all, layer.v_conv, t).view(B, H, V)
        q = q / torch.sqrt(q.pow(2).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt(k.pow(2).sum(-1, keepdim=True) + 1e-6)
        # Mamba-2 decay alpha = exp(-A dt), dt = softplus(a + dt_bias); beta = sigmoid(b).
        alpha = torch.exp(-layer.A_log.double().exp() * F.softplus(a[:, t] + layer.dt_bias.double()))
        beta = torch.sigmoid(b[:, t])
        for h in range(H):
            S_h = alpha[:, h, None, None] * S[h]
            err = v[:, h] - torch.einsum("bkv,bk->bv", S_h, k[:, h])
            S[h] = S_h + beta[:, h, None, None] * torch.einsum("bk,bv->bkv", k[:, h], err)
        o = torch.stack([torch.einsum("bkv,bk->bv", S[h], q[:, h]) for h in range(H)], 1) / math.sqrt(K)
        o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + c.norm_eps) * layer.o_norm.weight.double()
        if layer.g_proj is not None:
            o = o * F.silu((xd[:, t] @ layer.g_proj.weight.double().T).view(B, H, V))
        ys.append(o.reshape(B, H * V) @ layer.o_proj.weight.double().T)
    return torch.stack(ys, 1), torch.stack(S, 1)


def make(**opts):
    torch.manual_seed(0)
    layer = GatedDeltaNet(d_model=D, **opts)
    with torch.no_grad():
        layer.o_norm.weight.normal_(1.0, 0.5)
    return layer


ORACLE_CASES = [
    pytest.param({"n_heads": 2}, id="default-2heads"),
    pytest.param({"n_heads": 2, "use_short_conv": False, "use_gate": False}, id="no-conv-no-gate"),
    pytest.param({"n_heads": 1, "d_head": 8, "expand_v": 1.5, "conv_size": 3, "chunk_size": 16}, id="dhead-conv3"),
]


def test_decay_and_beta_in_unit_interval():
    layer = make()
    g, beta = layer.gates(3 * torch.randn(4, 50, D))
    assert g.dtype == beta.dtype == torch.float32 and g.shape == beta.shape == (4, 50, 4)
    alpha = g.exp()
    assert bool((alpha > 0).all() and (alpha < 1).all())
    assert bool((beta > 0).all() and (beta < 1).all())
    # Mamba-2 init: A in (0, 16), dt = softplus(dt_bias) in [1e-3, 1e-1]; neither is weight-decayed.
    A, dt = layer.A_log.exp(), F.softplus(layer.dt_bias)
    assert bool(((A > 0) & (A < 16)).all()) and bool(((dt >= 1e-3 * 0.999) & (dt <= 1e-1 * 1.001)).all())
    assert layer.A_log._no_weight_decay and layer.dt_bias._no_weight_decay


def test_gates_are_fp32_in_a_bf16_layer():
    layer = make().to(torch.bfloat16)
    g, beta = layer.gates(torch.randn(1, 5, D, dtype=torch.bfloat16))
    assert g.dtype == beta.dtype == torch.float32
    y, state = layer(torch.randn(1, 5, D, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and state.memory.dtype == torch.float32


def test_state_size_and_parameter_names():
    layer = GatedDeltaNet(d_model=32, n_heads=4)
    assert (layer.head_k, layer.head_v) == (8, 16)
    assert layer.state_size() == layer.state_size(1000) == 4 * 8 * 16
    names = {n for n, _ in layer.named_parameters()}
    assert {"o_proj.weight", "A_log", "dt_bias", "q_conv.weight"} <= names
    bare = GatedDeltaNet(d_model=32, use_short_conv=False, use_gate=False)
    assert bare.q_conv is None and bare.g_proj is None
    assert all(t is None for t in bare.init_state(2)[:3])


@pytest.mark.parametrize("opts,match", [
    ({"n_heads": 3}, "divisible"),
    ({"n_heads": 0}, "positive"),
    ({"d_head": 0}, "d_head"),
    ({"expand_v": 0.3}, "expand_v"),
    ({"expand_v": -1.0}, "expand_v"),
    ({"conv_size": 0}, "conv_size"),
    ({"norm_eps": 0.0}, "norm_eps"),
    ({"chunk_size": 48}, "chunk_size"),
    ({"chunk_size": 8}, "chunk_size"),
    ({"impl": "cuda"}, "impl"),
])
def test_bad_config_raises(opts, match):
    with pytest.raises(ValueError, match=match):
        GatedDeltaNetConfig(d_model=32, **opts)
