"""LongMem (arXiv 2306.07174): freezing, SideNet init, the memory-augmented attention against a dense oracle,
segment causality, batch-row isolation, resets, streaming against hand-built attention, chaining and generation.

The bank's own invariants (ring buffer, exact top-k, row isolation of ``search``) live in tests/kernels and
tests/memory; these tests exercise the model around it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from memzoo.memory.bank import KVMemoryBank, Retrieved
from memzoo.models import LanguageModel, ModelConfig
from memzoo.models.layers.attention import Attention
from memzoo.models.layers.memory_attention import MemoryAugmentedAttention, memory_attention
from memzoo.models.rope import apply_rope
from memzoo.models.wrappers import LongMem, LongMemConfig, LongMemState
from memzoo.models.wrappers.longmem import SideNet

V, S = 64, 8


pytestmark = pytest.mark.usefixtures("one_thread")


def backbone(n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, pattern=("attention",), seed=0):
    torch.manual_seed(seed)
    mixers = {"attention": {"n_heads": n_heads, "n_kv_heads": n_kv_heads}} if "attention" in pattern else {}
    cfg = ModelConfig(vocab_size=V, d_model=d_model, n_layers=n_layers, pattern=pattern, mixers=mixers, d_ff=64)
    return LanguageModel(cfg)


def longmem(dtype=torch.float64, gate=None, **kw):
    kw = {"segment_len": S, "capacity": 64, "chunk_size": 4, "n_chunks": 4, **kw}
    model = LongMem(backbone(), LongMemConfig(**kw)).to(dtype)
    if gate is not None:
        with torch.no_grad():
            model.side.memory_attention.gate.copy_(torch.as_tensor(gate))
    return model


def ids(B=2, T=3 * S, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def causal_rope_attention(mixer, xn):
    """Dense A_loc ``[B, H, T, d]`` from the equations (rotated q/k, causal softmax, GQA by repetition)."""
    B, T, _ = xn.shape
    H, H_kv, d = mixer.n_heads, mixer.n_kv_heads, mixer.d_head
    pos = torch.arange(T)[None]
    q = apply_rope(mixer.q_proj(xn).view(B, T, H, d), pos, mixer.config.rope_theta).transpose(1, 2)
    k = apply_rope(mixer.k_proj(xn).view(B, T, H_kv, d), pos, mixer.config.rope_theta).transpose(1, 2)
    v = mixer.v_proj(xn).view(B, T, H_kv, d).transpose(1, 2)
    k, v = k.repeat_interleave(H // H_kv, 1), v.repeat_interleave(H // H_kv, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


def dense_memory_layer(mixer, xn, mem_k, mem_v):
    """The memory layer by hand, every query attending over all of ``mem_k``/``mem_v`` ``[B, H_kv, N, d]``."""
    B, T, _ = xn.shape
    H, H_kv, d = mixer.n_heads, mixer.n_kv_heads, mixer.d_head
    a_loc = causal_rope_attention(mixer, xn)
    q = mixer.q_proj(xn).view(B, T, H, d).transpose(1, 2)  # un-rotated
    k, v = mem_k.repeat_interleave(H // H_kv, 1), mem_v.repeat_interleave(H // H_kv, 1)
    a_mem = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1) @ v
    g = torch.sigmoid(mixer.gate)[None, :, None, None]
    o = (1 - g) * a_loc + g * a_mem
    return mixer.o_proj(o.transpose(1, 2).reshape(B, T, H * d))


def backbone_states(model, x):
    """H^0..H^L and the layer-m k/v ``[B, H_kv, T, d]`` of one segment, computed without hooks."""
    bb = model.backbone
    h = bb.embed(x)
    hidden = [h]
    for j, block in enumerate(bb.blocks):
        if j == model.memory_layer:
            xn = block.mixer_norm(h)
            B, T, _ = xn.shape
            k = block.mixer.k_proj(xn).view(B, T, model.n_kv_heads, model.d_head).transpose(1, 2)
            v = block.mixer.v_proj(xn).view(B, T, model.n_kv_heads, model.d_head).transpose(1, 2)
        h, _ = block(h)
        hidden.append(h)
    return hidden, k, v


# ---------------------------------------------------------------------------------------------------- freezing


def test_backbone_and_head_get_no_grads_and_do_not_change():
    model = longmem(torch.float32)
    model.train()
    assert not model.backbone.training and model.side.training
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    side_ids = {id(p) for p in model.side.parameters()}
    opt_ids = {id(p) for group in opt.param_groups for p in group["params"]}
    assert opt_ids == side_ids
    assert not opt_ids & {id(p) for p in model.backbone.parameters()}
    side_before = [p.detach().clone() for p in model.side.parameters()]
    x = ids(T=3 * S)
    gate = model.side.memory_attention.gate
    for _ in range(2):
        out = model(x, labels=x)
        out.loss.backward()
        assert gate.grad is not None and gate.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad(set_to_none=False)
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.backbone.lm_head.weight.grad is None
    assert not any(p.requires_grad for p in model.backbone.parameters())
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(p, q) for p, q in zip(model.side.parameters(), side_before))
    assert model.added_parameters() == sum(p.numel() for p in model.trainable_parameters())
    assert model.num_parameters() == model.added_parameters() + model.backbone.num_parameters()


def test_hooks_are_removed_and_backbone_usable_alone():
    model = longmem()
    model(ids())
    bb = model.backbone
    modules = [bb.blocks[0], *bb.blocks, bb.blocks[model.memory_layer].mixer.k_proj]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)
    out = bb(ids())
    assert out.logits.shape == (2, 3 * S, V)


# ---------------------------------------------------------------------------------------------------- init


@pytest.mark.parametrize(("n_layers", "reduction", "memory_layer", "sources", "memory_index"), [
    (4, 2, None, [1, 3], 1),
    (4, 2, 0, [0, 3], 0),
    (5, 2, 2, [1, 2, 4], 1),
    (6, 3, None, [2, 4], 1),
    (10, 2, None, [1, 3, 5, 7, 9], 3),
], ids=["L4-default", "L4-m0", "L5-ceil", "L6-r3", "L10-default-m7"])
def test_side_layers_start_as_backbone_layers(n_layers, reduction, memory_layer, sources, memory_index):
    bb = backbone(n_layers=n_layers, d_model=16, n_heads=2, n_kv_heads=1)
    model = LongMem(bb, segment_len=S, capacity=16, memory_layer=memory_layer, reduction=reduction)
    m = model.memory_layer
    assert model.side.memory_index == memory_index == m // reduction
    if memory_layer is None:
        assert m == min(round(0.7 * n_layers), n_layers - 1)
    assert model.side.sources == sources and sources[memory_index] == m
    assert len(model.side.blocks) == math.ceil(n_layers / reduction)
    for i, src in enumerate(sources):
        side = model.side.blocks[i].state_dict()
        ref = bb.blocks[src].state_dict()
        if i == memory_index:
            assert isinstance(model.side.blocks[i].mixer, MemoryAugmentedAttention)
            assert set(side) - set(ref) == {"mixer.gate"}
        assert all(torch.equal(side[k], ref[k]) for k in ref)
        # Copies, not shared tensors.
        assert all(p.data_ptr() != q.data_ptr() for p, q in zip(model.side.blocks[i].parameters(),
                                                                  bb.blocks[src].parameters()))
    assert torch.equal(model.side.norm.weight, bb.norm.weight)
    assert model.side.norm.weight is not bb.norm.weight


def test_gate_starts_at_half():
    model = longmem()
    gate = model.side.memory_attention.gate
    assert torch.equal(torch.sigmoid(gate), torch.full_like(gate, 0.5))
    model(ids(T=2 * S))
    stats = model.memory_stats()
    assert stats["gate"] == 0.5 and stats["memory_mass"] == 0.5 and stats["retrieved_fraction"] == 1.0


# ---------------------------------------------------------------------------------------------------- the layer


def mem_layer(n_heads=4, n_kv_heads=2, seed=0, gate=None):
    torch.manual_seed(seed)
    att = Attention(d_model=32, n_heads=n_heads, n_kv_heads=n_kv_heads).double()
    for p in att.parameters():
        torch.nn.init.normal_(p, std=0.3)
    layer = MemoryAugmentedAttention.from_attention(att, n_chunks=2)
    if gate is not None:
        with torch.no_grad():
            layer.gate.copy_(torch.as_tensor(gate, dtype=torch.float64))
    return att, layer


def random_retrieved(B, H_kv, T, K, d, seed, p_valid=0.6, empty_rows=True):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, H_kv, T, K, d, generator=g, dtype=torch.float64)
    values = torch.randn(B, H_kv, T, K, d, generator=g, dtype=torch.float64)
    valid = torch.rand(B, H_kv, T, K, generator=g) < p_valid
    if empty_rows:
        valid[0, 0, 1] = False  # a query with nothing retrieved
    return Retrieved(keys, values, valid, None, None)


def test_empty_memory_or_gate_off_is_plain_attention():
    att, layer = mem_layer(gate=[0.3, -1.0, 2.0, 0.0])
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    ref, ref_state = att(x)
    empty = random_retrieved(2, 2, 7, 8, 8, seed=0)
    empty = empty._replace(valid=torch.zeros_like(empty.valid))
    y, state = layer(x, retrieved=empty)
    assert torch.equal(y, ref) and all(torch.equal(a, b) for a, b in zip(state, ref_state))
    bank = KVMemoryBank(2, 2, 8, capacity=16, chunk_size=4)
    assert torch.equal(layer(x, bank=bank)[0], ref)
    assert torch.equal(layer(x)[0], ref)
    layer.memory_off = True
    assert torch.equal(layer(x, retrieved=random_retrieved(2, 2, 7, 8, 8, seed=1))[0], ref)
    assert layer.last_stats["memory_mass"] == 0.0


@pytest.mark.parametrize(("n_heads", "n_kv_heads", "grouped"), [(4, 4, False), (4, 2, False), (4, 2, True),
                                                                (4, 1, True)], ids=["mha", "gqa", "gqa-per-head",
                                                                                    "mqa-per-head"])
def test_memory_attention_equals_dense_reference(n_heads, n_kv_heads, grouped):
    """A_mem over the gathered tokens == a dense softmax restricted to each query's valid tokens; exact gate mix."""
    att, layer = mem_layer(n_heads, n_kv_heads, gate=torch.linspace(-1.5, 1.5, n_heads))
    B, T, K, d = 2, 5, 6, 32 // n_heads
    g = n_heads // n_kv_heads
    x = torch.randn(B, T, 32, dtype=torch.float64)
    ret = random_retrieved(B, n_kv_heads, g * T if grouped else T, K, d, seed=3)
    y, _ = layer(x, retrieved=ret)

    xn = x
    a_loc = causal_rope_attention(layer, xn)  # [B, H, T, d]
    q = layer.q_proj(xn).view(B, T, n_heads, d)
    out = torch.zeros(B, n_heads, T, d, dtype=torch.float64)
    for b in range(B):
        for h in range(n_heads):
            kv, j = h // g, h % g
            for t in range(T):
                row = j * T + t if grouped else t
                sel = ret.valid[b, kv, row]
                w = torch.sigmoid(layer.gate[h])
                if not sel.any():
                    out[b, h, t] = a_loc[b, h, t]
                    continue
                k, v = ret.keys[b, kv, row][sel], ret.values[b, kv, row][sel]
                a_mem = torch.softmax(k @ q[b, t, h] / math.sqrt(d), 0) @ v
                out[b, h, t] = (1 - w) * a_loc[b, h, t] + w * a_mem
    ref = layer.o_proj(out.transpose(1, 2).reshape(B, T, n_heads * d))
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


def test_memory_attention_function_masks_and_never_nans():
    q = torch.randn(1, 1, 3, 4)
    keys, values = torch.randn(1, 1, 3, 5, 4), torch.randn(1, 1, 3, 5, 4)
    valid = torch.tensor([[[[True] * 5, [False] * 5, [True, False, False, False, False]]]])
    out, has = memory_attention(q, keys, values, valid)
    assert torch.isfinite(out).all() and has.tolist() == [[[True, False, True]]]
    assert torch.equal(out[0, 0, 1], torch.zeros(4))
    torch.testing.assert_close(out[0, 0, 2], values[0, 0, 2, 0])


def test_memory_layer_step_matches_forward():
    _, layer = mem_layer(gate=[0.5, -0.5, 1.0, 0.0])
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    ret = random_retrieved(2, 2, 6, 8, 8, seed=5)
    y, _ = layer(x, retrieved=ret)
    state, ys = layer.init_state(2, dtype=torch.float64), []
    for t in range(6):
        sub = Retrieved(ret.keys[:, :, t:t + 1], ret.values[:, :, t:t + 1], ret.valid[:, :, t:t + 1], None, None)
        y_t, state = layer.step(x[:, t], state, retrieved=sub)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------------- the model


def test_cached_keys_are_unrotated_layer_m_projections():
    model = longmem()
    x = ids(T=S)
    state = model(x).state
    _, k, v = backbone_states(model, x)
    bank = state.bank
    assert torch.equal(bank.keys[:, :, :S], k.float()) and torch.equal(bank.values[:, :, :S], v.float())
    assert bank.fill.tolist() == [S // 4] * 2
    # The rotated keys differ (RoPE is on): the bank really holds the un-rotated ones.
    rotated = apply_rope(k.transpose(1, 2), torch.arange(S)[None], 10_000.0).transpose(1, 2)
    assert not torch.allclose(rotated.float(), bank.keys[:, :, :S])


def test_segment_causality_and_no_self_retrieval():
    model = longmem()
    x = ids(T=3 * S)
    fills = []
    state = model.init_state(2)
    search = state.bank.search

    def spy(q, n_chunks=16, **kw):
        fills.append(state.bank.fill.tolist())
        return search(q, n_chunks, **kw)

    state.bank.search = spy
    ref = model(x, state=state).logits
    # Segment n reads a bank holding exactly segments < n.
    assert fills == [[0, 0], [2, 2], [4, 4]]
    y = x.clone()
    y[:, 2 * S + 3] = (y[:, 2 * S + 3] + 1) % V
    out = model(y).logits
    assert torch.equal(out[:, :2 * S + 3], ref[:, :2 * S + 3])
    assert not torch.allclose(out[:, 2 * S + 3:], ref[:, 2 * S + 3:])
    y = x.clone()
    y[:, S] = (y[:, S] + 1) % V
    out = model(y).logits
    assert torch.equal(out[:, :S], ref[:, :S])
    # The first segment reads an empty bank: exactly the memory-free SideNet.
    base = longmem(use_memory=False)
    assert torch.equal(base(x).logits[:, :S], ref[:, :S])
    assert not torch.allclose(base(x).logits[:, S:], ref[:, S:])


def test_batch_rows_are_isolated():
    model = longmem(n_chunks=2)
    x = ids(T=3 * S)
    y = x.clone()
    y[1] = ids(B=1, T=3 * S, seed=7)[0]
    a, b = model(x), model(y)
    assert torch.equal(a.logits[0], b.logits[0])
    assert not torch.allclose(a.logits[1], b.logits[1])
    assert torch.equal(a.state.bank.keys[0], b.state.bank.keys[0])


def test_reset_clears_only_its_row():
    model = longmem()
    x = ids(T=3 * S)
    state = model(x[:, :2 * S]).state
    state = model.reset_state(state, torch.tensor([True, False]))
    assert state.bank.fill.tolist() == [0, 2 * S // 4]
    out = model(x[:, 2 * S:], state=state).logits
    fresh = model(x[:, 2 * S:]).logits
    cont = model(x).logits[:, 2 * S:]
    torch.testing.assert_close(out[0], fresh[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1], cont[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="open segment"):
        model.reset_state(model(x[:, :S + 1]).state, torch.tensor([True, False]))
    with pytest.raises(ValueError, match="mask"):
        model.reset_state(state, torch.tensor([1, 0]))


def test_full_bank_evicts_oldest_segments_first():
    """Capacity of two segments: segment 4 sees exactly what a stream started at segment 2 sees."""
    model = longmem(capacity=2 * S, n_chunks=3, gate=[1.0, 0.5, -0.5, 2.0])
    x = ids(T=4 * S)
    out = model(x)
    assert out.state.bank.fill.tolist() == [2 * S // 4] * 2
    late = model(x[:, S:]).logits
    torch.testing.assert_close(out.logits[:, 3 * S:], late[:, 2 * S:], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out.logits[:, 2 * S:3 * S], late[:, S:2 * S])


def test_streaming_two_segments_equals_dense_attention_to_the_first():
    """Bank large enough to return every chunk of segment 1: segment 2 attends densely to all of it."""
    model = longmem(gate=[0.7, -0.4, 1.2, 0.1], n_chunks=S // 4 + 2)
    with torch.no_grad():
        for p in model.side.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = ids(T=2 * S)
    out = model(x).logits[:, S:]

    _, k1, v1 = backbone_states(model, x[:, :S])
    k1, v1 = k1.float().double(), v1.float().double()  # the bank stores fp32
    hidden, _, _ = backbone_states(model, x[:, S:])
    side, r, L = model.side, model.side.reduction, len(hidden) - 1
    h = hidden[0]
    for i, block in enumerate(side.blocks):
        if i == side.memory_index:
            h2 = h + dense_memory_layer(block.mixer, block.mixer_norm(h), k1, v1)
            h2 = h2 + block.mlp(block.mlp_norm(h2))
        else:
            h2, _ = block(h)
        h = h2 + hidden[min(r * (i + 1), L)] - hidden[r * i]
    ref = model.backbone.lm_head(side.norm(h))
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("splits", [[1], [S - 1], [S], [S + 3], [2 * S], [3, S + 1, 2 * S + 2], [S, 2 * S, 3 * S]],
                         ids=lambda s: "-".join(map(str, s)))
def test_chained_calls_equal_one_call(splits):
    model = longmem()
    x = ids(T=3 * S + 5)
    ref = model(x).logits
    state, parts = None, []
    for a, b in zip([0, *splits], [*splits, x.shape[1]]):
        out = model(x[:, a:b], state=state)
        state = out.state
        parts.append(out.logits)
    torch.testing.assert_close(torch.cat(parts, 1), ref, rtol=1e-10, atol=1e-10)
    assert state.open_ids.shape == (2, 5) and state.bank.fill.tolist() == [3 * S // 4] * 2


def test_generate_equals_greedy_full_forwards():
    model = longmem(gate=[1.0, -1.0, 0.5, 0.0])
    prompt = ids(T=S + 3)
    got = model.generate(prompt, max_new_tokens=2 * S)
    ref = prompt
    for _ in range(2 * S):
        ref = torch.cat((ref, model(ref).logits[:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(got, ref)
    assert torch.equal(model.generate(prompt, 0), prompt)


def test_index_state_reorders_rows():
    model = longmem()
    x = ids(T=2 * S + 3)
    state = model(x[:, :S + 3]).state
    swapped = model.index_state(state, torch.tensor([1, 0]))
    out = model(x[:, S + 3:].flip(0), state=swapped).logits
    ref = model(x.flip(0)).logits[:, S + 3:]
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_bf16_forward_and_backward():
    model = longmem(torch.bfloat16)
    x = ids(T=2 * S + 1)
    out = model(x, labels=x)
    assert out.logits.dtype == torch.bfloat16 and out.state.bank.dtype == torch.bfloat16
    assert torch.isfinite(out.logits.float()).all()
    out.loss.backward()
    assert all(torch.isfinite(p.grad.float()).all() for p in model.trainable_parameters())


def test_loss_matches_shifted_cross_entropy():
    model = longmem()
    x = ids(T=2 * S + 3)
    labels = x.clone()
    labels[:, 5] = -100
    out = model(x, labels=labels)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)
    assert model(x, output_hidden=True).hidden.shape == (2, 2 * S + 3, 32)


def test_side_net_is_a_module_with_only_trainable_parameters():
    model = longmem()
    assert isinstance(model.side, SideNet)
    assert all(p.requires_grad for p in model.side.parameters())
    assert set(dict(model.named_parameters())) >= {f"side.{k}" for k, _ in model.side.named_parameters()}


# ---------------------------------------------------------------------------------------------------- errors


def test_bad_config_and_inputs_raise():
    with pytest.raises(ValueError, match="chunk_size"):
        LongMemConfig(segment_len=10, chunk_size=4)
    with pytest.raises(ValueError, match="capacity"):
        LongMemConfig(segment_len=8, capacity=6)
    with pytest.raises(ValueError, match="bank_dtype"):
        LongMemConfig(bank_dtype="float128")
    with pytest.raises(ValueError, match="memory_layer"):
        LongMem(backbone(), segment_len=S, capacity=16, memory_layer=4)
    with pytest.raises(ValueError, match="memory_layer"):
        LongMem(backbone(pattern=("gla",)), segment_len=S, capacity=16, memory_layer=1)
    with pytest.raises(TypeError, match="LanguageModel"):
        LongMem(torch.nn.Linear(2, 2), segment_len=S)
    with pytest.raises(TypeError, match="either"):
        LongMem(backbone(), LongMemConfig(), segment_len=S)
    model = longmem()
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(TypeError, match="input_ids"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="labels"):
        model(ids(), labels=ids()[:, :-1])
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids(B=1), cu_seqlens=torch.tensor([0, 24]))
    with pytest.raises(ValueError, match="batch size"):
        model(ids(B=1), state=model(ids()).state)
    with pytest.raises(TypeError, match="LongMemState"):
        model(ids(), state=(1, 2))
    with pytest.raises(ValueError, match="bank"):
        model(ids(), state=LongMemState(KVMemoryBank(2, 2, 8, 32), torch.zeros(2, 0, dtype=torch.long)))
    _, layer = mem_layer()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="retrieved"):
        layer(x, retrieved=random_retrieved(2, 2, 4, 6, 8, seed=0))
    with pytest.raises(TypeError, match="retrieved"):
        layer(x, retrieved=object())
    with pytest.raises(ValueError, match="at most one"):
        layer(x, retrieved=random_retrieved(2, 2, 5, 6, 8, seed=0), bank=KVMemoryBank(2, 2, 8, 16))
    with pytest.raises(TypeError, match="Attention"):
        MemoryAugmentedAttention.from_attention(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------------- HF backbone


def llama(n_layers=4, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))  # non-trivial norm weights
    return model.eval()


def memzoo_twin(hf):
    """The memzoo LanguageModel with the HF Llama's weights (same architecture, memzoo names)."""
    c = hf.config
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=c.num_hidden_layers, d_ff=64, norm_eps=c.rms_norm_eps,
                      tie_embeddings=False, mixers={"attention": {"n_heads": 4, "n_kv_heads": 2}})
    model = LanguageModel(cfg).double()
    state = {"embed.weight": hf.model.embed_tokens.weight, "norm.weight": hf.model.norm.weight,
             "lm_head.weight": hf.lm_head.weight}
    names = {"mixer_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
             **{f"mixer.{n}": f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
             **{f"mlp.{n}": f"mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")}}
    for i, layer in enumerate(hf.model.layers):
        for ours, theirs in names.items():
            state[f"blocks.{i}.{ours}.weight"] = layer.get_submodule(theirs).weight
    model.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    return model


def test_rope_convention_matches_hf_rotate_half():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hf = llama()
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64)  # [B, H, T, d]
    pos = torch.arange(7)[None].expand(2, -1)
    cos, sin = hf.model.rotary_emb(x, pos)
    ref, _ = apply_rotary_pos_emb(x, x, cos, sin)
    ours = apply_rope(x.transpose(1, 2), pos, 10_000.0).transpose(1, 2)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_mapped_llama_layer_reproduces_hf_layer():
    hf = llama()
    model = LongMem(hf, segment_len=S, capacity=32)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    pos = torch.arange(7)[None]
    mask = torch.ones(7, 7, dtype=torch.bool).tril()[None, None]
    for j in (0, 2):
        block = model._bb.block(j)
        ref = hf.model.layers[j](x, attention_mask=mask, position_ids=pos,
                                 position_embeddings=hf.model.rotary_emb(x, pos))
        ref = ref if isinstance(ref, torch.Tensor) else ref[0]
        torch.testing.assert_close(block(x)[0], ref, rtol=1e-6, atol=1e-6)


def test_llama_backbone_equals_memzoo_twin():
    hf = llama()
    twin = memzoo_twin(hf)
    x = ids(T=3 * S + 2)
    torch.testing.assert_close(twin(x).logits, hf(x).logits, rtol=1e-6, atol=1e-6)
    a = LongMem(hf, segment_len=S, capacity=64, n_chunks=4)
    b = LongMem(twin, segment_len=S, capacity=64, n_chunks=4)
    assert a.side.sources == b.side.sources and a.memory_layer == b.memory_layer == 3
    out_a, out_b = a(x, labels=x), b(x)
    torch.testing.assert_close(out_a.logits, out_b.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_a.state.bank.keys, out_b.state.bank.keys, rtol=1e-5, atol=1e-5)
    out_a.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in hf.parameters())
    assert all(p.grad is not None for p in a.trainable_parameters())
    # Chained calls on the HF backbone too, and the hooks are gone afterwards.
    state, parts = None, []
    for lo, hi in ((0, 5), (5, 2 * S), (2 * S, 3 * S + 2)):
        out = a(x[:, lo:hi], state=state)
        state = out.state
        parts.append(out.logits)
    torch.testing.assert_close(torch.cat(parts, 1), out_a.logits, rtol=1e-10, atol=1e-10)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in hf.modules())


def test_other_hf_architectures_raise():
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2))
    with pytest.raises(NotImplementedError, match="gpt2"):
        LongMem(gpt2, segment_len=S)


def test_flops_per_token_counts_side_training_and_the_search():
    small, big = longmem(capacity=64), longmem(capacity=128)
    fpt = small.flops_per_token()
    assert fpt > 6 * small.added_parameters() + 2 * sum(p.numel() for p in small.backbone.blocks.parameters())
    # Each extra stored chunk key costs one q.k per query head.
    heads = small.side.memory_attention.n_heads
    assert big.flops_per_token() - fpt == 2 * heads * small.d_head * (128 - 64) // small.config.chunk_size
    assert longmem(capacity=64, use_memory=False).flops_per_token() < fpt
