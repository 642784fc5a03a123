"""HMT (arXiv 2405.06067): a float64 serial oracle, truncation, FIFO cache, resets, generation, hygiene."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from memzoo.models import LanguageModel, ModelConfig
from memzoo.models.state import state_leaves
from memzoo.models.wrappers import hmt as hmt_module
from memzoo.models.wrappers.hmt import HMT, HMTConfig, HMTState, recall

V = 40
BACKBONES = ["attention", "gla", "gated_delta"]


pytestmark = pytest.mark.usefixtures("one_thread")


def backbone(mixer="attention", d_model=16, n_layers=2):
    torch.manual_seed(0)
    opts = {"n_heads": 2} if mixer in ("attention", "gla", "gated_delta") else {}
    cfg = ModelConfig(vocab_size=V, d_model=d_model, n_layers=n_layers, pattern=(mixer,), mixers={mixer: opts})
    return LanguageModel(cfg).double()


def hmt(mixer="attention", **kw):
    kw = {"segment_len": 6, "n_sensory": 2, "cache_size": 3, "recall_dim": 8, **kw}
    model = HMT(backbone(mixer), HMTConfig(**kw)).double()
    with torch.no_grad():
        # Non-trivial recall: larger projections than the init so the softmax is far from uniform.
        for p in model.parameters():
            if p.dim() == 2 and p.shape[0] == kw["recall_dim"]:
                p.normal_(0, 1.0)
    return model


def ids(B=2, T=40, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def serial_reference(model, tokens):
    """HMT written straight from the paper, one segment and one row at a time, a Python list as the cache."""
    bb, c = model.backbone, model.config
    B, T = tokens.shape
    caches = [[] for _ in range(B)]
    previous = None
    logits = []
    for start in range(0, T, c.segment_len):
        x = tokens[:, start:start + c.segment_len]
        memory = []
        for b in range(B):
            cache = caches[b][-c.cache_size:]
            if not cache:
                memory.append(model.mem_init)
            elif not c.use_recall:
                memory.append(cache[-1])
            else:
                prompt = model.summary_prompt[None]
                seq = torch.cat((prompt, bb.embed(x[b, :c.summary_len]), prompt))[None]
                s = bb(inputs_embeds=seq, output_hidden=True).hidden[0, -1]
                q = model.w_q.weight @ s
                scores = torch.stack([q @ (model.w_k.weight @ m) for m in cache]) / math.sqrt(c.recall_dim)
                weights = scores.softmax(0)
                memory.append(sum(w * m for w, m in zip(weights, cache)))
        p = torch.stack(memory)[:, None]
        sensory = bb.embed(previous[:, -c.n_sensory:]) if previous is not None and c.n_sensory else p[:, :0]
        out = bb(inputs_embeds=torch.cat((p, sensory, bb.embed(x), p), 1), output_hidden=True)
        first = 1 + sensory.shape[1]
        logits.append(out.logits[:, first:first + x.shape[1]])
        for b in range(B):
            caches[b].append(out.hidden[b, -1])
        previous = x
    return torch.cat(logits, 1), [torch.stack(cache[-model.config.cache_size:]) for cache in caches]


@pytest.mark.parametrize("use_recall", [True, False], ids=["stage2", "stage1"])
@pytest.mark.parametrize("T", [40, 36, 5], ids=["partial-last", "whole-segments", "shorter-than-a-segment"])
def test_forward_equals_serial_reference(use_recall, T):
    model = hmt(use_recall=use_recall)
    x = ids(T=T)
    out = model(x)
    ref_logits, ref_cache = serial_reference(model, x)
    torch.testing.assert_close(out.logits, ref_logits)
    n_seg = -(-T // model.config.segment_len)
    filled = min(n_seg, model.config.cache_size)
    # FIFO: the newest memory sits in the last slot, the valid mask covers exactly the filled slots.
    assert out.state.valid.sum(1).tolist() == [filled] * 2
    assert not out.state.valid[:, :-filled].any()
    for b in range(2):
        torch.testing.assert_close(out.state.cache[b, -filled:], ref_cache[b])


def test_first_segment_reads_m0_and_a_short_document_is_one_main_pass():
    model = hmt()
    x = ids(T=4)
    m0 = model.mem_init.expand(2, 1, -1)
    ref = model.backbone(inputs_embeds=torch.cat((m0, model.backbone.embed(x), m0), 1), output_hidden=True)
    out = model(x)
    torch.testing.assert_close(out.logits, ref.logits[:, 1:5])
    torch.testing.assert_close(out.state.cache[:, -1], ref.hidden[:, -1])


def test_recall_equals_a_dense_per_row_reference():
    g = torch.Generator().manual_seed(0)
    B, N, D, H = 4, 5, 6, 3
    summary, cache = torch.randn(B, D, generator=g, dtype=torch.float64), torch.randn(B, N, D, dtype=torch.float64)
    w_q, w_k, m0 = torch.randn(H, D, dtype=torch.float64), torch.randn(H, D, dtype=torch.float64), torch.randn(D)
    valid = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 0], [1, 0, 1, 0, 1]], dtype=torch.bool)
    got = recall(summary, cache, valid, w_q, w_k, m0.double())
    for b in range(B):
        slots = cache[b][valid[b]]
        if not len(slots):
            torch.testing.assert_close(got[b], m0.double())
            continue
        scores = (slots @ w_k.T) @ (w_q @ summary[b]) / math.sqrt(H)
        torch.testing.assert_close(got[b], scores.softmax(0) @ slots)


def test_batched_summaries_equal_serial_ones():
    model = hmt()
    segments = ids(T=40).split(6, dim=1)
    batched = model.summaries(segments)
    for x, s in zip(segments, batched):
        torch.testing.assert_close(s, model.summaries([x])[0])


@pytest.mark.parametrize("mixer", BACKBONES)
@pytest.mark.parametrize("carry", [False, True], ids=["hmt", "carry-backbone"])
def test_chained_calls_equal_one_call(mixer, carry):
    model = hmt(mixer, carry_backbone_state=carry)
    x = ids(T=30)
    full = model(x)
    state, pieces = None, []
    for piece in x.split(12, dim=1):
        out = model(piece, state=state)
        pieces.append(out.logits)
        state = out.state
    torch.testing.assert_close(torch.cat(pieces, 1), full.logits)
    for a, b in zip(state_leaves(state), state_leaves(full.state)):
        torch.testing.assert_close(a, b)
    assert (state.backbone is not None) == carry


@pytest.mark.parametrize("detach", [True, False], ids=["detach-every-2", "no-detach"])
def test_detach_every_d_really_cuts_the_gradient(detach):
    model = hmt(n_sensory=0)
    segments = ids(T=36).split(6, dim=1)
    state = model(segments[0]).state
    leaf = state.cache.detach().clone().requires_grad_()
    state = state._replace(cache=leaf)
    for n, x in enumerate(segments[1:], start=1):
        out = model(x, state=state)
        state = out.state
        if detach and n % 2 == 0:
            state = model.detach_state(state)
    out.logits.square().sum().backward()
    if detach:
        assert leaf.grad is None or not leaf.grad.any()
    else:
        assert leaf.grad is not None and leaf.grad.abs().sum() > 0


def test_detach_state_keeps_values_and_drops_the_graph():
    model = hmt(mixer="gla", carry_backbone_state=True)
    state = model(ids(T=20)).state
    assert state.cache.requires_grad
    cut = model.detach_state(state)
    assert isinstance(cut, HMTState)
    for a, b in zip(state_leaves(state), state_leaves(cut)):
        assert not b.requires_grad and torch.equal(a, b)


@pytest.mark.parametrize("mixer", ["attention", "gla"])
def test_reset_rows_start_fresh_and_others_continue(mixer):
    model = hmt(mixer, carry_backbone_state=mixer == "gla")
    x = ids(T=24)
    state = model(x[:, :12]).state
    state = model.reset_state(state, torch.tensor([True, False]))
    out = model(x[:, 12:], state=state)
    torch.testing.assert_close(out.logits[:1], model(x[:1, 12:]).logits)
    torch.testing.assert_close(out.logits[1:], model(x[1:]).logits[:, 12:])
    with pytest.raises(ValueError, match="mask"):
        model.reset_state(state, torch.tensor([1, 0]))


def test_loss_covers_every_token_of_every_segment_once():
    model = hmt()
    x = ids(T=30)
    labels = x.clone()
    labels[0, 7] = -100
    out = model(x, labels=labels)
    assert out.logits.shape == (2, 30, V)
    ref = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)
    out.loss.backward()
    assert model.w_q.weight.grad.abs().sum() > 0 and model.summary_prompt.grad.abs().sum() > 0


def test_segment_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = hmt(checkpoint_segments=ckpt)
        model(ids(T=20), labels=ids(T=20)).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mixer", ["attention", "gla"])
@pytest.mark.parametrize("use_recall", [True, False], ids=["stage2", "stage1"])
def test_generate_equals_greedy_recompute_across_segment_rolls(mixer, use_recall):
    model = hmt(mixer, use_recall=use_recall, segment_len=4, n_sensory=1).eval()
    prompt = ids(T=5)
    # Row 1 starts a new document next to a continuing row 0: the mixed sensory path.
    state = model.reset_state(model(ids(T=4, seed=5)).state, torch.tensor([False, True]))
    got = model.generate(prompt, 14, state=state)
    seq = prompt
    for _ in range(14):
        nxt = model(seq, state=state).logits[:, -1].argmax(-1)
        seq = torch.cat((seq, nxt[:, None]), 1)
    # 5 + 14 tokens: segments close at 8, 12 and 16 while decoding (three memory rolls).
    assert torch.equal(got, seq)


def test_parameter_accounting_and_overhead():
    model = hmt()
    d, dh = model.hidden_size, model.config.recall_dim
    assert model.added_parameters() == 2 * d * dh + 2 * d
    assert hmt(use_recall=False).added_parameters() == d
    from memzoo.train import resolve_config

    cfg = resolve_config("hmt_stage_2")
    wrapped = HMT(LanguageModel(cfg.model), cfg.resolved_wrapper()[1])
    assert 0.005 <= wrapped.parameter_overhead() <= 0.02


def test_stage_two_loads_stage_one_with_fresh_recall_params():
    one = hmt(use_recall=False)
    two = hmt(use_recall=True)
    prompt_before = two.summary_prompt.detach().clone()
    two.load_stage1(one.state_dict())
    torch.testing.assert_close(two.mem_init, one.mem_init)
    torch.testing.assert_close(two.backbone.embed.weight, one.backbone.embed.weight)
    torch.testing.assert_close(two.summary_prompt, prompt_before)
    bad = {k: v for k, v in one.state_dict().items() if k != "mem_init"}
    with pytest.raises(ValueError, match="mem_init"):
        two.load_stage1(bad)


def test_the_code_never_moves_tensors_between_devices():
    source = inspect.getsource(hmt_module)
    assert ".cuda(" not in source and ".cpu(" not in source and '"cuda"' not in source


@pytest.mark.gpu
def test_state_lives_on_the_input_device():
    # On a CPU-only machine every tensor is on the CPU, so only a GPU run can catch a state left behind.
    model = hmt().cuda()
    state = model(ids(T=8).cuda()).state
    assert all(t.device.type == "cuda" for t in state_leaves(state))
    state = model(ids(T=8).cuda(), state=state).state
    assert all(t.device.type == "cuda" for t in state_leaves(state))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="segment_len"):
        HMTConfig(segment_len=5, n_sensory=4)
    with pytest.raises(ValueError, match="sum_fraction"):
        HMTConfig(segment_len=8, n_sensory=2, sum_fraction=0.0)
    model = hmt()
    with pytest.raises(TypeError, match="input_ids"):
        model(torch.randn(2, 8))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids(B=1), cu_seqlens=torch.tensor([0, 40]))
    with pytest.raises(ValueError, match="labels"):
        model(ids(), labels=ids()[:, :3])
    with pytest.raises(ValueError, match="batch size"):
        model(ids(B=3), state=model.init_state(2))
    with pytest.raises(ValueError, match="does not fit"):
        model(ids(), state=hmt(cache_size=5).init_state(2))
    with pytest.raises(TypeError, match="backbone"):
        HMT(torch.nn.Linear(2, 2), HMTConfig(segment_len=8, n_sensory=2))
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids(), -1)


def test_language_model_inputs_embeds_path():
    lm = backbone()
    x = ids(T=9)
    a = lm(x, output_hidden=True)
    b = lm(inputs_embeds=lm.embed(x), output_hidden=True, labels=x)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(lm.lm_head(a.hidden), a.logits)
    assert lm(x).hidden is None and lm.hidden_size == 16 and b.loss is not None
    with pytest.raises(ValueError, match="exactly one"):
        lm(x, inputs_embeds=lm.embed(x))
    with pytest.raises(ValueError, match="inputs_embeds"):
        lm(inputs_embeds=torch.randn(2, 3, 7, dtype=torch.float64))
