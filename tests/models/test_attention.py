"""Attention against a float64 oracle written straight from the equations, plus its own details."""

import math

import pytest
import torch

from memzoo.models import Attention, AttentionConfig
from memzoo.models.rope import apply_rope, positions_from_cu_seqlens
from memzoo.testing import assert_close

D = 32


def rope_complex(x, positions, theta):
    """RoPE as a complex rotation of pairs (x_i, x_{i + D/2}) by angle p * theta^(-2i/D)."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half], x[..., half:])
    freqs = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    rot = torch.polar(torch.ones_like(freqs), positions[..., None].double() * freqs)
    z = z * rot[..., None, :] if z.dim() == rot.dim() + 1 else z * rot
    return torch.cat((z.real, z.imag), dim=-1)


def oracle(layer: Attention, x: torch.Tensor) -> torch.Tensor:
    """o_t = sum over visible s of softmax(q_t.k_s / sqrt(d)) v_s, one query at a time, in float64."""
    c = layer.config
    B, T, _ = x.shape
    H, Hkv, Dh = c.n_heads, c.kv_heads, c.head_dim
    xd = x.double()
    q = (xd @ layer.q_proj.weight.double().T).view(B, T, H, Dh)
    k = (xd @ layer.k_proj.weight.double().T).view(B, T, Hkv, Dh)
    v = (xd @ layer.v_proj.weight.double().T).view(B, T, Hkv, Dh)
    if c.rope_theta is not None:
        pos = torch.arange(T)
        q = torch.stack([rope_complex(q[:, t], pos[t], c.rope_theta) for t in range(T)], 1)
        k = torch.stack([rope_complex(k[:, t], pos[t], c.rope_theta) for t in range(T)], 1)
    out = torch.zeros(B, T, H, Dh, dtype=torch.float64)
    for t in range(T):
        lo = 0 if c.window is None else max(0, t - c.window + 1)
        for h in range(H):
            g = h // (H // Hkv)
            scores = torch.einsum("bd,bsd->bs", q[:, t, h], k[:, lo:t + 1, g]) / math.sqrt(Dh)
            out[:, t, h] = torch.einsum("bs,bsd->bd", scores.softmax(-1), v[:, lo:t + 1, g])
    return out.reshape(B, T, H * Dh) @ layer.o_proj.weight.double().T


@pytest.mark.parametrize("opts", [
    {"n_heads": 4},
    {"n_heads": 4, "n_kv_heads": 2},
    {"n_heads": 4, "n_kv_heads": 1, "window": 4},
    {"n_heads": 2, "d_head": 8, "window": 3, "rope_theta": 500.0},
    {"n_heads": 1, "rope_theta": None},
], ids=["mha", "gqa", "mqa-window", "dhead-window-theta", "single-head-norope"])
def test_matches_float64_oracle(opts):
    layer = Attention(d_model=D, **opts)
    x = torch.randn(2, 11, D)
    y, _ = layer(x)
    assert_close(y, oracle(layer, x).float(), 1e-5, "attention vs oracle")


def test_rope_scores_depend_on_relative_position_only():
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    def score(p, s):
        return (apply_rope(q, torch.tensor([[p]]), 10_000.0) * apply_rope(k, torch.tensor([[s]]), 10_000.0)).sum()
    assert torch.allclose(score(7, 3), score(104, 100), atol=1e-5)
    assert not torch.allclose(score(7, 3), score(7, 4), atol=1e-5)
    # Position 0 is the identity.
    assert torch.equal(apply_rope(q, torch.tensor([[0]]), 10_000.0), q)


def test_positions_from_cu_seqlens():
    doc, pos = positions_from_cu_seqlens(torch.tensor([0, 3, 3, 5, 6]), 6)
    assert doc.tolist() == [0, 0, 0, 2, 2, 3]
    assert pos.tolist() == [0, 1, 2, 0, 1, 0]


def test_window_cache_holds_only_what_the_next_token_sees():
    layer = Attention(d_model=D, n_heads=4, n_kv_heads=2, window=4)
    _, state = layer(torch.randn(3, 10, D))
    assert state.k.shape == (3, 3, 2, 8)
    assert state.pos_k.tolist() == [[7, 8, 9]] * 3 and state.pos.tolist() == [10] * 3
    assert layer.state_size(100) == 2 * 2 * 8 * 3 == state.k.numel() // 3 * 2
    assert layer.state_size(2) == 2 * 2 * 8 * 2


def test_full_cache_state_size_needs_seq_len():
    layer = Attention(d_model=D, n_heads=4)
    assert layer.state_size(10) == 2 * D * 10
    with pytest.raises(ValueError, match="seq_len"):
        layer.state_size()


def test_gqa_shares_key_value_heads():
    layer = Attention(d_model=D, n_heads=4, n_kv_heads=2)
    assert layer.k_proj.out_features == layer.v_proj.out_features == 2 * 8
    assert sum(p.numel() for p in layer.parameters()) == D * D * 2 + D * 16 * 2


def test_dropout_only_in_training():
    layer = Attention(d_model=D, n_heads=4, dropout=0.5)
    x = torch.randn(2, 9, D)
    layer.eval()
    assert torch.equal(layer(x)[0], layer(x)[0])
    layer.train()
    assert not torch.equal(layer(x)[0], layer(x)[0])


def test_kwargs_or_config_not_both():
    assert Attention(AttentionConfig(d_model=D, n_heads=2)).n_heads == 2
    with pytest.raises(TypeError, match="not both"):
        Attention(AttentionConfig(d_model=D), n_heads=2)
    with pytest.raises(TypeError, match="AttentionConfig"):
        Attention({"d_model": D})


@pytest.mark.parametrize("opts,match", [
    ({"n_heads": 3}, "divisible"),
    ({"n_heads": 4, "n_kv_heads": 3}, "divide"),
    ({"n_heads": 4, "d_head": 7}, "even"),
    ({"window": 0}, "window"),
    ({"dropout": 1.0}, "dropout"),
    ({"backend": "xformers"}, "backend"),
    ({"rope_theta": -1.0}, "rope_theta"),
])
def test_config_validation(opts, match):
    with pytest.raises(ValueError, match=match):
        AttentionConfig(d_model=D, **opts)


def test_flash_backend_refuses_cpu():
    layer = Attention(d_model=D, backend="flash")
    with pytest.raises(RuntimeError, match="flash-attn"):
        layer(torch.randn(1, 4, D))


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 16])
def test_flash_and_sdpa_agree_on_cuda(window):
    pytest.importorskip("flash_attn")
    torch.manual_seed(0)
    flash = Attention(d_model=256, n_heads=4, n_kv_heads=2, window=window).cuda().bfloat16()
    sdpa = Attention(flash.config.__class__(**{**flash.config.__dict__, "backend": "sdpa"})).cuda().bfloat16()
    sdpa.load_state_dict(flash.state_dict())
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16)
    assert_close(flash(x)[0].float(), sdpa(x)[0].float(), 2e-2, "flash vs sdpa")
    cu = torch.tensor([0, 100, 100, 300], device="cuda")
    assert_close(flash(x[:1], cu_seqlens=cu)[0].float(), sdpa(x[:1], cu_seqlens=cu)[0].float(), 2e-2, "varlen")
