"""The language model: loss, state, generation, configs, registry, parameter counts, aux losses."""

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import memzoo
from memzoo.models import MIXERS, LanguageModel, Mixer, ModelConfig, build_model, get_preset, sample_next
from memzoo.testing import assert_close, assert_states_close

V = 50


def tiny(pattern=("attention",), n_layers=2, **kw):
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(vocab_size=V, d_model=32, n_layers=n_layers, pattern=pattern, **kw)).eval()


def ids(B=2, T=12, seed=3):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# Every registered mixer, alone and interleaved with attention (the hybrid layer pattern).
PATTERNS = [pytest.param((n,), id=n) for n in MIXERS] + [
    pytest.param((n, n, "attention"), id=f"{n}-hybrid") for n in MIXERS if n != "attention"
]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_chained_and_step_equal_full(pattern):
    model, x = tiny(pattern, n_layers=3), ids()
    full = model(x)
    a = model(x[:, :5])
    b = model(x[:, 5:], state=a.state)
    assert_close(torch.cat((a.logits, b.logits), 1), full.logits, 1e-5, "chained logits")
    assert_states_close(b.state, full.state, 1e-5, "chained state")
    state = model(x[:, :1]).state
    logits = []
    for t in range(1, x.shape[1]):
        lg, state = model.step(x[:, t], state)
        logits.append(lg)
    assert_close(torch.stack(logits, 1), full.logits[:, 1:], 1e-5, "step logits")


@pytest.mark.parametrize("pattern", PATTERNS)
def test_generate_with_cache_equals_recompute(pattern):
    model, prompt = tiny(pattern, n_layers=3), ids(T=5)
    out = model.generate(prompt, max_new_tokens=10)
    assert out.shape == (2, 15) and torch.equal(out[:, :5], prompt)
    seq = prompt
    for _ in range(10):
        nxt = model(seq).logits[:, -1].argmax(-1)
        seq = torch.cat((seq, nxt[:, None]), 1)
    assert torch.equal(out, seq)


def test_loss_is_shifted_cross_entropy_with_ignore_index():
    model, x = tiny(), ids()
    labels = x.clone()
    labels[0, 4] = -100
    out = model(x, labels=labels)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, ref) and torch.equal(out.loss, out.ce_loss) and out.aux_losses == {}
    assert model(x).loss is None


def test_packed_loss_never_crosses_a_sequence_boundary():
    model = tiny()
    a, b = ids(1, 7, seed=1), ids(1, 4, seed=2)
    packed = torch.cat((a, b), 1)
    out = model(packed, labels=packed, cu_seqlens=torch.tensor([0, 7, 7, 11]))
    la, lb = model(a).logits, model(b).logits
    # Mean over the 6 + 3 within-sequence predictions only.
    ce = torch.cat((F.cross_entropy(la[0, :-1], a[0, 1:], reduction="none"),
                    F.cross_entropy(lb[0, :-1], b[0, 1:], reduction="none")))
    assert torch.allclose(out.loss, ce.mean(), atol=1e-5)


def test_logits_to_keep():
    model, x = tiny(), ids()
    assert_close(model(x, logits_to_keep=1).logits, model(x).logits[:, -1:], 1e-6, "last logits")
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(x, labels=x, logits_to_keep=1)


def test_packed_model_equals_separate():
    model = tiny()
    a, b = ids(1, 7, seed=1), ids(1, 4, seed=2)
    packed = model(torch.cat((a, b), 1), cu_seqlens=torch.tensor([0, 7, 11]))
    assert_close(packed.logits[:, :7], model(a).logits, 1e-5, "first sequence")
    assert_close(packed.logits[:, 7:], model(b).logits, 1e-5, "second sequence")


def test_quickstart_trains_and_generates():
    model = memzoo.build_model("attention-tiny").train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(20):
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # Memorising one fixed random batch: the loss must fall well below log(256) = 5.55.
    assert losses[-1] < losses[0] - 0.5, losses
    out = model.eval().generate(batch[:2, :4], max_new_tokens=8, temperature=0.8, top_k=20,
                                generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 12) and int(out.max()) < 256


def test_sampling_controls():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample_next(logits).item() == 1
    assert sample_next(logits, temperature=1.0, top_k=1).item() == 1
    assert sample_next(logits, temperature=1.0, top_p=1e-3).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, temperature=1.0, top_k=2, generator=g) for _ in range(200)])
    assert set(draws.flatten().tolist()) == {1, 3}
    # Probabilities: token 1 .644, token 3 .237, token 2 .087, token 0 .032; a token stays while the
    # mass ranked above it is below top_p, so top_p=0.85 keeps {1, 3} and top_p=0.9 keeps {1, 3, 2}.
    for top_p, kept in ((0.85, {1, 3}), (0.9, {1, 2, 3})):
        draws = torch.stack([sample_next(logits, temperature=1.0, top_p=top_p, generator=g) for _ in range(400)])
        assert set(draws.flatten().tolist()) == kept
    for bad in ({"temperature": -1.0}, {"top_k": 0}, {"top_p": 0.0}):
        with pytest.raises(ValueError):
            sample_next(logits, **bad)


def test_generate_eos_and_seeded_sampling():
    model, prompt = tiny(), ids(T=3)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = model.generate(prompt, 6, temperature=1.0, generator=g1)
    b = model.generate(prompt, 6, temperature=1.0, generator=g2)
    assert torch.equal(a, b)
    greedy = model.generate(prompt, 6)
    eos = int(greedy[0, 3])
    out = model.generate(prompt, 6, eos_token_id=eos)
    assert (out[0, 3:] == eos).all()
    assert torch.equal(model.generate(prompt, 0), prompt)


def test_parameter_counts_with_tied_and_untied_head():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    emb = V * 32
    assert untied.num_parameters() == tied.num_parameters() + emb
    assert tied.num_parameters(exclude_embeddings=True) == tied.num_parameters() - emb
    assert tied.num_activated_parameters() == tied.num_parameters()
    assert tied.lm_head.weight is tied.embed.weight


def test_flops_per_token_matches_the_counting_rule():
    model = tiny(n_layers=2, tie_embeddings=False)
    non_embedding = model.num_parameters() - 2 * V * 32
    # 6 x matmul parameters + head + 12 H d T per attention layer.
    assert model.flops_per_token(16) == 6 * non_embedding + 6 * V * 32 + 2 * 12 * 32 * 16
    assert model.split_multiple == 1


def test_state_size_sums_layers():
    model = tiny(n_layers=3)
    assert model.state_size(10) == 3 * 2 * 32 * 10


def test_config_json_round_trip_and_build_paths():
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=3, pattern=("attention",),
                      mixers={"attention": {"n_heads": 2, "window": 8}}, d_ff=0)
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg and again.layer_types == ("attention",) * 3
    assert build_model(json.loads(cfg.to_json())).config == cfg
    model = build_model("attention-tiny", n_layers=3)
    assert len(model.blocks) == 3 and model.blocks[0].mlp is not None
    assert build_model(cfg).blocks[0].mlp is None
    assert get_preset("attention-small").mixer_config("attention").n_kv_heads == 2


def test_config_is_isolated_from_caller_dicts():
    opts = {"attention": {"n_heads": 2}}
    cfg = ModelConfig(d_model=32, mixers=opts)
    opts["attention"]["n_heads"] = 4
    assert cfg.mixers["attention"]["n_heads"] == 2


@pytest.mark.parametrize("kwargs,err,match", [
    ({"pattern": ("nope",)}, ValueError, "unknown mixer"),
    ({"mixers": {"attention": {"n_head": 2}}}, ValueError, "bad options"),
    ({"mixers": {"attention": {"n_heads": 3}}}, ValueError, "divisible"),
    ({"mixers": {"attention": {"d_model": 8}}}, ValueError, "set by the model"),
    ({"pattern": ("attention",), "mixers": {"gla": {}}}, ValueError, "never uses"),
    ({"d_ff": -1}, ValueError, "d_ff"),
    ({"n_layers": 0}, ValueError, "positive"),
])
def test_config_errors(kwargs, err, match):
    with pytest.raises(err, match=match):
        ModelConfig(d_model=32, **kwargs)


def test_unknown_keys_and_presets_rejected():
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({"d_model": 32, "heads": 2})
    with pytest.raises(ValueError, match="unknown model preset"):
        build_model("gpt-5")
    with pytest.raises(TypeError, match="preset name"):
        build_model(3)


def test_bad_model_inputs_raise():
    model, x = tiny(), ids()
    with pytest.raises(TypeError, match="integer token ids"):
        model(x.float())
    with pytest.raises(ValueError, match="shape"):
        model(x[0])
    with pytest.raises(ValueError, match="vocab_size"):
        model(x + V)
    with pytest.raises(ValueError, match="labels"):
        model(x, labels=x[:, :-1])
    state = model(x).state
    with pytest.raises(ValueError, match="batch size"):
        model(x[:1], state=state)
    with pytest.raises(ValueError, match="tuple of 2"):
        model(x, state=state[:1])
    with pytest.raises(ValueError, match=r"\[B\]"):
        model.step(x, state)


@dataclass(frozen=True)
class _AuxConfig:
    d_model: int = 32
    weight: float = 0.5


class _AuxMixer(Mixer):
    """A stateless test mixer that records an auxiliary loss, to test the shared mechanism."""

    config_class = _AuxConfig

    def __init__(self, config=None, /, **kw):
        super().__init__(config, **kw)
        self.proj = torch.nn.Linear(self.d_model, self.d_model)

    def _forward(self, x, state, *, cu_seqlens):
        y = self.proj(x)
        self.record_aux_loss("balance", self.config.weight * y.pow(2).mean())
        return y, None

    def init_state(self, batch_size, *, device=None, dtype=None):
        return None

    def state_size(self, seq_len=None):
        return 0


def test_aux_losses_reach_the_model_loss(monkeypatch):
    monkeypatch.setitem(MIXERS, "aux", _AuxMixer)
    model, x = tiny(pattern=("aux", "attention"), n_layers=4), ids()
    out = model(x, labels=x)
    assert sorted(out.aux_losses) == ["layers.0.balance", "layers.2.balance"]
    assert torch.allclose(out.loss, out.ce_loss + sum(out.aux_losses.values()))
    # Collected (and cleared) by the model: nothing stale stays on the layers.
    assert all(m._aux_losses == {} for m in model.mixers)
    out.loss.backward()
    assert model.blocks[0].mixer.proj.weight.grad is not None
    # A second pass reports that pass's terms, not an accumulation.
    assert len(model(x, labels=x).aux_losses) == 2


def test_meta_build_then_deferred_init():
    # A model built on the meta device draws nothing (parameter counts stay cheap); to_empty + reset_parameters
    # then gives it the usual init.
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, pattern=("attention",))
    with torch.device("meta"):
        model = LanguageModel(cfg)
    assert model.embed.weight.is_meta and model.num_parameters() == LanguageModel(cfg).num_parameters()
    model.to_empty(device="cpu")
    model.reset_parameters()
    std = model.embed.weight.std().item()
    assert abs(std - cfg.init_std) < 0.2 * cfg.init_std
    assert model.blocks[0].mlp.up_proj.weight.std().item() > 0.5 * cfg.init_std
