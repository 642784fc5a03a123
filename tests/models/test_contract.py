"""The layer contract, checked for every registered mixer (a new layer gets this suite for free).

Each mixer is tested at its defaults (only d_model is set) and in the variants listed in
VARIANTS.  Everything runs in float32 on CPU with small shapes.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memzoo.models import MIXERS, build_mixer, detach_state, index_state
from memzoo.models.contract import state_spec
from memzoo.models.state import state_batch_size, state_leaves
from memzoo.testing import assert_close, assert_states_close

D = 32
TOL = 1e-5

# Extra configurations worth the whole suite: name -> {variant id: mixer options}.
VARIANTS = {
    "attention": {
        "gqa": {"n_heads": 4, "n_kv_heads": 2},
        "mqa_window": {"n_heads": 4, "n_kv_heads": 1, "window": 5},
        "window1": {"n_heads": 2, "window": 1},
        "norope_dhead": {"n_heads": 2, "d_head": 8, "rope_theta": None},
    },
    "gated_delta": {
        "no_conv": {"use_short_conv": False},
        "no_gate_chunk16": {"use_gate": False, "n_heads": 2, "d_head": 8, "expand_v": 1.5, "chunk_size": 16},
        "conv2": {"conv_size": 2, "n_heads": 2},
    },
    "gla": {
        "short_conv": {"use_short_conv": True},
        "no_gate_chunk16": {"use_gate": False, "n_heads": 2, "expand_k": 1.0, "chunk_size": 16},
        "conv3": {"use_short_conv": True, "conv_size": 3, "gate_low_rank_dim": 4, "gate_logit_normalizer": 1.0},
    },
    "s4d": {
        "lin_bilinear": {"init": "lin", "disc": "bilinear", "d_state": 8},
        "legs": {"init": "legs", "d_state": 16},
        "real": {"init": "real", "d_state": 4},
    },
    "lssl": {
        "legt_zoh": {"measure": "legt", "disc": "zoh", "d_state": 8},
        "learn_a": {"learn_a": True, "d_state": 4},
    },
    "titans": {
        "linear_b4": {"mem_depth": 1, "chunk_size": 4},
        "linear_head_alpha_nomom": {"mem_depth": 1, "alpha_shape": "head", "momentum": False, "chunk_size": 5},
        "mlp_b3_shared_lr": {"chunk_size": 3, "per_matrix_lr": False, "mem_expansion": 2, "use_short_conv": False},
        "linear_b4_lp_kl": {"mem_depth": 1, "chunk_size": 4, "error_map": "lp", "retention": "kl", "kl_lambda": 0.2},
    },
    "mom": {
        "dense_gla": {"path": "dense", "update_rule": "gla", "n_heads": 2},
        "k_eq_m_no_shared": {"num_memories": 3, "topk": 3, "shared_mem": False, "conv_size": 2},
        "linear_attn_no_conv": {"update_rule": "linear_attn", "use_short_conv": False, "num_memories": 2, "topk": 1},
    },
    "titans_mac": {"seg4_linear": {"segment_len": 4, "n_persistent": 3, "memory": {"mem_depth": 1, "chunk_size": 3}}},
    "titans_mag": {"win5_b4_primed": {"window": 5, "n_persistent": 2, "prime_memory": True,
                                      "memory": {"chunk_size": 4, "mem_expansion": 2}}},
    "titans_mal": {"win3_linear": {"window": 3, "n_persistent": 1, "memory": {"mem_depth": 1, "chunk_size": 5}}},
}

CASES = [pytest.param(name, {}, id=f"{name}-default") for name in MIXERS] + [
    pytest.param(name, opts, id=f"{name}-{vid}") for name, vs in VARIANTS.items() for vid, opts in vs.items()
]


def make(name, opts):
    torch.manual_seed(0)
    return build_mixer(name, D, opts).eval()


def seq(B=2, T=13, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g)


def check_split(layer, x, cuts):
    """Feeding x in pieces cut at ``cuts`` (carrying the state) == one full pass, outputs and state."""
    y_full, s_full = layer(x)
    bounds = [0, *cuts, x.shape[1]]
    ys, state = [], None
    for a, b in zip(bounds[:-1], bounds[1:]):
        y, state = layer(x[:, a:b], state)
        ys.append(y)
    assert_close(torch.cat(ys, 1), y_full, TOL, f"output split at {list(cuts)}")
    assert_states_close(state, s_full, TOL, f"state split at {list(cuts)}")


def test_every_variant_is_registered():
    assert set(VARIANTS) <= set(MIXERS)


@pytest.mark.parametrize("name,opts", CASES)
class TestContract:
    def test_shape_dtype_and_state_batch(self, name, opts):
        layer, x = make(name, opts), seq()
        y, state = layer(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert torch.isfinite(y).all()
        assert state_batch_size(state) == x.shape[0]
        # The output really depends on the input (a constant layer would pass the rest).
        y2, _ = layer(x + 1.0)
        assert not torch.allclose(y, y2)

    @pytest.mark.parametrize("splits", [(1,), (6,), (12,), (3, 7), (1, 2, 3, 5)], ids=str)
    def test_chained_equals_full(self, name, opts, splits):
        check_split(make(name, opts), seq(T=13), splits)

    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(cuts=st.lists(st.integers(1, 16), min_size=1, max_size=4, unique=True))
    def test_any_split_equals_full(self, name, opts, cuts):
        check_split(make(name, opts), seq(B=1, T=17, seed=4), sorted(cuts))

    def test_step_equals_forward(self, name, opts):
        layer, x = make(name, opts), seq(T=9)
        y_full, s_full = layer(x)
        state = layer.init_state(x.shape[0], device=x.device, dtype=x.dtype)
        ys = []
        for t in range(x.shape[1]):
            y_t, state = layer.step(x[:, t], state)
            assert y_t.shape == (x.shape[0], D)
            ys.append(y_t)
        assert_close(torch.stack(ys, 1), y_full, TOL, "step output")
        assert_states_close(state, s_full, TOL, "step final state")

    def test_state_none_equals_init_state(self, name, opts):
        layer, x = make(name, opts), seq()
        y0, s0 = layer(x)
        y1, s1 = layer(x, layer.init_state(x.shape[0], device=x.device, dtype=x.dtype))
        assert_close(y1, y0, TOL, "output")
        assert_states_close(s1, s0, TOL, "state")

    def test_gradients_finite_and_flow_through_state(self, name, opts):
        layer, x = make(name, opts), seq(T=10)
        layer.train()
        x = x.requires_grad_()
        y1, state = layer(x[:, :4])
        y2, _ = layer(x[:, 4:], state)
        y2.square().sum().backward()
        grads = [p.grad for p in layer.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        assert torch.isfinite(x.grad).all()
        # The second segment reads the first through the state, so the first segment's inputs get
        # gradient, unless the layer carries no state at all (e.g. a window of one token).
        assert bool(x.grad[:, :4].abs().sum() > 0) == (layer.state_size(64) > 0)

    def test_detach_state(self, name, opts):
        layer, x = make(name, opts), seq()
        layer.train()
        _, state = layer(x.requires_grad_())
        detached = detach_state(state)
        for a, b in zip(state_leaves(detached), state_leaves(state)):
            assert a.grad_fn is None and torch.equal(a, b)

    def test_index_state_reorders_rows(self, name, opts):
        layer, x = make(name, opts), seq(B=3, T=10)
        y, state = layer(x[:, :6])
        order = torch.tensor([2, 0, 1])
        y_a, _ = layer(x[order, 6:], index_state(state, order))
        y_b, _ = layer(x[:, 6:], state)
        assert_close(y_a, y_b[order], TOL, "reordered continuation")

    def test_reset_state_rows_start_fresh(self, name, opts):
        layer, x = make(name, opts), seq(B=2, T=11)
        _, state = layer(x[:, :6])
        state = layer.reset_state(state, torch.tensor([True, False]))
        y, _ = layer(x[:, 6:], state)
        y_fresh, _ = layer(x[:1, 6:])
        y_kept, _ = layer(x[1:], None)
        assert_close(y[:1], y_fresh, TOL, "reset row")
        assert_close(y[1:], y_kept[:, 6:], TOL, "kept row")

    def test_packed_equals_separate(self, name, opts):
        layer = make(name, opts)
        lengths = [5, 0, 8, 1]
        x = seq(B=1, T=sum(lengths))
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        y, state = layer(x, cu_seqlens=cu)
        assert y.shape == x.shape and state_batch_size(state) == len(lengths)
        more = seq(B=len(lengths), T=3, seed=7)
        y_next, _ = layer(more, state)
        for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            s = None
            if b > a:
                y_i, s = layer(x[:, a:b])
                assert_close(y[:, a:b], y_i, TOL, f"packed sequence {i}")
            # The per-sequence final state continues exactly like the separately computed one.
            y_i_next, _ = layer(more[i:i + 1], s)
            assert_close(y_next[i:i + 1], y_i_next, TOL, f"continuation of sequence {i}")

    def test_bf16_forward(self, name, opts):
        layer, x = make(name, opts), seq()
        y32, _ = layer(x)
        y16, state = layer.to(torch.bfloat16)(x.bfloat16())
        assert y16.dtype == torch.bfloat16
        assert_close(y16.float(), y32, 5e-2, "bf16 output")

    def test_state_size(self, name, opts):
        layer = make(name, opts)
        n = layer.state_size(64)
        assert isinstance(n, int) and n >= 0
        leaves = state_leaves(layer(seq(B=1, T=64))[1])
        floats = sum(t.numel() for t in leaves if t.is_floating_point())
        # state_size counts the memory floats; the state may hold more (integer positions,
        # optimizer momentum, short-conv tails), never less; 0 only for a state that holds no floats
        # (attention with window 1 keeps no past keys).
        assert n <= floats and (n > 0 or floats == 0)
        try:
            bounded = layer.state_size(None)
        except ValueError:
            # An unbounded state (a KV cache without a window) grows with the sequence.
            assert layer.state_size(128) > n
        else:
            # A bounded state never exceeds its bound and reaches it on long inputs (a window fills up).
            assert n <= bounded == layer.state_size(1 << 20)

    def test_bad_inputs_raise(self, name, opts):
        layer, x = make(name, opts), seq()
        with pytest.raises(ValueError, match="x must have shape"):
            layer(x[0])
        with pytest.raises(ValueError, match="d_model"):
            layer(torch.randn(2, 5, D + 1))
        with pytest.raises(TypeError, match="floating-point"):
            layer(torch.ones(2, 5, D, dtype=torch.int64))
        with pytest.raises(ValueError, match="at least one token"):
            layer(x[:, :0])
        _, state = layer(x)
        with pytest.raises(ValueError, match="batch size"):
            layer(x[:1], state)
        with pytest.raises(ValueError, match="x_t must have shape"):
            layer.step(x, state)
        with pytest.raises(ValueError, match="B=1"):
            layer(x, cu_seqlens=torch.tensor([0, 5, 13]))
        with pytest.raises(ValueError, match="end at the sequence length"):
            layer(x[:1], cu_seqlens=torch.tensor([0, 5, 12]))
        with pytest.raises(TypeError, match="cu_seqlens"):
            layer(x[:1], cu_seqlens=torch.tensor([0.0, 13.0]))

    def test_step_none_equals_init_state(self, name, opts):
        layer, x = make(name, opts), seq(T=3)
        y0, s0 = layer.step(x[:, 0], None)
        y1, s1 = layer.step(x[:, 0], layer.init_state(x.shape[0], device=x.device, dtype=x.dtype))
        assert_close(y0, y1, TOL, "step output from None")
        assert_states_close(s0, s1, TOL, "step state from None")
        # And the state it returns continues like any other.
        y0, _ = layer.step(x[:, 1], s0)
        y1, _ = layer.step(x[:, 1], s1)
        assert_close(y0, y1, TOL, "second step")

    def test_single_token_forward_equals_step(self, name, opts):
        layer, x = make(name, opts), seq(T=1)
        y, state = layer(x)
        y_t, state_t = layer.step(x[:, 0], None)
        assert y.shape == x.shape
        assert_close(y[:, 0], y_t, TOL, "T=1 forward vs step")
        assert_states_close(state, state_t, TOL, "T=1 state")

    def test_empty_batch_rejected(self, name, opts):
        # Documented choice (memzoo/models/contract.py): B = 0 is refused, never silently mixed.
        layer, x = make(name, opts), seq()
        with pytest.raises(ValueError, match=r"x must hold at least one sequence \(B >= 1\)"):
            layer(x[:0])
        with pytest.raises(ValueError, match=r"x_t must hold at least one sequence \(B >= 1\)"):
            layer.step(x[:0, 0], None)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64, torch.float16], ids=str)
    def test_input_dtype_must_match_weights(self, name, opts, dtype):
        layer, x = make(name, opts), seq()
        with pytest.raises(TypeError, match=rf"x must have the dtype of \w+'s weights \(torch.float32\), got {dtype}"):
            layer(x.to(dtype))
        with pytest.raises(TypeError, match=rf"x_t must have the dtype of .*got {dtype}"):
            layer.step(x[:, 0].to(dtype), None)

    def test_foreign_states_rejected(self, name, opts, foreign_states):
        layer, x = make(name, opts), seq()
        for other, state in foreign_states.items():
            if other == name:
                continue
            with pytest.raises(ValueError, match=r"^state(\.\w+)* must be .* for this"):
                layer(x, state)
            with pytest.raises(ValueError, match=r"^state(\.\w+)* must be .* for this"):
                layer.step(x[:, 0], state)

    def test_state_of_another_width_rejected(self, name, opts):
        layer, x = make(name, opts), seq()
        state = build_mixer(name, 2 * D, opts).init_state(x.shape[0])
        if state_spec(state) == layer.state_spec():
            # A fixed d_head makes the state independent of d_model: it is a valid state of this layer.
            layer(x, state)
            return
        with pytest.raises(ValueError, match=r"^state[\w.\[\]]+ must be a float tensor \[B, .* for this"):
            layer(x, state)

    def test_state_helpers_and_devices_checked(self, name, opts):
        layer, x = make(name, opts), seq()
        with pytest.raises(ValueError, match=r"batch_size must be an int >= 1, got 0"):
            layer.init_state(0)
        state = layer.init_state(2)
        with pytest.raises(ValueError, match=r"mask must be a bool tensor \[B=2\], got list"):
            layer.reset_state(state, [True, False])
        with pytest.raises(ValueError, match=r"state must be a state of this \w+ .*got None"):
            layer.reset_state(None, torch.tensor([True, False]))
        with pytest.raises(ValueError, match=r"x is on meta, but \w+'s weights are on cpu"):
            layer(x.to("meta"))
        with pytest.raises(ValueError, match=r"state is on meta, but the input is on cpu"):
            layer.step(x[:, 0], layer.init_state(2, device="meta"))


@pytest.fixture(scope="module")
def foreign_states():
    """A fresh state (B = 2) of every registered mixer at its defaults."""
    torch.manual_seed(0)
    return {name: build_mixer(name, D).init_state(2) for name in MIXERS}


def test_titans_mal_state_refused_by_titans_mag():
    # Same fields and shapes, different layers: the state types tell them apart.
    mag, mal, x = make("titans_mag", {}), make("titans_mal", {}), seq()
    _, state = mal(x)
    with pytest.raises(ValueError, match="state must be a TitansMAGState for this TitansMAG.*got TitansMALState"):
        mag(x, state)


def test_variant_state_refused_by_other_variant():
    # A gated_delta state without short conv has no tails: the layer with convs names the first field it lacks.
    plain, no_conv, x = make("gated_delta", {}), make("gated_delta", {"use_short_conv": False}), seq()
    with pytest.raises(ValueError, match=r"state\.conv_q must be a float tensor \[B, 3, 32\].*got NoneType"):
        plain(x, no_conv(x)[1])
    with pytest.raises(ValueError, match=r"state\.conv_q must be None"):
        no_conv(x, plain(x)[1])


@pytest.mark.parametrize("name", list(MIXERS))
def test_autocast_input_accepted(name):
    # Under autocast a bf16 input to fp32 weights is the documented way to mix precisions.
    layer, x = make(name, {}), seq()
    y32, _ = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer(x.bfloat16())
    assert torch.isfinite(y.float()).all()
    assert_close(y.float(), y32, 1e-1, "autocast output")
