"""The Hugging Face integration on tiny random models (no downloads): Auto classes, save/load, generate,
conversion both ways, and the pinned generation path (replace_attention: test_hf_replace.py)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the optional hf extra is not installed")

from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
)

import memzoo  # noqa: E402
from memzoo.integrations import hf  # noqa: E402
from memzoo.integrations.hf import MemzooConfig, MemzooForCausalLM, MemzooState  # noqa: E402
from memzoo.models import MIXERS, LanguageModel, ModelConfig  # noqa: E402

V = 48


@pytest.fixture(autouse=True)
def _one_thread():
    # The CI box is shared; tiny models gain nothing from more threads.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_hf(pattern=("gated_delta", "attention"), n_layers=2, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = MemzooConfig(vocab_size=V, d_model=32, n_layers=n_layers, pattern=list(pattern), d_ff=64, **kw)
    return MemzooForCausalLM(cfg).eval()


def ids(B=2, T=9, seed=3):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def write_memzoo_folder(model: LanguageModel, path, extra_files=()):
    """The folder memzoo-train's export_model writes (tied head dropped), without Accelerate."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        tensors.pop("lm_head.weight")
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(model.config.to_json(indent=2))
    for name in extra_files:
        (path / name).write_text('{"kind": "byte"}')
    return path


MIXER_PATTERNS = [pytest.param((n,), id=n) for n in MIXERS] + [pytest.param(("gated_delta", "attention"), id="hybrid")]


def test_registered_with_the_auto_classes():
    cfg = AutoConfig.for_model("memzoo", vocab_size=V, d_model=32, n_layers=1, pattern=["gla"])
    assert type(cfg) is MemzooConfig and cfg.hidden_size == 32 and cfg.num_hidden_layers == 1
    assert cfg.to_model_config() == ModelConfig(vocab_size=V, d_model=32, n_layers=1, pattern=("gla",))
    model = AutoModelForCausalLM.from_config(cfg)
    assert type(model) is MemzooForCausalLM and set(model._no_split_modules) == {"Block"}
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("pattern", MIXER_PATTERNS)
def test_save_load_logits_equal(pattern, tmp_path):
    model, x = tiny_hf(pattern), ids()
    model.save_pretrained(tmp_path)
    assert {"config.json", "generation_config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MemzooForCausalLM
    assert loaded.model.lm_head.weight is loaded.model.embed.weight
    assert loaded.config.to_model_config() == model.config.to_model_config()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_dkvb_ffn_save_load(tmp_path):
    """ffn / ffn_opts survive the HF config, and the bottleneck's buffers (projections, frozen keys) its weights."""
    model, x = tiny_hf(ffn="dkvb", ffn_opts={"n_keys": 32, "n_codebooks": 2}), ids()
    assert model.config.to_model_config().ffn_opts == {"n_keys": 32, "n_codebooks": 2}
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.to_model_config() == model.config.to_model_config()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_untied_save_load(tmp_path):
    model, x = tiny_hf(tie_word_embeddings=False), ids()
    assert model.model.lm_head.weight is not model.model.embed.weight
    model.save_pretrained(tmp_path)
    loaded = MemzooForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.model.lm_head.weight is not loaded.model.embed.weight
    assert torch.equal(loaded.model.lm_head.weight, model.model.lm_head.weight)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_forward_matches_memzoo_labels_and_logits_to_keep():
    model, x = tiny_hf(), ids()
    lm = model.to_memzoo()
    out, ref = model(x, labels=x), lm(x, labels=x)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
    assert torch.equal(out.ce_loss, ref.ce_loss) and isinstance(out[hf.CACHE_FIELD], MemzooState)
    assert out[hf.CACHE_FIELD].seen == x.shape[1]
    out.loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        last = model(x, logits_to_keep=2, use_cache=False)
        assert hf.CACHE_FIELD not in last and torch.equal(last.logits, lm(x, logits_to_keep=2).logits)
        # A continuation through past_key_values equals the full pass.
        a = model(x[:, :4])
        b = model(x[:, 4:], past_key_values=a[hf.CACHE_FIELD])
        torch.testing.assert_close(torch.cat((a.logits, b.logits), 1), model(x).logits, rtol=1e-5, atol=1e-5)
        tup = model(x, return_dict=False)
        assert isinstance(tup, tuple) and torch.equal(tup[0], ref.logits)


def test_bad_inputs_raise():
    model, x = tiny_hf(), ids()
    with pytest.raises(ValueError, match="attention_mask"):
        model(x, attention_mask=torch.tensor([[1] * 9, [0] + [1] * 8]))
    for bad in (torch.ones(2, 5), torch.ones(3, 9), torch.ones(2, 1, 9), [[1] * 9] * 2):
        with pytest.raises(ValueError, match=r"attention_mask must be a \[B, T\] tensor"):
            model(x, attention_mask=bad)
    with torch.no_grad():
        state = model(x[:, :4])[hf.CACHE_FIELD]
        # With a state, the mask may cover the new tokens or the whole sequence so far (as generate passes it).
        model(x[:, 4:], past_key_values=state, attention_mask=torch.ones(2, 9))
        model(x[:, 4:], past_key_values=state, attention_mask=torch.ones(2, 5))
        with pytest.raises(ValueError, match="padding"):
            model(x[:, 4:], past_key_values=state, attention_mask=torch.tensor([[0] + [1] * 8] * 2))
    with pytest.raises(TypeError, match="past_key_values"):
        model(x, past_key_values=transformers.DynamicCache())
    with pytest.raises(TypeError, match="logits_to_keep"):
        model(x, logits_to_keep=torch.tensor([1]))
    with pytest.raises(ValueError, match="unknown mixer"):
        MemzooConfig(pattern=["no_such_mixer"])
    with pytest.raises(TypeError, match="config"):
        MemzooForCausalLM(LlamaConfig())


@pytest.mark.parametrize("pattern", MIXER_PATTERNS)
def test_greedy_generate_equals_memzoo(pattern):
    model, prompt = tiny_hf(pattern), ids(T=5)
    out = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, model.to_memzoo().generate(prompt, 8))
    # The same tokens without any state: every step recomputes the prefix.
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False), out)


@pytest.mark.parametrize("sampling", [dict(temperature=0.8), dict(temperature=1.3, top_k=7), dict(temperature=1.0,
                                                                                                   top_p=0.9)],
                         ids=["temperature", "top_k", "top_p"])
def test_seeded_sampling_equals_memzoo(sampling):
    model, prompt = tiny_hf(seed=1), ids(B=3, T=4)
    torch.manual_seed(123)
    ref = model.to_memzoo().generate(prompt, 12, **sampling)
    hf_kwargs = {"top_k": None, "top_p": None, **sampling}
    torch.manual_seed(123)
    out = model.generate(prompt, max_new_tokens=12, do_sample=True, **hf_kwargs)
    assert torch.equal(out, ref)
    torch.manual_seed(124)
    assert not torch.equal(model.generate(prompt, max_new_tokens=12, do_sample=True, **hf_kwargs), ref)


def test_beam_search_reorders_the_state():
    model, prompt = tiny_hf(), ids(T=4)
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, early_stopping=True)
    assert torch.equal(model.generate(prompt, **kw), model.generate(prompt, use_cache=False, **kw))


def test_pinned_generation_path(monkeypatch):
    """Fails loudly if a transformers upgrade changes what ``generate`` does with this model.

    The contract memzoo relies on: no default cache object; one prefill call with the whole
    prompt and no state; then one call per new token with exactly that token and the state
    returned by the previous call, under the cache keyword of this transformers version
    (``hf.CACHE_FIELD``: ``past_key_values``, renamed ``cache`` in 5.x).  A failure here means
    docs/hf.md's route needs revisiting.
    """
    assert MemzooForCausalLM._supports_default_dynamic_cache() is False
    model, prompt = tiny_hf(), ids(T=5)
    calls = []
    forward = MemzooForCausalLM.forward

    def recording_forward(self, input_ids=None, **kwargs):
        state = kwargs.get(hf.CACHE_FIELD)
        calls.append(dict(ids=None if input_ids is None else input_ids.tolist(), past=state,
                          keys=sorted(k for k, v in kwargs.items() if v is not None and k != hf.CACHE_FIELD),
                          logits_to_keep=kwargs.get("logits_to_keep"), use_cache=kwargs.get("use_cache")))
        out = forward(self, input_ids=input_ids, **kwargs)
        calls[-1]["returned"] = out[hf.CACHE_FIELD]
        return out

    monkeypatch.setattr(MemzooForCausalLM, "forward", recording_forward)
    out = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert len(calls) == 4
    assert calls[0]["ids"] == prompt.tolist() and calls[0]["past"] is None
    for i, call in enumerate(calls):
        assert call["keys"] == ["logits_to_keep", "return_dict", "use_cache"], call["keys"]
        assert call["logits_to_keep"] == 1 and call["use_cache"] is True
        if i:
            # Every step after the prompt gets exactly one token and the previous step's state.
            assert call["past"] is calls[i - 1]["returned"] and call["past"].seen == 5 + i - 1
            assert call["ids"] == out[:, 5 + i - 1:5 + i].tolist()
    assert torch.equal(out, model.to_memzoo().generate(prompt, 4))


def test_both_cache_keywords_continue_the_state():
    model, x = tiny_hf(), ids()
    with torch.no_grad():
        a = model(x[:, :4])
        state = a[hf.CACHE_FIELD]
        assert isinstance(state, MemzooState) and state.seen == 4
        for key in ("past_key_values", "cache"):
            b = model(x[:, 4:], **{key: state})
            torch.testing.assert_close(torch.cat((a.logits, b.logits), 1), model(x).logits, rtol=1e-5, atol=1e-5)
        with pytest.raises(TypeError, match="same argument"):
            model(x[:, 4:], past_key_values=state, cache=state)


def test_conversion_round_trip(tmp_path):
    torch.manual_seed(0)
    lm = LanguageModel(ModelConfig(vocab_size=V, d_model=32, n_layers=2, pattern=("gla", "attention"),
                                   d_ff=64)).eval()
    src = write_memzoo_folder(lm, tmp_path / "final", extra_files=["tokenizer.json"])
    x = ids()
    with torch.no_grad():
        ref = lm(x).logits
        hf_dir = hf.memzoo_to_hf(src, tmp_path / "hf", eos_token_id=2)
        model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
        assert model.config.eos_token_id == 2 and (hf_dir / "tokenizer.json").is_file()
        assert torch.equal(model(x).logits, ref)
        back = hf.hf_to_memzoo(hf_dir, tmp_path / "back")
        assert json.loads((back / "config.json").read_text()) == lm.config.to_dict()
        assert torch.equal(memzoo.from_pretrained(back)(x).logits, ref)


def test_convert_cli(tmp_path, capsys):
    torch.manual_seed(0)
    lm = LanguageModel(ModelConfig(vocab_size=V, d_model=32, n_layers=1, pattern=("gated_delta",), d_ff=64,
                                   tie_embeddings=False)).eval()
    src = write_memzoo_folder(lm, tmp_path / "final")
    x = ids()
    assert hf.main(["convert", str(src), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "memzoo"
    assert hf.main(["convert", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    assert "wrote memzoo model" in capsys.readouterr().out
    with torch.no_grad():
        assert torch.equal(memzoo.from_pretrained(tmp_path / "back")(x).logits, lm(x).logits)
    with pytest.raises(FileNotFoundError, match="src"):
        hf.main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")])
