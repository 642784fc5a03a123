"""replace_attention on tiny random decoders of every supported architecture (no downloads).

Cached generation must equal greedy recomputation (the logits of every step, and the tokens), seeded
sampling and beam search must equal their uncached runs, training must lower the loss, and a saved
model must load back; every case the adapter cannot make exact must raise a clear error.
"""

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the optional hf extra is not installed")

from transformers import DynamicCache  # noqa: E402

from memzoo.integrations import hf_replace  # noqa: E402
from memzoo.integrations.hf import CACHE_FIELD, MemzooAttentionAdapter, load_replaced, replace_attention  # noqa: E402
from memzoo.models import MIXERS  # noqa: E402

V = 64
P, NEW = 5, 7  # prompt length, new tokens (> the sliding windows below, so window caches wrap)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _decoder(cfg_name, model_name, **fields):
    def build():
        cfg = getattr(transformers, cfg_name)(vocab_size=V, **fields)
        return getattr(transformers, model_name)(cfg)
    return build


_LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64)
ARCHS = {
    "llama": _decoder("LlamaConfig", "LlamaForCausalLM", **_LLAMA_LIKE),
    "gpt2": _decoder("GPT2Config", "GPT2LMHeadModel", n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "qwen2": _decoder("Qwen2Config", "Qwen2ForCausalLM", **_LLAMA_LIKE),
    "mistral": _decoder("MistralConfig", "MistralForCausalLM", sliding_window=4, **_LLAMA_LIKE),
    "gemma": _decoder("GemmaConfig", "GemmaForCausalLM", head_dim=8, **_LLAMA_LIKE),
    "gemma2": _decoder("Gemma2Config", "Gemma2ForCausalLM", head_dim=8, sliding_window=4, **_LLAMA_LIKE),
    "gemma3": _decoder("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=8, sliding_window=4, **_LLAMA_LIKE),
    "phi3": _decoder("Phi3Config", "Phi3ForCausalLM", pad_token_id=0, **_LLAMA_LIKE),
    "opt": _decoder("OPTConfig", "OPTForCausalLM", hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32),
    "gpt_neox": _decoder("GPTNeoXConfig", "GPTNeoXForCausalLM", hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64),
    "falcon": _decoder("FalconConfig", "FalconForCausalLM", hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4),
}
# Options per mixer at hidden size 32 (defaults otherwise); Titans memory chunks and segments shorter than
# the prompt, so the prefill ends mid-chunk and decoding crosses chunk boundaries.
MIXER_OPTIONS = {
    "attention": {"n_heads": 2},
    "gated_delta": {"n_heads": 2},
    "gla": {"n_heads": 2},
    "mom": {"n_heads": 2},
    "titans": {"chunk_size": 4},
    "titans_mac": {"segment_len": 4},
    "titans_mag": {"window": 4},
    "titans_mal": {"window": 4},
    "s4d": {},
    "lssl": {},
}
assert set(MIXER_OPTIONS) == set(MIXERS), "a new mixer needs its options here"
GEN = dict(max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0)


def build(arch, mixer="gated_delta", seed=0):
    torch.manual_seed(seed)
    model = ARCHS[arch]()
    replace_attention(model, mixer=mixer, **MIXER_OPTIONS[mixer])
    return model.eval()


def prompt(B=2, T=P, seed=3):
    return torch.randint(2, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mixer", sorted(MIXERS))
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_cached_greedy_equals_recomputation(arch, mixer):
    model, x = build(arch, mixer), prompt()
    with torch.no_grad():
        out = model.generate(x, do_sample=False, output_logits=True, return_dict_in_generate=True,
                             attention_mask=torch.ones_like(x), **GEN)
        seq = out.sequences
        assert seq.shape == (2, P + NEW)
        # Recomputation: one uncached pass over the generated sequence gives every step's logits.
        full = model(seq, use_cache=False).logits[:, P - 1:-1].float()
    cached = torch.stack(out.logits, 1).float()
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
    # generate may not pick eos before min_new_tokens: recomputation's argmax follows the same rule.
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    full[..., [e for e in eos if e < V]] = -math.inf
    assert torch.equal(seq[:, P:], full.argmax(-1)), "cached greedy tokens differ from recomputation"


@pytest.mark.parametrize("arch, mixer", [(a, "gated_delta") for a in sorted(ARCHS)]
                         + [("llama", m) for m in sorted(MIXERS) if m != "gated_delta"])
def test_seeded_sampling_cached_equals_uncached(arch, mixer):
    model, x = build(arch, mixer), prompt(B=3)
    kw = dict(do_sample=True, temperature=1.5, top_k=None, top_p=None, **GEN)
    with torch.no_grad():
        torch.manual_seed(7)
        cached = model.generate(x, **kw)
        torch.manual_seed(7)
        uncached = model.generate(x, use_cache=False, **kw)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("arch, mixer", [("llama", "gated_delta"), ("gpt2", "attention"), ("mistral", "titans"),
                                         ("opt", "s4d")])
def test_beam_search_follows_the_reordered_cache(arch, mixer):
    model, x = build(arch, mixer), prompt(B=2)
    kw = dict(num_beams=3, num_return_sequences=2, do_sample=False, **GEN)
    with torch.no_grad():
        assert torch.equal(model.generate(x, **kw), model.generate(x, use_cache=False, **kw))


def test_forward_with_cache_continues_exactly():
    model, x = build("llama", "gla"), prompt(T=9)
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        a = model(x[:, :4], use_cache=True)
        cache = a[CACHE_FIELD]
        assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 4
        b = model(x[:, 4:], use_cache=True, **{_cache_kw(model): cache})
        torch.testing.assert_close(torch.cat((a.logits, b.logits), 1), full, rtol=1e-5, atol=1e-5)
        # A deep copy of a prompt cache (HF's prompt-reuse recipe) carries the memzoo state with it.
        prefix = model(x[:, :4], use_cache=True)
        reused = copy.deepcopy(prefix[CACHE_FIELD])
        c = model(x[:, 4:], use_cache=True, **{_cache_kw(model): reused})
        torch.testing.assert_close(c.logits, b.logits, rtol=0, atol=0)


def _cache_kw(model):
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def test_cropped_or_foreign_cache_is_refused():
    model, x = build("llama", "gated_delta"), prompt(T=6)
    with torch.no_grad():
        out = model(x, use_cache=True)
        cache = out[CACHE_FIELD]
        cache.crop(-2)  # drop the last two tokens (assisted decoding does this)
        with pytest.raises(ValueError, match="cropped, rolled back"):
            model(x[:, 4:5], use_cache=True, **{_cache_kw(model): cache})
        torch.manual_seed(0)
        plain = ARCHS["llama"]().eval()
        foreign = plain(x, use_cache=True)
        foreign = foreign[CACHE_FIELD]
        with pytest.raises(ValueError, match="never processed"):
            model(x[:, :1], use_cache=True, **{_cache_kw(model): foreign})


def test_static_cache_is_refused_with_advice():
    model, x = build("llama", "gated_delta"), prompt()
    with pytest.raises(ValueError, match="dynamic cache"):
        model.generate(x, cache_implementation="static", **GEN)


def test_padding_with_zeros_before_tokens_is_refused():
    model, x = build("gpt2", "gated_delta"), prompt()
    left = torch.ones_like(x)
    left[0, :2] = 0
    with pytest.raises(ValueError, match="attention_mask.*left or inner padding"):
        model.generate(x, attention_mask=left, **GEN)
    right = torch.ones_like(x)
    right[0, -2:] = 0
    with torch.no_grad():
        # Right padding is accepted for training: the real tokens' outputs are unchanged (causal mixers).
        torch.testing.assert_close(model(x, attention_mask=right, use_cache=False).logits[0, :-2],
                                   model(x[:1, :-2], use_cache=False).logits[0], rtol=1e-5, atol=1e-5)


def test_a_decoder_that_drops_the_cache_is_detected(monkeypatch):
    model, x = build("llama", "gated_delta"), prompt()
    layer = model.model.layers[0]
    forward = type(layer).forward

    def without_cache(self, *args, **kwargs):
        kwargs = {k: (None if isinstance(v, transformers.Cache) else v) for k, v in kwargs.items()}
        return forward(self, *args, **kwargs)

    for block in model.model.layers:
        monkeypatch.setattr(block, "forward", without_cache.__get__(block))
    with pytest.raises(ValueError, match="did not pass the cache"):
        model(x, use_cache=True)
    with torch.no_grad():
        model(x, use_cache=False)  # without a cache nothing is carried, and nothing is wrong


def test_a_deep_copy_generates_on_its_own_state():
    model, x = build("gpt2", "gla"), prompt()
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(0.05 * torch.randn_like(p))
        ref = clone.generate(x, use_cache=False, do_sample=False, **GEN)
        assert torch.equal(clone.generate(x, do_sample=False, **GEN), ref)
        assert torch.equal(model.generate(x, do_sample=False, **GEN), model.generate(x, use_cache=False,
                                                                                  do_sample=False, **GEN))


def test_replace_twice_and_bad_input():
    model = ARCHS["llama"]()
    replace_attention(model, mixer="gla", n_heads=2)
    with pytest.raises(ValueError, match="already replaced"):
        replace_attention(model, mixer="gated_delta")
    with pytest.raises(ValueError, match="mixer"):
        replace_attention(ARCHS["llama"](), mixer="no_such_mixer")
    with pytest.raises(TypeError, match="model"):
        replace_attention("llama")
    fresh = ARCHS["llama"]()
    with pytest.raises(ValueError):
        replace_attention(fresh, mixer="gated_delta", n_heads=3)  # 32 is not divisible into 3 heads
    assert not any(isinstance(m, MemzooAttentionAdapter) for m in fresh.modules()), "a failed call left changes"


@pytest.mark.parametrize("arch, mixer", [(a, "gated_delta") for a in sorted(ARCHS)]
                         + [("llama", m) for m in sorted(MIXERS) if m != "gated_delta"])
def test_replaced_model_trains(arch, mixer):
    model = build(arch, mixer).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".mixer." in n}
    x = prompt(B=4, T=16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 0.1, losses
    after = dict(model.named_parameters())
    assert before and sum(not torch.equal(after[n], p) for n, p in before.items()) >= len(before) // 2


@pytest.mark.parametrize("arch, mixer", [(a, "gated_delta") for a in sorted(ARCHS)] + [("llama", "titans_mac"),
                                                                                        ("gpt2", "s4d")])
def test_save_and_load_replaced(arch, mixer, tmp_path):
    model, x = build(arch, mixer), prompt()
    model.save_pretrained(tmp_path)
    loaded = load_replaced(tmp_path)
    assert type(loaded) is type(model)
    assert sum(isinstance(m, MemzooAttentionAdapter) for m in loaded.modules()) == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, use_cache=False).logits, model(x, use_cache=False).logits,
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="replace_attention"):
        ARCHS[arch]().save_pretrained(tmp_path / "plain") or load_replaced(tmp_path / "plain")


def test_supported_architectures_are_documented():
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "hf.md").read_text()
    for arch in ARCHS:
        assert f"`{arch}`" in doc, f"docs/hf.md does not list {arch}"
    assert hf_replace.REPLACED_CONFIG_KEY in doc
