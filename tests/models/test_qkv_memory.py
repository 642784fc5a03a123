"""What Gated DeltaNet and GLA share as QKVMemoryMixers, checked on both: the float64 oracle with every gradient,
decoding through the fused recurrent op, packed continuation from a state, and padded == packed == separate."""

import pytest
import test_gated_delta_layer as gd_tests
import test_gla_layer as gla_tests
import torch
import torch.nn.functional as F

import memzoo.models.layers.gated_delta as gd_module
import memzoo.models.layers.gla as gla_module
from memzoo.models import LanguageModel, ModelConfig
from memzoo.testing import assert_close, assert_states_close

D = 16
# name -> (test module with make/oracle/ORACLE_CASES, layer module, its fused recurrent op, options with a conv)
LAYERS = {
    "gated_delta": (gd_tests, gd_module, "fused_recurrent_gated_delta_rule", {}),
    "gla": (gla_tests, gla_module, "fused_recurrent_gla", {"use_short_conv": True}),
}
ORACLE_CASES = [pytest.param(name, *case.values, id=f"{name}-{case.id}")
                for name, (tests, *_) in LAYERS.items() for case in tests.ORACLE_CASES]


@pytest.mark.parametrize("name,opts", ORACLE_CASES)
def test_matches_float64_oracle_with_gradients(name, opts):
    tests = LAYERS[name][0]
    layer, x = tests.make(**opts), torch.randn(2, 21, D)
    y, state = layer(x)
    y_ref, S_ref = tests.oracle(layer, x)
    assert_close(y, y_ref.float(), 2e-5, "output vs oracle")
    assert_close(state.memory, S_ref.float(), 2e-5, "memory vs oracle")
    # Every parameter's gradient through the chunked op equals the one through the oracle's loop.
    w = torch.randn_like(y)
    (y * w).sum().backward()
    got = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    (y_ref * w.double()).sum().backward()
    for n, p in layer.named_parameters():
        assert_close(got[n], p.grad, 1e-4, f"grad of {n}")


@pytest.mark.parametrize("name", LAYERS)
def test_decoding_without_grad_uses_the_recurrent_op(name, monkeypatch):
    """Under no_grad, step takes the fused recurrent op (decode path) and still equals forward."""
    tests, module, op_name, conv = LAYERS[name]
    calls = []
    real = getattr(module, op_name)

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, op_name, spy)
    layer, x = tests.make(**conv), torch.randn(2, 9, D)
    with torch.no_grad():
        y_full, s_full = layer(x)
        state, ys = None, []
        for t in range(9):
            y_t, state = layer.step(x[:, t], state)
            ys.append(y_t)
    assert len(calls) == 9
    assert_close(torch.stack(ys, 1), y_full, 1e-5, "recurrent step output")
    assert_states_close(state, s_full, 1e-5, "recurrent step state")
    # With gradients needed, step must not use the backward-less recurrent kernel.
    layer.step(x[:, 0], None)
    assert len(calls) == 9


@pytest.mark.parametrize("name,conv", [("gated_delta", True), ("gla", False), ("gla", True)])
def test_packed_continuation_from_a_state(name, conv):
    """cu_seqlens together with an initial state (conv tails and memory) == separate continuations."""
    layer = LAYERS[name][0].make(use_short_conv=conv)
    _, state = layer(torch.randn(3, 6, D))
    more = torch.randn(1, 7, D)
    cu = torch.tensor([0, 5, 5, 7])
    y, new_state = layer(more, state, cu_seqlens=cu)

    def row(s, i):
        return type(s)(*(None if t is None else t[i:i + 1] for t in s))

    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        s_i = row(state, i)
        if b > a:
            y_i, s_i = layer(more[:, a:b], s_i)
            assert_close(y[:, a:b], y_i, 1e-5, f"sequence {i}")
        assert_states_close(row(new_state, i), s_i, 1e-5, f"state {i}")


@pytest.mark.parametrize("name", LAYERS)
def test_model_padded_equals_packed_equals_separate(name):
    """Two sequences of different lengths: a right-padded batch and a packed batch both equal separate runs,
    and the packed state continues each sequence like its own state."""
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=50, d_model=32, n_layers=2, pattern=(name, "attention"),
                                      mixers={name: LAYERS[name][3]})).eval()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 50, (1, 7), generator=g), torch.randint(0, 50, (1, 12), generator=g)
    out_a, out_b = model(a), model(b)
    padded = model(torch.cat((F.pad(a, (0, 5)), b)))
    assert_close(padded.logits[:1, :7], out_a.logits, 1e-5, "padded sequence a")
    assert_close(padded.logits[1:], out_b.logits, 1e-5, "padded sequence b")
    packed = model(torch.cat((a, b), 1), cu_seqlens=torch.tensor([0, 7, 19]))
    assert_close(packed.logits[:, :7], out_a.logits, 1e-5, "packed sequence a")
    assert_close(packed.logits[:, 7:], out_b.logits, 1e-5, "packed sequence b")
    mixer_state = packed.state[0]
    for i, out in enumerate((out_a, out_b)):
        row = type(mixer_state)(*(None if t is None else t[i:i + 1] for t in mixer_state))
        assert_states_close(row, out.state[0], 1e-5, f"packed recurrent state {i}")
    nxt = torch.randint(0, 50, (2, 3), generator=g)
    cont = model(nxt, state=packed.state)
    assert_close(cont.logits[:1], model(nxt[:1], state=out_a.state).logits, 1e-5, "continuation a")
    assert_close(cont.logits[1:], model(nxt[1:], state=out_b.state).logits, 1e-5, "continuation b")
