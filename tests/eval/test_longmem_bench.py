"""memzoo-bench with LongMem: the ``longmem:<pattern>`` syntax, configs, a short harness run, a given backbone."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import pytest
import torch

from memzoo.eval import cli
from memzoo.eval.cli import run_and_save
from memzoo.eval.config import LONGMEM_BENCH_DEFAULTS, BenchConfig, ModelSpec
from memzoo.eval.presets import get_bench_preset
from memzoo.models import ModelConfig
from memzoo.models.lm import LanguageModel
from memzoo.models.wrappers.longmem import LongMem, LongMemConfig
from memzoo.train.longmem_io import save_backbone

# mqar's ci rows are 32 tokens: 16-token segments so the second segment reads the first one from the bank.
SMALL = {"segment_len": 16, "capacity": 64, "chunk_size": 4, "n_chunks": 2}


def test_parse_names_and_round_trip():
    spec = ModelSpec.parse("longmem:attention")
    assert spec.name == "longmem(attention)" and spec.wrapper == {"name": "longmem", **LONGMEM_BENCH_DEFAULTS}
    assert LONGMEM_BENCH_DEFAULTS["segment_len"] == 32 and LONGMEM_BENCH_DEFAULTS["capacity"] == 4096
    assert spec.wrapper_config() == (LongMem, LongMemConfig(**LONGMEM_BENCH_DEFAULTS))
    cfg = get_bench_preset("mqar", "ci").replace(models=(spec, ModelSpec.parse("longmem:gated_delta+attention")))
    again = BenchConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.models[1].name == "longmem(gated_delta+attention)"


def test_cli_accepts_longmem_models():
    args = cli._parser().parse_args(["mqar", "--preset", "ci", "--model", "attention,longmem:attention"])
    cfg = cli.build_config(args)
    assert [m.name for m in cfg.models] == ["attention", "longmem(attention)"]
    assert cfg.models[1].wrapper == {"name": "longmem", **LONGMEM_BENCH_DEFAULTS}
    assert cfg.models[1].mixers == cfg.models[0].mixers


@pytest.mark.parametrize(("kw", "match"), [
    ({"wrapper": {"name": "longmem", "segment_len": 30, "chunk_size": 4}}, "multiple of chunk_size"),
    ({"wrapper": {"name": "longmem", "capcity": 64}}, "did you mean 'capacity'"),
    ({"wrapper": {"name": "longmen"}}, "did you mean 'longmem'"),
    ({"wrapper": {"segment_len": 16}}, "must be a mapping with a 'name'"),
    ({"wrapper": {"name": "longmem"}, "hmt": {"segment_len": 16, "n_sensory": 4}}, "one wrapper"),
])
def test_bad_longmem_specs_fail_when_built(kw, match):
    with pytest.raises(ValueError, match=match):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ModelSpec(("attention",), **kw)


def test_longmem_trains_its_sidenet_in_the_harness(tmp_path):
    spec = dataclasses.replace(ModelSpec.parse("longmem:attention", {"attention": {"n_heads": 2}}),
                               wrapper={"name": "longmem", **SMALL})
    cfg = get_bench_preset("mqar", "ci")
    cfg = cfg.replace(models=(spec,), d_models=(64,), lrs=(3e-3,),
                      train=dataclasses.replace(cfg.train, epochs=1, max_steps=3, eval_batch_size=250))
    res = run_and_save(cfg, tmp_path, progress=False, plots=False, log=lambda *_: None)
    (rec,) = res["records"]
    assert rec["model"] == "longmem(attention)" and rec["wrapper"] == {"name": "longmem", **SMALL}
    assert rec["steps"] == 3 and math.isfinite(rec["curve"][0]["train_loss"]), "finite loss"
    torch.manual_seed(0)
    model = spec.build(64, 64)
    assert isinstance(model, LongMem)
    assert rec["params"] == model.num_parameters() > rec["trainable_params"] == model.added_parameters()
    assert rec["state_floats"] == {"32": model.state_size(32)} and model.state_size(32) > 0
    assert 0.0 <= rec["metrics"]["all"]["accuracy"] <= 1.0
    saved = json.loads(open(res["paths"]["json"]).read())
    assert saved["records"][0]["wrapper"] == {"name": "longmem", **SMALL}


def test_a_given_backbone_is_loaded_and_frozen(tmp_path):
    torch.manual_seed(1)
    lm = LanguageModel(ModelConfig(vocab_size=64, d_model=32, n_layers=2, pattern=("attention",),
                                   mixers={"attention": {"n_heads": 2}}, d_ff=0))
    save_backbone(lm, tmp_path / "bb")
    spec = ModelSpec(("attention",), wrapper={"name": "longmem", **SMALL, "backbone": str(tmp_path / "bb")})
    assert spec.name == "longmem(attention)"
    model = spec.build(64, 128)  # the width comes from the backbone
    assert model.hidden_size == 32 and not any(p.requires_grad for p in model.backbone.parameters())
    for (k, a), b in zip(lm.state_dict().items(), model.backbone.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="vocab_size"):
        spec.build(100, 32)


def test_the_old_longmem_keyword_still_builds_the_same_spec():
    with pytest.warns(DeprecationWarning, match="wrapper="):
        old = ModelSpec(("attention",), longmem=dict(SMALL))
    assert old == ModelSpec(("attention",), wrapper={"name": "longmem", **SMALL})
