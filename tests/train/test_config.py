"""Config system: precedence, unknown keys, presets for every mixer, fail-fast validation, LR schedule, AdamW groups."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import memzoo
from memzoo.models import MIXERS
from memzoo.train import ConfigError, DataConfig, SchedConfig, TrainConfig, resolve_config, train_presets
from memzoo.train.cli import main, parse_train_args
from memzoo.train.loop import lr_factor, param_groups


def test_precedence_cli_over_file_over_preset(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("optim:\n  lr: 1.0e-3\n  betas: [0.8, 0.9]\ndata:\n  seq_len: 64\nmodel:\n  n_layers: 3\n")
    cfg, _ = parse_train_args(["--preset", "tiny", "--config", str(f), "--optim.lr", "2e-3", "--model.d_model=96",
                               "--train.compile"])
    preset = train_presets()["tiny"]()
    assert cfg.optim.lr == 2e-3  # CLI beats file
    assert cfg.optim.betas == (0.8, 0.9) and cfg.data.seq_len == 64 and cfg.model.n_layers == 3  # file beats preset
    assert cfg.model.d_model == 96 and cfg.train.compile is True
    assert cfg.train.max_steps == preset.train.max_steps  # preset beats defaults
    assert cfg.model.mixers == preset.model.mixers and cfg.preset == "tiny-attention"
    assert TrainConfig().train.max_steps != 600 == preset.train.max_steps


def test_saved_config_round_trips(tmp_path):
    cfg = resolve_config("tiny", overrides={"model.mixers.attention.window": "16", "data.pack": "stream"})
    assert cfg.model.mixers["attention"] == {"n_heads": 2, "window": 16}
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json())
    assert resolve_config(file=path) == cfg
    assert json.loads(cfg.to_json())["optim"]["betas"] == [0.9, 0.95]


def test_model_preset_key_swaps_the_model_section():
    cfg = resolve_config("tiny", overrides={"model.preset": "attention-small", "model.vocab_size": "320"})
    ref = memzoo.PRESETS["attention-small"]()
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.vocab_size) == (ref.d_model, ref.n_layers, 320)
    with pytest.raises(ConfigError, match="model.preset"):
        resolve_config("tiny", overrides={"model.preset": "nope"})


@pytest.mark.parametrize("overrides, match", [
    ({"optim.lrr": "1"}, r"unknown config key 'optim.lrr' \(did you mean 'lr'\?\)"),
    ({"optimizer.lr": "1"}, "unknown config key 'optimizer.lr'"),
    ({"model.d_modle": "64"}, "unknown config key 'model.d_modle'"),
    ({"optim.lr": "-1e-3"}, "optim.lr must be a positive number"),
    ({"train.max_steps": "ten"}, "train.max_steps must be an integer"),
    ({"train.precision": "fp8"}, "train.precision must be one of"),
    ({"data.pack": "ragged"}, "data.pack must be one of"),
    ({"data.segment_len": "24"}, "data.segment_len=24 must be positive and divide data.seq_len"),
    ({"data.segment_len": "64", "data.pack": "varlen"}, "data.segment_len needs data.pack 'block' or 'stream'"),
    ({"log.report_to": "tensorboard,neptune"}, "unknown tracker"),
    ({"model.mixers.attention.n_heads": "5"}, "model"),
], ids=["typo", "section", "model-key", "negative-lr", "not-int", "precision", "pack", "segment", "varlen-segment",
        "tracker", "mixer-option"])
def test_bad_configs_fail_with_a_named_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config("tiny", overrides=overrides)


def test_bad_file_key_and_unknown_preset(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps({"sched": {"warmup": 10}}))
    with pytest.raises(ConfigError, match="unknown config key 'sched.warmup'"):
        resolve_config("tiny", file=f)
    with pytest.raises(ConfigError, match="unknown training preset 'tiny-transformer'.*; available: .*tiny-attention"):
        resolve_config("tiny-transformer")


def test_cli_reports_errors_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--preset", "tiny", "--optim.lr", "-1", "--out_dir", str(out)]) == 2
    assert "optim.lr must be a positive number" in capsys.readouterr().err
    assert main(["--preset", "no-such-preset", "--out_dir", str(out)]) == 2
    assert "unknown training preset" in capsys.readouterr().err
    assert not out.exists()


def test_seq_len_must_be_a_multiple_of_split_multiple(monkeypatch, tmp_path):
    monkeypatch.setattr(MIXERS["attention"], "split_multiple", 48)
    with pytest.raises(ConfigError, match=r"data.seq_len=100 must be a multiple of the model's split_multiple=48"):
        resolve_config("tiny", overrides={"data.seq_len": "100"})
    with pytest.raises(ConfigError, match="segment_len=32 must be a multiple"):
        resolve_config("tiny", overrides={"data.seq_len": "96", "data.segment_len": "32"})
    # The train entry point validates too (a config built in Python skips resolve_config), before any output.
    cfg = dataclasses.replace(resolve_config("tiny"), data=DataConfig(seq_len=100), out_dir=str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="split_multiple=48"):
        memzoo.train.train(cfg)
    assert not (tmp_path / "x").exists()


def test_every_mixer_has_tiny_and_gpu_presets():
    presets = train_presets()
    assert presets["tiny"]() == presets["tiny-attention"]()
    for mixer in MIXERS:
        tiny = presets[f"tiny-{mixer}"]()
        assert tiny.model.pattern == (mixer,) and tiny.train.precision == "no"
        for size, target in (("125m", 125e6), ("350m", 350e6)):
            cfg = presets[f"gpu-{size}-{mixer}"]()
            with torch.device("meta"):
                n = memzoo.build_model(cfg.model).num_parameters()
            assert 0.8 * target < n < 1.1 * target, (mixer, size, n)
            assert cfg.train.precision == "bf16" and cfg.model.vocab_size >= 32_000


def test_new_mixer_gets_a_preset(monkeypatch):
    monkeypatch.setitem(MIXERS, "attention2", MIXERS["attention"])
    assert "tiny-attention2" in train_presets()
    assert resolve_config("tiny-attention2").model.pattern == ("attention2",)


def test_lr_schedules():
    steps = 100
    cos = SchedConfig(warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    f = [lr_factor(s, sched=cos, max_steps=steps) for s in range(steps)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:])) and f[-1] == pytest.approx(0.1)
    wsd = SchedConfig(warmup_steps=10, decay="wsd", min_lr_ratio=0.0, decay_fraction=0.2)
    g = [lr_factor(s, sched=wsd, max_steps=steps) for s in range(steps)]
    assert g[10:80] == [1.0] * 70 and g[-1] == pytest.approx(0.0) and 0 < g[90] < 1
    lin = SchedConfig(warmup_steps=0, decay="linear", min_lr_ratio=0.5)
    assert lr_factor(49, sched=lin, max_steps=100) == pytest.approx(0.75)
    assert lr_factor(5, sched=SchedConfig(warmup_steps=0, decay="constant"), max_steps=10) == 1.0


def test_param_groups_decay_and_lr_scale():
    model = memzoo.build_model(resolve_config("tiny").model)
    special = model.blocks[0].mixer.q_proj.weight
    special._no_weight_decay = True
    scaled = model.blocks[1].mixer.k_proj.weight
    scaled._lr_scale = 0.5
    groups = param_groups(model, 0.1, 1e-3)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert by_param[id(model.embed.weight)]["weight_decay"] == 0.1  # tied embedding/head: a matrix, decayed
    assert by_param[id(model.norm.weight)]["weight_decay"] == 0.0
    assert by_param[id(model.blocks[0].mixer_norm.weight)]["weight_decay"] == 0.0
    assert by_param[id(special)]["weight_decay"] == 0.0
    assert by_param[id(scaled)]["lr"] == pytest.approx(5e-4) and by_param[id(scaled)]["weight_decay"] == 0.1
    assert math.isclose(by_param[id(model.blocks[0].mlp.up_proj.weight)]["lr"], 1e-3)
