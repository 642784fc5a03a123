"""Discrete Key-Value Bottleneck (arXiv 2207.11240): a float64 oracle, gradients, key init, the Block FFN slot."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memzoo.models import LanguageModel, ModelConfig
from memzoo.models.block import Block
from memzoo.models.wrappers.dkvb import DiscreteKVBottleneck, DKVBConfig, DKVBFeedForward

pytestmark = pytest.mark.usefixtures("one_thread")


def bottleneck(seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"d_in": 12, "n_codebooks": 3, "n_keys": 50, "d_key": 4, "d_value": 5, **kw}
    return DiscreteKVBottleneck(DKVBConfig(**kw))


def oracle(m, x):
    """Steps (1)-(4) in float64, straight from the paper: explicit squared distances, a stable sort per codebook."""
    c = m.config
    x = x.double().reshape(-1, c.d_in)
    out, chosen = [], []
    for row in x:
        heads, idx_row = [], []
        for b in range(c.n_codebooks):
            z = row @ m.proj[b].double()  # (1)
            dist = ((z[None] - m.keys[b].double()) ** 2).sum(-1)  # (2)
            nearest = torch.sort(dist, stable=True).indices[:c.top_k]
            idx_row.append(nearest)
            heads.append(m.values[b].double()[nearest].mean(0))  # (3)
        chosen.append(torch.stack(idx_row))
        h = torch.stack(heads)  # [C, d_value]
        if c.decoder == "mean":  # (4)
            out.append(h.mean(0))
        else:
            out.append(h.reshape(-1) @ m.decoder.weight.double().T + m.decoder.bias.double())
    return torch.stack(out), torch.stack(chosen)


CASES = [
    pytest.param({}, id="mean-k1"),
    pytest.param({"top_k": 3}, id="mean-k3"),
    pytest.param({"decoder": "linear", "d_out": 7}, id="linear-k1"),
    pytest.param({"decoder": "linear", "d_out": 7, "top_k": 4, "n_codebooks": 1}, id="linear-k4-C1"),
    pytest.param({"block_n": 16}, id="tiled-block16"),
    pytest.param({"n_keys": 3000, "block_n": 512, "top_k": 2}, id="large-codebook"),
]


TRITON_CASES = [
    pytest.param({"top_k": 3}, id="triton-mean-k3"),
    pytest.param({"decoder": "linear", "d_out": 7, "block_n": 16}, id="triton-linear-block16"),
]


@pytest.mark.parametrize("kw", CASES + TRITON_CASES)
def test_matches_float64_oracle(kw, request, monkeypatch):
    if "triton" in request.node.callspec.id:
        # The Triton streaming search (the CUDA path), here through the interpreter (tests/conftest.py sets it).
        monkeypatch.setenv("MEMZOO_KERNEL_IMPL", "triton")
    m = bottleneck(**kw)
    x = torch.randn(4, 5, 12, generator=torch.Generator().manual_seed(1))
    y = m(x)
    ref, ref_idx = oracle(m, x)
    idx, dist = m.select(x)
    c = m.config
    assert y.shape == (4, 5, c.d_output) and idx.shape == (4, 5, c.n_codebooks, c.top_k)
    assert torch.equal(idx.reshape(ref_idx.shape), ref_idx)
    torch.testing.assert_close(y.reshape(ref.shape).double(), ref, rtol=1e-5, atol=1e-5)
    # The reported distances are the squared distances to the chosen keys, nearest first.
    z = m.project(x).double()  # [C, M, d_key]
    picked = torch.gather(m.keys.double(), 1, idx.reshape(-1, *idx.shape[-2:]).transpose(0, 1).flatten(1)[..., None]
                          .expand(-1, -1, m.config.d_key))
    want = ((z.repeat_interleave(m.config.top_k, 1) - picked) ** 2).sum(-1)
    got = dist.reshape(-1, *dist.shape[-2:]).transpose(0, 1).flatten(1).double()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert bool((dist[..., 1:] >= dist[..., :-1]).all())


def test_only_values_receive_gradients():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(6, 12), nn.Tanh())
    cfg = DKVBConfig(d_in=12, n_codebooks=3, n_keys=40, d_key=4, d_value=5, top_k=2)
    m = DiscreteKVBottleneck(cfg, encoder=encoder)
    m.fit_keys(torch.randn(200, 6), generator=torch.Generator().manual_seed(0))
    m.train()
    keys, proj = m.keys.clone(), m.proj.clone()
    x = torch.randn(8, 6, requires_grad=True)
    loss = F.cross_entropy(m(x), torch.randint(0, 5, (8,)))
    loss.backward()
    assert x.grad is None and all(p.grad is None for p in encoder.parameters())
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["values"]
    assert m.trainable_parameters() == [m.values]
    assert torch.equal(m.keys, keys) and torch.equal(m.proj, proj)
    # Exactly the selected (codebook, key) rows move.
    idx, _ = m.select(x)  # [8, C, k]
    selected = torch.zeros(3, 40, dtype=torch.bool)
    selected[torch.arange(3)[None, :, None].expand_as(idx), idx] = True
    assert torch.equal(m.values.grad.abs().sum(-1) > 0, selected)


def test_linear_decoder_trains_too():
    m = bottleneck(decoder="linear", d_out=3)
    m(torch.randn(4, 12)).sum().backward()
    assert {n for n, p in m.named_parameters() if p.grad is not None} == {"values", "decoder.weight", "decoder.bias"}


def blobs(n_per=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0], [0.0, -4.0]])
    x = (centres[:, None] + 0.3 * torch.randn(4, n_per, 2, generator=g)).reshape(-1, 2)
    perm = torch.randperm(len(x), generator=g)
    return x[perm], centres, torch.arange(4).repeat_interleave(n_per)[perm]


def _nearest_gap(keys, centres):
    """For every centre, the distance to its nearest key; and whether each centre owns a distinct key."""
    d = torch.cdist(centres, keys)
    return d.min(1).values, d.argmin(1).unique().numel() == len(centres)


def test_fit_keys_finds_the_clusters_and_freezes():
    x, centres, labels = blobs()
    m = bottleneck(d_in=2, n_codebooks=2, n_keys=4, d_key=2, ema_steps=5)
    # Codebook 0 sees the plane as is (a random 2-D projection may squash two clusters together).
    m.proj[0] = torch.eye(2)
    m.fit_keys(x, iters=20, generator=torch.Generator().manual_seed(3))
    means = torch.stack([x[labels == i].mean(0) for i in range(4)])
    gap, distinct = _nearest_gap(m.keys[0], means)
    assert distinct and float(gap.max()) < 1e-4, gap
    # Every codebook is at a Lloyd fixed point: each key is the mean of the projected inputs nearest to it.
    z = m.project(x)
    idx, _ = m.select(x)
    for b in range(2):
        for i in range(4):
            torch.testing.assert_close(z[b][idx[:, b, 0] == i].mean(0), m.keys[b, i])
    assert bool(m.keys_ready) and int(m.ema_done) == 5
    keys = m.keys.clone()
    m.train()
    m(x[:32])
    assert torch.equal(m.keys, keys), "frozen keys moved in a training forward"
    with pytest.raises(ValueError, match="at least n_keys=4 rows"):
        m.fit_keys(x[:3])


def test_ema_key_init_converges_and_warmup_freezes():
    x, centres, _ = blobs(n_per=500)
    m = bottleneck(d_in=2, n_codebooks=1, n_keys=4, d_key=2, ema_decay=0.9)
    m.proj[0] = torch.eye(2)
    torch.manual_seed(5)
    for batch in x.split(64):
        m.ema_update_keys(batch)
    gap, _ = _nearest_gap(m.keys[0], centres @ m.proj[0])
    # EMA placement can leave two keys on one cluster; most clusters get a key.
    assert int((gap < 0.3).sum()) >= 3, gap
    # ema_steps: the first training forwards move the keys, then they stay; eval forwards never move them.
    m = bottleneck(d_in=2, n_codebooks=1, n_keys=4, d_key=2, ema_steps=2)
    keys0 = m.keys.clone()
    m.eval()
    m(x[:64])
    assert torch.equal(m.keys, keys0) and int(m.ema_done) == 0
    m.train()
    seen = []
    for batch in x[:256].split(64):
        m(batch)
        seen.append(m.keys.clone())
    assert not torch.equal(seen[0], keys0) and not torch.equal(seen[1], seen[0])
    assert torch.equal(seen[1], seen[2]) and torch.equal(seen[2], seen[3]) and int(m.ema_done) == 2
    # Loading a state from mid warm-up resumes the EMA updates (the finished flag is host-side).
    mid = {k: v.clone() for k, v in m.state_dict().items()}
    mid["ema_done"].fill_(1)
    m.load_state_dict(mid)
    m(x[:64])
    assert int(m.ema_done) == 2 and not torch.equal(m.keys, seen[3])


def test_bf16():
    m = bottleneck(decoder="linear", d_out=6)
    x = torch.randn(3, 7, 12).bfloat16()
    idx, _ = m.select(x)
    assert torch.equal(idx, m.select(x.float())[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16 and bool(torch.isfinite(y).all())
    y = m.to(torch.bfloat16)(x)
    assert y.dtype == torch.bfloat16 and bool(torch.isfinite(y).all())


BAD_CONFIGS = [
    pytest.param({"n_keys": 0}, "n_keys must be an int >= 1", id="n_keys"),
    pytest.param({"d_key": 2.0}, "d_key must be an int", id="d_key-float"),
    pytest.param({"top_k": 60}, "top_k=60 must be <= n_keys=50", id="top_k"),
    pytest.param({"decoder": "mlp"}, "decoder must be one of", id="decoder"),
    pytest.param({"decoder": "linear"}, "d_out", id="linear-needs-d_out"),
    pytest.param({"d_out": 3}, "d_out applies to the linear decoder only", id="d_out-mean"),
    pytest.param({"value_std": -1.0}, "value_std", id="value_std"),
    pytest.param({"ema_decay": 1.0}, "ema_decay", id="ema_decay"),
    pytest.param({"ema_steps": -1}, "ema_steps", id="ema_steps"),
    pytest.param({"block_n": 0}, "block_n", id="block_n"),
    pytest.param({"block_n": 24}, "power of two", id="block_n-not-pow2"),
]


@pytest.mark.parametrize("kw,match", BAD_CONFIGS)
def test_bad_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        bottleneck(**kw)


@pytest.mark.parametrize("x,exc,match", [
    pytest.param(torch.randn(4, 11), ValueError, r"x must have shape \[..., d_in=12\]", id="width"),
    pytest.param(torch.randn(0, 12), ValueError, "at least one row", id="empty"),
    pytest.param(torch.ones(4, 12, dtype=torch.int64), TypeError, "floating-point", id="int"),
    pytest.param([[0.0] * 12], TypeError, "x must be a tensor", id="list"),
])
def test_bad_inputs(x, exc, match):
    m = bottleneck()
    with pytest.raises(exc, match=match):
        m(x)
    with pytest.raises(exc, match=match):
        m.select(x)


def test_encoder_output_checked():
    m = DiscreteKVBottleneck(d_in=12, n_keys=8, encoder=nn.Linear(3, 5))
    with pytest.raises(ValueError, match=r"the encoder output must have shape \[..., d_in=12\]"):
        m(torch.randn(2, 3))


def lm(**opts):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layers=2, pattern=("attention", "gated_delta"),
                      mixers={"attention": {"n_heads": 2}, "gated_delta": {"n_heads": 2}}, ffn="dkvb",
                      ffn_opts={"n_keys": 64, "n_codebooks": 4, "d_key": 8, "d_value": 8, **opts})
    return LanguageModel(cfg)


def test_block_slot_contract():
    """Per token and stateless: chained segments == one pass, step == forward (the keys frozen / eval mode)."""
    model = lm(top_k=2).eval()
    assert all(isinstance(b.mlp, DKVBFeedForward) for b in model.blocks)
    ids = torch.randint(0, 40, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        for split in (1, 8, 17):
            a = model(ids[:, :split])
            b = model(ids[:, split:], state=a.state)
            torch.testing.assert_close(torch.cat([a.logits, b.logits], 1), full, rtol=1e-5, atol=1e-5)
        state = model.init_state(2)
        steps = []
        for t in range(ids.shape[1]):
            logits, state = model.step(ids[:, t], state)
            steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_block_slot_trains_values_and_warms_up_keys():
    model = lm(ema_steps=1).train()
    ffn = model.blocks[0].mlp.bottleneck
    keys0 = ffn.keys.clone()
    ids = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(2))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert not torch.equal(ffn.keys, keys0) and int(ffn.ema_done) == 1
    assert ffn.values.grad is not None and float(ffn.values.grad.abs().sum()) > 0
    assert model.embed.weight.grad is not None  # the residual path still trains the layers below
    keys1 = ffn.keys.clone()
    model(ids, labels=ids)
    assert torch.equal(ffn.keys, keys1)


def test_block_and_model_config_errors():
    from memzoo.models.wrappers.hmt import HMT  # noqa: F401  (imports after the block: no import cycle)

    with pytest.raises(ValueError, match="ffn must be one of"):
        ModelConfig(ffn="moe")
    with pytest.raises(ValueError, match="ffn_opts apply to ffn='dkvb' only"):
        ModelConfig(ffn_opts={"n_keys": 4})
    with pytest.raises(ValueError, match=r"unknown ffn_opts \['nkeys'\]"):
        ModelConfig(ffn="dkvb", ffn_opts={"nkeys": 4})
    with pytest.raises(ValueError, match="may not set"):
        ModelConfig(ffn="dkvb", ffn_opts={"d_out": 4})
    with pytest.raises(ValueError, match="top_k must be"):
        ModelConfig(ffn="dkvb", ffn_opts={"top_k": 0})
    cfg = ModelConfig(ffn="dkvb", ffn_opts={"n_keys": 32})
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    from memzoo.models.layers.attention import Attention

    with pytest.raises(ValueError, match="ffn must be one of"):
        Block(Attention(d_model=16, n_heads=2), 32, ffn="nope")


def test_tiny_dkvb_train_preset():
    from memzoo.train.config import resolve_config

    cfg = resolve_config("tiny-dkvb")
    assert cfg.model.ffn == "dkvb" and cfg.model.ffn_opts["ema_steps"] == 50
    model = LanguageModel(cfg.model)
    assert all(isinstance(b.mlp, DKVBFeedForward) for b in model.blocks)
