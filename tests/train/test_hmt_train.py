"""memzoo-train with an HMT-wrapped model: presets, segment mode, resets, stage-2 loading."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import small_config

import memzoo
from memzoo.models import ModelConfig
from memzoo.models.lm import LanguageModel
from memzoo.models.wrappers.hmt import HMT, HMTConfig, HMTState
from memzoo.train import ConfigError, resolve_config, train
from memzoo.train.data import Batch
from memzoo.train.loop import run_segments

HMT_OVERRIDES = {"wrapper.name": "hmt", "wrapper.segment_len": 8, "wrapper.n_sensory": 2, "wrapper.cache_size": 4,
                 "wrapper.recall_dim": 8,
                 "data.segment_len": 8, "data.seq_len": 32, "train.micro_bs": 2}


def test_presets_resolve_to_the_two_stages():
    one, two = resolve_config("hmt_stage_1"), resolve_config("hmt_stage_2")
    (_, h1), (_, h2) = one.resolved_wrapper(), two.resolved_wrapper()
    assert isinstance(h1, HMTConfig) and one.wrapper["name"] == two.wrapper["name"] == "hmt"
    assert not h1.use_recall and one.data.detach_every == 2 and h1.init_from is None
    assert h2.use_recall and two.data.detach_every == 15
    assert h2.init_from and h2.init_from.startswith(one.out_dir)
    assert one.data.segment_len == h1.segment_len and one.data.pack == "stream"


def test_misaligned_segments_are_a_config_error():
    with pytest.raises(ConfigError, match="hmt segment_len=8"):
        resolve_config("tiny", overrides={"wrapper.name": "hmt", "wrapper.segment_len": "8", "wrapper.n_sensory": "2",
                                          "data.seq_len": "36", "data.segment_len": "12"})


def test_run_segments_resets_hmt_rows_and_cuts_the_graph():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=1, mixers={"attention": {"n_heads": 2}})
    model = HMT(LanguageModel(cfg), HMTConfig(segment_len=4, n_sensory=1, cache_size=3, recall_dim=4))
    ids = torch.randint(0, 32, (2, 12))
    resets = torch.tensor([[False, False, False], [False, True, False]])
    ce, _, state = run_segments(model, Batch(ids, ids, resets=resets), segment_len=4,
                                state=model.init_state(2), backward=lambda loss: loss.backward())
    assert isinstance(state, HMTState) and torch.isfinite(ce)
    assert all(not t.requires_grad for t in (state.cache, state.sensory))
    # Row 1 restarted before its second segment: two memories since then, row 0 has three.
    assert state.valid.sum(1).tolist() == [3, 2]


@pytest.mark.parametrize("stage", [1, 2])
def test_train_hmt_stages_end_to_end(tmp_path, stage):
    overrides = dict(HMT_OVERRIDES, **{"wrapper.use_recall": stage == 2, "train.max_steps": 6,
                                       "ckpt.export_safetensors": True, "data.pack": "stream", "optim.lr": 3e-3})
    if stage == 2:
        first = small_config(tmp_path / "one", **dict(overrides, **{"wrapper.use_recall": False}))
        train(first)
        overrides["wrapper.init_from"] = str(tmp_path / "one" / "final")
    cfg = small_config(tmp_path / "run", **overrides)
    summary = train(cfg)
    assert summary["step"] == 6 and summary["train_loss"] is not None
    lines = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "loss/train" in line]
    losses = [json.loads(line)["loss/train"] for line in lines]
    assert losses[-1] < losses[0]
    # The export names its wrapper and reloads as the same HMT.
    assert json.loads((tmp_path / "run" / "final" / "wrapper.json").read_text())["name"] == "hmt"
    loaded = memzoo.from_pretrained(summary["final"])
    assert isinstance(loaded, HMT) and loaded.config.use_recall == (stage == 2)
    ids = torch.randint(0, 256, (2, 16))
    trained = HMT(LanguageModel(cfg.model), loaded.config)
    trained.load_state_dict(loaded.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, trained.eval()(ids).logits)
    # The run's last Accelerate checkpoint folder reloads as the same HMT (the run config names the wrapper).
    ckpt = max((tmp_path / "run" / "checkpoints").glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[1]))
    resumed = memzoo.from_pretrained(ckpt)
    assert isinstance(resumed, HMT) and resumed.config == loaded.config
    with torch.no_grad():
        assert torch.equal(resumed(ids).logits, loaded(ids).logits)
