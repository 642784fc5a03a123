"""MEMZOO_DEBUG=1: LanguageModel.forward names the first stage (embeddings, layer, head, incoming state) where a
non-finite value enters, and the first position of it; nothing is reported without debug mode or when all is finite."""

import warnings

import pytest
import torch

from memzoo.models import LanguageModel, ModelConfig
from memzoo.models.lm import NonFiniteWarning


@pytest.fixture
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=3, pattern=("attention", "s4d", "attention"),
                      mixers={"attention": {"n_heads": 2}}, d_ff=32)
    return LanguageModel(cfg).eval()


@pytest.fixture
def ids():
    return torch.randint(1, 50, (2, 30), generator=torch.Generator().manual_seed(1))


def reports(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            fn()
    return [str(w.message) for w in caught if issubclass(w.category, NonFiniteWarning)]


def test_names_the_layer_that_lets_a_nan_in(model, ids, monkeypatch):
    monkeypatch.setenv("MEMZOO_DEBUG", "1")
    with torch.no_grad():
        model.blocks[1].mixer.o_proj.weight[0, 0] = float("nan")
    got = reports(lambda: model(ids))
    assert len(got) == 1
    assert "enters at layer 1 (the block around S4D)" in got[0] and "batch row 0, position 0" in got[0]


def test_names_the_embedding_row_and_position(model, ids, monkeypatch):
    monkeypatch.setenv("MEMZOO_DEBUG", "1")
    ids[1, 12] = 0
    with torch.no_grad():
        model.embed.weight[0] = float("inf")
    got = reports(lambda: model(ids))
    assert len(got) == 1
    assert "(inf) enters at the token embeddings" in got[0] and "batch row 1, position 12" in got[0]


def test_names_inputs_embeds_position(model, monkeypatch):
    monkeypatch.setenv("MEMZOO_DEBUG", "1")
    x = torch.randn(1, 20, 16)
    x[0, 7, 3] = float("nan")
    got = reports(lambda: model(inputs_embeds=x))
    assert len(got) == 1 and "enters at inputs_embeds: batch row 0, position 7" in got[0]


def test_names_the_output_head(model, ids, monkeypatch):
    monkeypatch.setenv("MEMZOO_DEBUG", "1")
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")  # tied: also the embedding row of token 3
    ids = ids.masked_fill(ids == 3, 4)
    got = reports(lambda: model(ids))
    assert len(got) == 1 and "enters at the output head" in got[0]


def test_names_a_non_finite_incoming_state(model, ids, monkeypatch):
    monkeypatch.setenv("MEMZOO_DEBUG", "1")
    with torch.no_grad():
        state = model(ids).state
    state = (state[0], state[1]._replace(x=state[1].x.clone().fill_(float("nan"))), state[2])
    got = reports(lambda: model(ids, state=state))
    assert len(got) == 1 and "incoming state[1] already holds non-finite values" in got[0]


def test_silent_when_finite_or_without_debug(model, ids, monkeypatch):
    monkeypatch.setenv("MEMZOO_DEBUG", "1")
    assert reports(lambda: model(ids)) == []
    monkeypatch.setenv("MEMZOO_DEBUG", "0")
    with torch.no_grad():
        model.blocks[1].mixer.o_proj.weight[0, 0] = float("nan")
    assert reports(lambda: model(ids)) == []
