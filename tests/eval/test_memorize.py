"""memzoo-bench memorize: the scorers against hand-computed cases, the protocols on oracles and tiny models."""

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from memzoo.eval.cli import main as bench_main
from memzoo.eval.memorize import (
    LMAdapter,
    MemorizeConfig,
    item_losses,
    make_materials,
    recall_scores,
    run_context,
    run_weights,
    two_afc,
)
from memzoo.models import ModelConfig, build_model
from memzoo.train.data import ByteTokenizer


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_two_afc_by_hand():
    # wins: 1 < 2, a tie (one half), 3 > 1  ->  1.5 / 3
    assert two_afc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 2.0, 1.0])) == pytest.approx(0.5)
    assert two_afc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4])) == 1.0
    with pytest.raises(ValueError, match="loss_studied"):
        two_afc(torch.tensor([1.0]), torch.tensor([1.0, 2.0]))


def test_recall_scores_by_hand():
    gen = torch.tensor([[1, 2, 3], [4, 5, 6]])
    target = torch.tensor([[1, 2, 3], [4, 0, 6]])
    assert recall_scores(gen, target) == (pytest.approx(0.5), pytest.approx(5 / 6))
    with pytest.raises(ValueError, match="generated"):
        recall_scores(gen[:, :2], target)


def test_item_losses_by_hand():
    # V = 2; logits (0, log 3) give p(token 1) = 3/4.  ids 0 1 1 0: from start=2 the targets are ids[2], ids[3]
    # predicted by positions 1 and 2: -log(3/4) and -log(1/4).
    logits = torch.tensor([[[0.0, math.log(3)]] * 4])
    ids = torch.tensor([[0, 1, 1, 0]])
    want = (-math.log(3 / 4) - math.log(1 / 4)) / 2
    assert item_losses(logits, ids, 2).item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="start"):
        item_losses(logits, ids, 0)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="mode"):
        MemorizeConfig(mode="dream")
    with pytest.raises(ValueError, match="exposures"):
        MemorizeConfig(exposures=(0,))
    with pytest.raises(ValueError, match="cue_fraction"):
        MemorizeConfig(cue_fraction=1.0)
    with pytest.raises(ValueError, match="materials"):
        MemorizeConfig(materials=("poems",))


def test_materials_are_disjoint_and_matched():
    cfg = MemorizeConfig(n_items=8, item_len=24)
    mats = make_materials(ByteTokenizer(), cfg, n_new=16)
    for mat in mats.values():
        assert mat.studied.shape == mat.novel.shape == (8, 24) and mat.new.shape == (16, 24)
        rows = {tuple(r) for r in torch.cat([mat.studied, mat.novel, mat.new]).tolist()}
        assert len(rows) == 32, "studied, novel and new items overlap"
    assert ByteTokenizer().decode(mats["sentences"].studied[0].tolist()).isprintable()
    with pytest.raises(ValueError, match="item_len"):
        make_materials(ByteTokenizer(), MemorizeConfig(n_items=8, item_len=100_000), n_new=4)


class _Oracle:
    """An LMAdapter stand-in with perfect copying inside its last ``window`` tokens (None: everywhere)."""

    def __init__(self, window=None):
        self.model = nn.Linear(1, 1)
        self.window = window

    def _seen(self, context, probe):
        ctx = context if self.window is None else context[-self.window:]
        L = len(probe)
        return any(ctx[i:i + L] == probe for i in range(len(ctx) - L + 1))

    def item_losses(self, ids, start):
        return torch.tensor([0.0 if self._seen(r[:start].tolist(), r[start:].tolist()) else 1.0 for r in ids])

    def greedy(self, ids, n):
        out = []
        for row in ids.tolist():
            ctx = row if self.window is None else row[-self.window:]
            cue = ctx[-16:]
            hit = next((i for i in range(len(ctx) - len(cue) - 1, -1, -1) if ctx[i:i + len(cue)] == cue), None)
            cont = ctx[hit + len(cue):hit + len(cue) + n] if hit is not None else []
            out.append((cont + [0] * n)[:n])
        return torch.tensor(out)


def test_context_protocol_on_copy_oracles():
    cfg = MemorizeConfig(mode="context", n_items=8, item_len=32, items_per_trial=2, distractors=(0, 96, 300))
    mats = make_materials(ByteTokenizer(), cfg, n_new=64)
    for row in run_context(_Oracle(), mats, cfg):
        assert row["recognition"] == 1.0 and row["recall_exact"] == 1.0, row
    # A memory of 180 tokens holds the 2 x 32-token study list, a 96-token distractor and the 16-token cue,
    # not a 300-token distractor.
    rows = {(r["material"], r["distractor"]): r for r in run_context(_Oracle(window=180), mats, cfg)}
    for material in ("sentences", "random"):
        assert rows[material, 96]["recognition"] == 1.0 and rows[material, 96]["recall_exact"] == 1.0
        assert rows[material, 300]["recognition"] == 0.5 and rows[material, 300]["recall_exact"] == 0.0


def _tiny_lm(seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(vocab_size=ByteTokenizer.vocab_size, d_model=64, n_layers=1,
                                   pattern=("attention",), d_ff=128))


def test_studying_beats_chance_and_not_studying_does_not():
    cfg = MemorizeConfig(materials=("sentences",), n_items=48, item_len=16, exposures=(20,), retention_updates=20,
                         probe_every=10, batch_size=8, lr=3e-3)
    mats = make_materials(ByteTokenizer(), cfg, n_new=64)
    rows = run_weights(LMAdapter(_tiny_lm()), mats, cfg)
    before = next(r for r in rows if r["phase"] == "before")
    after = next(r for r in rows if r["phase"] == "study")
    assert 0.3 <= before["recognition"] <= 0.7, before
    # The sentences come from Python's own help text, which changes between versions: recognition after study is
    # 0.96 on 3.11's text and 0.77 on 3.10's (the floor CI tests), against 0.44 to 0.46 before.
    assert after["recognition"] >= 0.75 and after["study_updates"] == 20 * 6, after
    assert after["loss_studied"] < after["loss_novel"] - 0.2, after
    retention = [r for r in rows if r["phase"] == "retention"]
    assert [r["update"] for r in retention] == [10, 20]


def test_cli_writes_json_csv_and_plots(tmp_path, capsys):
    import matplotlib.pyplot as plt

    open_before = set(plt.get_fignums())
    args = ["memorize", "--preset", "ci", "--model", "attention", "--d-model", "32", "--n-layers", "1",
            "--n-items", "8", "--item-len", "16", "--exposures", "1,3", "--retention-updates", "4",
            "--probe-every", "2", "--pretrain-steps", "3", "--no-progress", "--out", str(tmp_path)]
    assert bench_main(args) == 0
    result = json.loads(next((tmp_path / "results").glob("memorize-*.json")).read_text())
    rows = result["models"]["attention"]["rows"]
    assert {(r["material"], r["exposures"], r["phase"]) for r in rows} >= {("sentences", 3, "study"),
                                                                           ("random", 1, "retention")}
    assert result["environment"]["torch"] == torch.__version__
    csv_lines = (tmp_path / "memorize.csv").read_text().splitlines()
    assert csv_lines[0].startswith("run_id,created,mode") and len(csv_lines) == 1 + len(rows)
    assert len(list((tmp_path / "plots").glob("*.png"))) == 2
    assert bench_main(args[:3] + ["--mode", "context", "--distractors", "0,32", "--model", "gated_delta",
                                  "--d-model", "32", "--n-layers", "1", "--n-items", "8", "--item-len", "16",
                                  "--pretrain-steps", "0", "--no-progress", "--out", str(tmp_path)]) == 0
    assert len(list((tmp_path / "plots").glob("*context.png"))) == 1
    assert set(plt.get_fignums()) == open_before  # every plot closed its figure
    capsys.readouterr()
    assert bench_main(["memorize", "--model", "attention,no_such"]) == 2
    assert "--model 'no_such'" in capsys.readouterr().err
    assert bench_main(["memorize", "--exposures", "0"]) == 2
    assert "exposures" in capsys.readouterr().err
    assert bench_main(["memorize", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_a_transformers_model_runs_both_protocols():
    transformers = pytest.importorskip("transformers", reason="the optional hf extra is not installed")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0))
    lm = LMAdapter(model)
    assert lm.is_hf
    cfg = MemorizeConfig(n_items=8, item_len=16, exposures=(2,), retention_updates=2, probe_every=1,
                         items_per_trial=2, distractors=(0, 16))
    mats = make_materials(ByteTokenizer(), cfg, n_new=32)
    rows = run_weights(lm, mats, cfg)
    assert len(rows) == 2 * (1 + 1 + 2) and all(0 <= r["recognition"] <= 1 for r in rows)
    # Greedy recall through HF generate equals argmax recomputation of the same model.
    cue = mats["sentences"].studied[:2, :8]
    seq = cue
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(lm.greedy(cue, 4), seq[:, 8:])
    ctx_rows = run_context(lm, mats, dataclasses.replace(cfg, mode="context"))
    assert [r["distractor"] for r in ctx_rows] == [0, 16, 0, 16]
