"""TitansMemory layer: a float64 oracle written here from the paper's equations (inner gradients by autograd, not
the hand-derived formulas of the kernels), decoding == forward across chunk boundaries, and regression tests for
the pitfalls of public implementations listed in the spec (titans.md §9)."""

import pytest
import torch
import torch.nn.functional as F

from memzoo.models import build_mixer
from memzoo.models.layers.titans import NeuralMemory, TitansConfig, TitansMemory
from memzoo.testing import assert_close

D = 32


def make(seed=0, **opts):
    torch.manual_seed(seed)
    return build_mixer("titans", D, {"n_heads": 2, **opts}).eval()


def seq(B=2, T=21, seed=1, dtype=torch.float32):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def memory_fn(layer, weights, x):
    """M_W(x) per head: x [H, D] -> [H, D]."""
    if layer.config.mem_depth == 1:
        (w,) = weights
        return torch.einsum("hk,hkv->hv", x, w)
    a1, a2 = weights
    z = torch.einsum("he,hed->hd", F.gelu(torch.einsum("hd,hde->he", x, a2)), a1)
    return x + F.layer_norm(z, (z.shape[-1],), eps=1e-5)


def inner_loss(c, r):
    """The attentional bias whose gradient the memory follows: Titans' 1/2 ||r||^2 or a Miras loss (spec §5)."""
    if c.error_map == "lp":
        # ||r||_p^p with |r| smoothed to sqrt(r^2 + eps); its gradient is the lp error map.
        return (r * r + c.lp_eps).pow(c.error_p / 2).sum()
    if c.error_map == "huber":
        a = r.abs()
        return torch.where(a <= c.huber_delta, 0.5 * r * r, c.huber_delta * (a - 0.5 * c.huber_delta)).sum()
    return 0.5 * r.pow(2).sum()


def retain(c, w):
    """The Miras retention at a chunk boundary, per head ([H, rows, cols])."""
    if c.retention == "lq":
        return w / ((w.abs() ** c.retention_q).sum((1, 2), keepdim=True) + c.lq_eps) ** (1 - 2 / c.retention_q)
    if c.retention == "kl":
        e = torch.where(w > c.kl_eps, w, torch.full_like(w, c.kl_eps)) ** (1 - c.kl_lambda)
        return c.kl_scale * e / e.sum(-1, keepdim=True)
    return w


def oracle(layer, x):
    """Eqs 13-15 token by token in float64, per sequence of ``x`` [B, T, D]."""
    B, T, _ = x.shape
    H, Dh, b = layer.n_heads, layer.head_dim, layer.config.chunk_size
    convs = (layer.q_conv, layer.k_conv, layer.v_conv)
    q, k, v = (conv(proj(x))[0] if conv is not None else F.silu(proj(x))
               for proj, conv in zip((layer.q_proj, layer.k_proj, layer.v_proj), convs))
    # The layer's l2 norm (shared with Gated DeltaNet): x / sqrt(|x|^2 + 1e-6).
    q, k = (y.view(B, T, H, Dh) / (y.view(B, T, H, Dh).pow(2).sum(-1, keepdim=True) + 1e-6).sqrt() for y in (q, k))
    v = v.view(B, T, H, Dh)
    theta, log_eta, log_gamma = (g.to(x.dtype) for g in layer.gates(x))
    eta, gamma = log_eta.exp(), log_gamma.exp()
    outs = torch.zeros(B, T, H, Dh, dtype=x.dtype)
    for n in range(B):
        weights = [w.detach().clone() for w in layer.mem_init]
        momenta = [torch.zeros_like(w) for w in weights]
        base = [w.clone() for w in weights]
        for t in range(T):
            # Surprise: the gradient of the associative loss at the chunk-start weights.
            leaves = [w.clone().requires_grad_() for w in base]
            with torch.enable_grad():
                loss = inner_loss(layer.config, memory_fn(layer, leaves, k[n, t]) - v[n, t])
                grads = torch.autograd.grad(loss, leaves)
            for i, grad in enumerate(grads):
                lr = theta[n, t, :, min(i, theta.shape[-1] - 1)]
                # MLP order: mem_init = (A1, A2), theta = (theta1, theta2).
                g_shape = gamma[n, t].view(H, -1, 1) if gamma.dim() == 4 else gamma[n, t].view(H, 1, 1)
                momenta[i] = eta[n, t].view(H, 1, 1) * momenta[i] - lr.view(H, 1, 1) * grad
                weights[i] = g_shape * weights[i] + momenta[i]
            outs[n, t] = memory_fn(layer, weights, q[n, t])
            if (t + 1) % b == 0:
                weights = [retain(layer.config, w) for w in weights]
                base = [w.clone() for w in weights]
    gate = None if layer.g_proj is None else layer.g_proj(x).view(B, T, H, Dh)
    return outs, layer.o_proj(layer.o_norm(outs, gate).reshape(B, T, H * Dh))


@pytest.mark.parametrize("opts", [
    {"mem_depth": 1, "chunk_size": 4},
    {"mem_depth": 1, "chunk_size": 16, "alpha_shape": "head"},
    {"mem_depth": 2, "chunk_size": 4},
    {"mem_depth": 2, "chunk_size": 16, "per_matrix_lr": False, "momentum": False},
    {"mem_depth": 1, "chunk_size": 4, "error_map": "lp", "error_p": 3.0, "retention": "lq"},
    {"mem_depth": 1, "chunk_size": 5, "error_map": "huber", "huber_delta": 0.05, "retention": "kl", "kl_lambda": 0.3},
    {"mem_depth": 2, "chunk_size": 4, "error_map": "lp", "error_p": 1.5, "retention": "lq", "retention_q": 3.0},
    {"mem_depth": 2, "chunk_size": 3, "error_map": "huber", "huber_delta": 0.1},
], ids=["linear_b4", "linear_b16_head", "mlp_b4", "mlp_b16_shared_nomom", "linear_lp_lq", "linear_huber_kl",
        "mlp_lp_lq", "mlp_huber"])
def test_layer_equals_float64_oracle(opts):
    layer = make(**opts).double()
    # Stronger gates than the init so every term of the recurrence matters.
    with torch.no_grad():
        layer.theta_bias.fill_(0.5)
        if layer.alpha_bias is not None:
            layer.alpha_bias.fill_(-1.5)
    x = seq(T=21, dtype=torch.float64)
    seen = []
    layer.o_norm.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    y, _ = layer(x)
    with torch.no_grad():
        o_ref, y_ref = oracle(layer, x)
    # The memory read itself to fp64 precision; the gated RMSNorm after it runs in fp32 by design.
    assert_close(seen[0], o_ref, 1e-10, "memory read vs oracle")
    assert_close(y, y_ref, 1e-6, "layer vs oracle")


@pytest.mark.parametrize("opts", [
    {"mem_depth": 1}, {"mem_depth": 2},
    {"mem_depth": 1, "error_map": "huber", "huber_delta": 0.1, "retention": "kl"},
    {"mem_depth": 2, "error_map": "lp", "retention": "lq"},
], ids=["linear", "mlp", "linear_huber_kl", "mlp_lp_lq"])
def test_prefill_then_decode_equals_forward(opts):
    layer, x = make(**opts), seq(T=40)
    y_full, s_full = layer(x)
    y_pre, state = layer(x[:, :19])
    ys = [y_pre]
    for t in range(19, 40):
        y_t, state = layer.step(x[:, t], state)
        ys.append(y_t[:, None])
    assert_close(torch.cat(ys, 1), y_full, 1e-5, "decode")
    assert torch.equal(state.pos, s_full.pos) and int(state.pos[0]) == 40 % 16
    for a, b in zip(state.memory, s_full.memory):
        assert_close(a, b, 1e-5, "memory")


def test_gradient_base_resets_every_chunk():
    """Pitfall: a base that never resets within a call.  After 20 tokens at b = 16 the base is W_16."""
    layer, x = make(mem_depth=1), seq(T=20)
    _, s16 = layer(x[:, :16])
    _, s20 = layer(x)
    assert torch.equal(s16.pos, torch.zeros(2, dtype=torch.int64))
    assert_close(s20.memory[0], s16.memory[1], 1e-6, "base after 20 tokens")
    assert not torch.allclose(s20.memory[0], s20.memory[1])


def test_short_sequence_and_single_token_update_the_memory():
    """Pitfall: a sequence shorter than a chunk got no update; single tokens needed special-casing."""
    for T in (1, 3):
        layer, x = make(mem_depth=1), seq(T=T)
        _, state = layer(x)
        w0 = layer.mem_init[0].detach()
        assert not torch.allclose(state.memory[1], w0.expand_as(state.memory[1]))


def test_token_level_reads_and_causality():
    """Pitfall: reads from per-chunk snapshots.  y_t must see token t's own write (t mid-chunk) and nothing later."""
    layer, x = make(mem_depth=1, use_short_conv=False), seq(B=1, T=16)
    y, _ = layer(x)
    # Token 5 is read after its own write: changing its value input (only) changes its output...
    x2 = x.clone()
    x2[:, 5] += torch.randn(D)
    y2, _ = layer(x2)
    assert not torch.allclose(y2[:, 5], y[:, 5])
    # ...and never an earlier output.
    assert torch.equal(y2[:, :5], y[:, :5])


def test_components_are_present():
    """Pitfall: missing conv / SiLU / output norm + gate (the l2 q/k norm is pinned by the oracle test)."""
    layer = make()
    for conv in (layer.q_conv, layer.k_conv, layer.v_conv):
        assert conv is not None and conv.activation == "silu" and conv.kernel_size == 4
    assert layer.g_proj is not None
    # The gate really acts: zeroing its projection changes the output.
    x = seq()
    y, _ = layer(x)
    with torch.no_grad():
        layer.g_proj.weight.zero_()
    assert not torch.allclose(layer(x)[0], y)


def test_defaults_and_state_size():
    layer = make()
    c = layer.config
    assert (c.mem_depth, c.mem_expansion, c.chunk_size, c.per_matrix_lr) == (2, 4, 16, True)
    dh = D // 2
    assert layer.state_size() == 2 * 2 * dh * 4 * dh
    assert layer.state_size_with_optimizer() == 2 * layer.state_size()
    linear = make(mem_depth=1)
    assert linear.state_size() == 2 * dh * dh and linear.config.channel_alpha
    assert NeuralMemory is TitansMemory


@pytest.mark.parametrize("opts,match", [
    ({"mem_depth": 3}, "mem_depth"),
    ({"mem_depth": 2, "alpha_shape": "channel"}, "channel"),
    ({"mem_depth": 2, "init": "zero"}, "init"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"theta_max": 0.0}, "theta_max"),
    ({"impl": "cuda"}, "impl"),
    ({"error_map": "l1"}, "error_map"),
    ({"retention": "l1"}, "retention"),
    ({"error_map": "lp", "error_p": 0.5}, "p >= 1"),
    ({"error_map": "huber", "huber_delta": 0.0}, "huber_delta"),
    ({"retention": "lq", "retention_q": 1.0}, "q > 1"),
    ({"retention": "kl", "kl_lambda": 1.0}, "kl"),
    ({"mem_depth": 2, "retention": "kl"}, "mem_depth=1"),
    ({"mem_depth": 1, "impl": "triton", "error_map": "lp"}, "triton"),
])
def test_config_errors(opts, match):
    with pytest.raises(ValueError, match=match):
        TitansConfig(d_model=D, **opts)


@pytest.mark.parametrize("depth", [1, 2])
def test_read_is_the_forward_read_out_at_the_state_weights(depth):
    # The last token's read-out in the op is M*_{W_T}(q_T): read() at weights(final state) must reproduce it.
    from memzoo.kernels.titans import titans_linear, titans_mlp

    torch.manual_seed(0)
    mem = TitansMemory(d_model=16, n_heads=2, mem_depth=depth, chunk_size=4)
    B, T, H, D = 2, 7, 2, 8
    q, k, v = (F.normalize(torch.randn(B, T, H, D), dim=-1) for _ in range(3))
    theta, log_eta, log_gamma = torch.rand(B, T, H) * 0.1, -torch.rand(B, T, H), -0.1 * torch.rand(B, T, H)
    state = mem.init_state(B)
    start = torch.zeros(B, dtype=torch.int64)
    if depth == 1:
        o, memory = titans_linear(q, k, v, theta, log_eta, log_gamma, state.memory, start, 4)
    else:
        o, memory = titans_mlp(q, k, v, theta, theta, log_eta, log_gamma, state.memory, start, 4)
    weights = mem.weights(state._replace(memory=memory))
    assert_close(mem.read(q[:, -1:], weights), o[:, -1:], 1e-5, "read-out")
    with pytest.raises(ValueError, match="weights must hold"):
        mem.read(q, weights + weights)
