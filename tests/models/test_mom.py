"""Mixture-of-Memories: a float64 per-token oracle written from the equations == dense-masked == varlen
(outputs, states, every gradient), decoding, chained states, routing plan, aux losses, accounting."""

import pytest
import torch
import torch.nn.functional as F

from memzoo.models import GatedDeltaNet, LanguageModel, MixtureOfMemories, ModelConfig
from memzoo.models.layers.mom_routing import balance_loss, plan_segments
from memzoo.testing import assert_close

D = 16
TOL = 1e-5


def make(**opts):
    torch.manual_seed(0)
    opts = {"d_model": D, "n_heads": 2, **opts}
    layer = MixtureOfMemories(**opts).double()
    # Random gates that are not near their init so every term of the recurrence matters.
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def twin(layer, path):
    other = MixtureOfMemories(layer.config.__class__(**{**layer.config.__dict__, "path": path})).double()
    other.load_state_dict(layer.state_dict())
    return other


def inputs(B=2, T=11, seed=1):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def reference(layer, x):
    """Token by token: route, convolve each memory's own routed inputs, update only routed memories, read, mix."""
    c = layer.config
    H, K, V, M, W = c.n_heads, c.head_k, c.head_v, c.num_memories, c.conv_size
    B, T, _ = x.shape
    ys, finals = [], []
    for b in range(B):
        S = [x.new_zeros(H, K, V) for _ in range(c.n_slots)]
        hist = [[] for _ in range(c.n_slots)]
        for t in range(T):
            xt = x[b, t]
            probs = torch.softmax(layer.router.weight @ xt, -1)
            top, idx = probs.topk(c.topk)
            chosen = list(zip(idx.tolist(), top / top.sum())) + ([(M, 1.0)] if c.shared_mem else [])
            o = x.new_zeros(H, V)
            for m, w in chosen:
                k_raw, v_raw, rest = (layer.mem_proj[m].T @ xt).split((H * K, H * V, layer.n_gate))
                hist[m].append((layer.q_proj.weight @ xt, k_raw, v_raw))
                streams = []
                for i, conv in enumerate((layer.q_conv, layer.k_conv, layer.v_conv)):
                    if conv is None:
                        streams.append(F.silu(hist[m][-1][i]) if c.update_rule == "gated_delta" else hist[m][-1][i])
                        continue
                    window = [h[i] for h in hist[m][-W:]]
                    acc = sum(conv.weight[:, W - len(window) + j] * u for j, u in enumerate(window))
                    streams.append(F.silu(acc))
                q, k, v = streams[0].view(H, K), streams[1].view(H, K), streams[2].view(H, V)
                if c.update_rule == "gated_delta":
                    beta, a = torch.sigmoid(rest[:H]), rest[H:]
                    alpha = torch.exp(-layer.A_log.exp() * F.softplus(a + layer.dt_bias))  # [H]
                    q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
                    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
                    decayed = alpha[:, None, None] * S[m]
                    err = v - torch.einsum("hkv,hk->hv", decayed, k)
                    S[m] = decayed + beta[:, None, None] * k[:, :, None] * err[:, None, :]
                elif c.update_rule == "gla":
                    alpha = torch.exp(F.logsigmoid(rest.view(H, K)) / c.gate_logit_normalizer)
                    S[m] = alpha[:, :, None] * S[m] + k[:, :, None] * v[:, None, :]
                else:
                    S[m] = S[m] + k[:, :, None] * v[:, None, :]
                o = o + w * torch.einsum("hkv,hk->hv", S[m], q) * K ** -0.5
            gate = None if layer.g_proj is None else (layer.g_proj.weight @ xt).view(H, V)
            ys.append(layer.o_proj(layer.o_norm(o, gate).reshape(-1)))
        finals.append(torch.stack(S))
    return torch.stack(ys).view(B, T, -1), torch.stack(finals)


CONFIGS = [
    pytest.param({}, id="gdn-paper-defaults"),
    pytest.param({"use_short_conv": False, "shared_mem": False}, id="gdn-noconv-noshared"),
    pytest.param({"num_memories": 3, "topk": 3, "conv_size": 2}, id="gdn-k-eq-m"),
    pytest.param({"update_rule": "gla", "num_memories": 3, "topk": 2, "gate_logit_normalizer": 1.0}, id="gla"),
    pytest.param({"update_rule": "linear_attn", "use_gate": False}, id="linear-attn"),
]


def grads(layer, x, y):
    x.grad = None
    layer.zero_grad()
    y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))
    return [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize("opts", CONFIGS)
def test_reference_equals_dense_equals_varlen(opts):
    layer = make(**opts)
    x = inputs().requires_grad_()
    y_ref, s_ref = reference(layer, x)
    g_ref = grads(layer, x, y_ref)
    for path in ("dense", "varlen"):
        other = twin(layer, path)
        y, state = other(x)
        assert_close(y, y_ref, TOL, f"{path} output")
        assert_close(state.memory, s_ref.to(state.memory.dtype), TOL, f"{path} final memories")
        names = ["x"] + [n for n, _ in other.named_parameters()]
        for name, a, b in zip(names, grads(other, x, y), g_ref):
            assert_close(a, b, TOL, f"{path} grad {name}")


@pytest.mark.parametrize("path", ["varlen", "dense"])
@pytest.mark.parametrize("opts", CONFIGS[:4])
def test_prefill_then_decode_equals_forward(path, opts):
    layer = twin(make(**opts), path)
    x = inputs(B=3, T=12)
    y_full, s_full = layer(x)
    y, state = layer(x[:, :5])
    ys = [y]
    with torch.no_grad():
        for t in range(5, 12):
            y_t, state = layer.step(x[:, t], state)
            ys.append(y_t[:, None])
    assert_close(torch.cat(ys, 1), y_full, TOL, "decoded outputs")
    for a, b in zip(state, s_full):
        if a is not None:
            assert_close(a, b, TOL, "decoded state")


@pytest.mark.parametrize("path", ["varlen", "dense"])
@pytest.mark.parametrize("cuts", [(1,), (3,), (4, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9, 10), (10,)], ids=str)
def test_chained_state_any_split(path, cuts):
    layer = twin(make(), path)
    x = inputs(T=11)
    y_full, s_full = layer(x)
    ys, state = [], None
    for a, b in zip((0, *cuts), (*cuts, 11)):
        y, state = layer(x[:, a:b], state)
        ys.append(y)
    assert_close(torch.cat(ys, 1), y_full, TOL, "chained output")
    for a, b in zip(state, s_full):
        assert_close(a, b, TOL, "chained state")


def test_k_equals_m_routes_every_memory():
    layer = make(num_memories=3, topk=3)
    layer(inputs())
    assert torch.equal(layer.last_load, torch.ones(3))


def test_unrouted_memory_keeps_its_initial_state_exactly():
    layer = make(num_memories=4, topk=2)
    with torch.no_grad():
        layer.router.weight.abs_()
        layer.router.weight[3].neg_()
    x = inputs().abs()
    state = layer.init_state(2, dtype=torch.float64)
    state = state._replace(memory=torch.randn_like(state.memory),
                           conv_k=torch.randn_like(state.conv_k))
    for path in ("varlen", "dense"):
        other = twin(layer, path)
        _, new = other(x, state)
        assert other.last_load[3] == 0 and other.last_load[:3].sum() == 2
        assert torch.equal(new.conv_k[:, 3], state.conv_k[:, 3]), path
        if path == "varlen":
            assert torch.equal(new.memory[:, 3], state.memory[:, 3])
        else:
            assert_close(new.memory[:, 3], state.memory[:, 3], 1e-6, "dense frozen memory")
        assert not torch.allclose(new.memory[:, 0], state.memory[:, 0])


def test_no_leak_between_batch_rows():
    layer = make()
    x = inputs(B=3)
    y, _ = layer(x)
    x2 = x.clone()
    x2[0] += torch.randn_like(x2[0])
    y2, _ = layer(x2)
    assert torch.equal(y[1:], y2[1:]) and not torch.allclose(y[0], y2[0])
    y_row, _ = layer(x[1:2])
    assert_close(y[1:2], y_row, TOL, "row alone")


def test_counting_sort_plan():
    # Two sequences [0, 3) and [3, 5), an empty one at the end; M = 3 routed (k = 1) + shared (3).
    sel = torch.tensor([[2, 3], [0, 3], [2, 3], [2, 3], [0, 3]])
    seq = torch.tensor([0, 0, 0, 1, 1])
    plan = plan_segments(sel, seq, torch.tensor([0, 3, 5, 5]), 4)
    # Segments m * 3 + n: m0: (1), (4), () | m1: -, -, - | m2: (0, 2), (3), () | shared: (0,1,2), (3,4), ().
    assert plan.cu_seqlens.tolist() == [0, 1, 2, 2, 2, 2, 2, 4, 5, 5, 8, 10, 10]
    assert plan.src.tolist() == [1, 4, 0, 2, 3, 0, 1, 2, 3, 4]
    assert plan.mem.tolist() == [0, 0, 2, 2, 2, 3, 3, 3, 3, 3]
    assert torch.equal(plan.src[plan.pos], torch.arange(5)[:, None].expand(5, 2))
    assert torch.equal(plan_segments(sel, seq, torch.tensor([0, 3, 5, 5]), 4).src, plan.src)


def test_balance_and_z_loss_by_hand():
    layer = MixtureOfMemories(d_model=4, n_heads=1, num_memories=4, topk=2, z_loss_scale=1e-3)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4))
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0], [0.0, 3.0, 2.0, 0.0], [1.0, 0.0, 0.0, 2.0]])
    layer(logits[None])
    aux = layer.pop_aux_losses()
    # Chosen sets {0,1}, {1,2}, {3,0}: loads (2/3, 2/3, 1/3, 1/3).
    load = torch.tensor([2, 2, 1, 1]) / 3
    assert torch.equal(layer.last_load, load)
    p = torch.softmax(logits, -1).mean(0)
    assert torch.allclose(aux["balance"], 0.01 * 4 * (load * p).sum())
    assert torch.allclose(aux["z_loss"], 1e-3 * torch.logsumexp(logits, -1).square().mean())
    # Uniform probabilities with balanced choices give k, the minimum.
    assert torch.allclose(balance_loss(torch.full((4, 4), 0.25), torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]])),
                          torch.tensor(2.0))


def test_single_memory_without_shared_is_gated_deltanet():
    mom = MixtureOfMemories(d_model=D, n_heads=2, num_memories=1, topk=1, shared_mem=False)
    gdn = GatedDeltaNet(d_model=D, n_heads=2, expand_v=1.0)
    w = mom.mem_proj[0].T.detach()  # [P, D]
    sd = {**{k: v for k, v in mom.state_dict().items() if k not in ("router.weight", "mem_proj")},
          "k_proj.weight": w[:16], "v_proj.weight": w[16:32], "b_proj.weight": w[32:34], "a_proj.weight": w[34:]}
    gdn.load_state_dict(sd)
    x = inputs().float()
    assert_close(mom(x)[0], gdn(x)[0], TOL, "M=1 MoM vs GDN")


@pytest.mark.parametrize("bad", [{"topk": 5}, {"num_memories": 0, "topk": 0}, {"topk": 0},
                                 {"update_rule": "mamba"}, {"path": "loop"}, {"aux_loss_scale": -1.0}])
def test_bad_configs_raise(bad):
    with pytest.raises(ValueError):
        MixtureOfMemories(d_model=D, n_heads=2, **bad)


def test_accounting():
    layer = MixtureOfMemories(d_model=64, n_heads=4, num_memories=4, topk=2)
    H, K = 4, 16
    per_memory = 64 * (H * K + H * K + 2 * H)
    shared = 64 * 4 + 64 * H * K + 5 * per_memory + 2 * H + 3 * 4 * H * K + 64 * H * K + K + H * K * 64
    assert layer.num_activated_parameters() == shared - 2 * per_memory
    assert sum(p.numel() for p in layer.parameters()) == shared
    assert layer.state_size() == 5 * H * K * K


def test_language_model_collects_balance_loss():
    model = LanguageModel(ModelConfig(vocab_size=32, d_model=32, n_layers=2, pattern=("mom",)))
    ids = torch.randint(0, 32, (2, 9))
    out = model(ids, labels=ids)
    assert set(out.aux_losses) == {"layers.0.balance", "layers.1.balance"}
    out.loss.backward()
    assert model.mixers[0].router.weight.grad.abs().sum() > 0


def test_extra_flops_count_the_routed_and_shared_memories():
    from memzoo.models.layers.gated_delta import chunked_memory_flops

    layer = MixtureOfMemories(d_model=32, n_heads=2, num_memories=4, topk=2, chunk_size=16)
    one = chunked_memory_flops(2, 16, 16, 16, 64, wy=True)
    assert layer.extra_flops_per_token(64) == 3 * one
    alone = MixtureOfMemories(d_model=32, n_heads=2, num_memories=4, topk=1, shared_mem=False, update_rule="gla",
                              chunk_size=16)
    assert alone.extra_flops_per_token(64) == chunked_memory_flops(2, 16, 16, 16, 64)
