"""The wrapper protocol: a new wrapper written in one file trains with memzoo-train, exports, reloads with
``memzoo.from_pretrained`` and runs in memzoo-bench without touching train/ or eval/."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import memzoo
from memzoo.eval.config import ModelSpec
from memzoo.models.lm import LMOutput
from memzoo.models.wrappers.base import WRAPPERS, Wrapper, register_wrapper, resolve_wrapper
from memzoo.train import resolve_config, train


@dataclass(frozen=True)
class GainConfig:
    gain: float = 1.0

    def __post_init__(self) -> None:
        if self.gain <= 0:
            raise ValueError(f"gain must be > 0, got {self.gain}")


class Gain(Wrapper):
    """The smallest wrapper: a learned temperature on the backbone's logits."""

    name = "gain_test"
    config_class = GainConfig
    bench_defaults = {"gain": 0.5}

    def __init__(self, backbone: nn.Module, config: GainConfig) -> None:
        super().__init__()
        self.backbone, self.config = backbone, config
        self.gain = nn.Parameter(torch.tensor(float(config.gain)))

    def forward(self, input_ids, state=None, labels=None, *, cu_seqlens=None):
        out = self.backbone(input_ids, state=state, cu_seqlens=cu_seqlens)
        return LMOutput(logits=out.logits * self.gain, state=out.state)


@pytest.fixture
def gain_wrapper():
    register_wrapper(Gain)
    try:
        yield Gain
    finally:
        WRAPPERS.pop(Gain.name)


def test_registry_names_and_errors():
    assert set(WRAPPERS) >= {"hmt", "longmem"}
    with pytest.raises(ValueError, match="did you mean 'hmt'"):
        resolve_wrapper({"name": "htm"})
    with pytest.raises(ValueError, match=r"wrapper\.cache_sise: unknown hmt option \(did you mean 'cache_size'"):
        resolve_wrapper({"name": "hmt", "cache_sise": 3})
    with pytest.raises(TypeError, match="Wrapper subclass"):
        register_wrapper(nn.Linear)


def test_a_wrapper_in_one_file_trains_exports_reloads_and_benchmarks(gain_wrapper, tmp_path):
    run = tmp_path / "run"
    cfg = resolve_config("tiny", overrides={
        "wrapper.name": "gain_test", "wrapper.gain": "2.0", "model.d_model": "32", "model.n_layers": "1",
        "data.seq_len": "32", "train.micro_bs": "2", "train.max_steps": "2", "sched.warmup_steps": "1",
        "log.eval_every": "0", "log.eval_iters": "1", "log.progress": "false", "out_dir": str(run)})
    assert cfg.wrapper == {"name": "gain_test", "gain": 2.0}
    summary = train(cfg)
    assert json.loads((run / "final" / "wrapper.json").read_text())["name"] == "gain_test"
    loaded = memzoo.from_pretrained(summary["final"])
    assert isinstance(loaded, Gain) and loaded.config == GainConfig(2.0)
    # Trained: the gain moved off its initial value, and the reload carries it.
    assert loaded.gain.item() != 2.0
    spec = ModelSpec.parse("gain_test:attention")
    assert spec.name == "gain_test(attention)" and spec.wrapper == {"name": "gain_test", "gain": 0.5}
    model = spec.build(vocab_size=16, d_model=32)
    assert isinstance(model, Gain) and model(torch.randint(0, 16, (2, 8))).logits.shape == (2, 8, 16)
