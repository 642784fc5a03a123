"""memzoo-train with LongMem: config and fail-fast errors, the two-stage run, SideNet-only export, resume."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch
from conftest import small_config
from safetensors.torch import load_file, save_file

import memzoo
from memzoo.models import ModelConfig
from memzoo.models.lm import LanguageModel
from memzoo.models.state import state_leaves
from memzoo.models.wrappers.longmem import LongMem, LongMemConfig, LongMemState
from memzoo.models.wrappers.longmem_io import load_longmem, weights_hash
from memzoo.train import ConfigError, TrainConfig, resolve_config, train
from memzoo.train.checkpoint import from_pretrained
from memzoo.train.cli import parse_train_args
from memzoo.train.data import Batch
from memzoo.train.loop import param_groups, run_segments

LONGMEM = {"wrapper.segment_len": 16, "wrapper.capacity": 64, "wrapper.chunk_size": 4, "wrapper.n_chunks": 4,
           "data.seq_len": 64, "data.segment_len": 16, "train.micro_bs": 2, "optim.lr": 3e-3}


def losses(run) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/train"] for r in rows if "loss/train" in r}


def test_preset_and_round_trips(tmp_path):
    cfg = resolve_config("longmem_tiny")
    assert cfg.wrapper["name"] == "longmem" and cfg.wrapper["segment_len"] == 32
    assert cfg.data.pack == "stream" and cfg.data.segment_len % cfg.wrapper["segment_len"] == 0
    assert cfg.wrapper["backbone"] == "runs/tiny-attention/final" and cfg.wrapper["capacity"] == 1024
    cls, config = cfg.resolved_wrapper()
    assert cls is LongMem and type(config) is LongMemConfig and config.capacity == 1024
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    # A JSON file, YAML mapping and dotted CLI overrides all reach the nested config.
    (tmp_path / "run.yaml").write_text("wrapper:\n  backbone: null\n  capacity: 128\n  n_chunks: 2\n")
    from_file = resolve_config("longmem_tiny", file=tmp_path / "run.yaml")
    assert from_file.wrapper["backbone"] is None and from_file.wrapper["capacity"] == 128
    assert from_file.wrapper["n_chunks"] == 2 and from_file.wrapper["segment_len"] == 32
    cli, _ = parse_train_args(["--preset", "tiny", "--data.pack", "stream", "--data.segment_len", "32",
                               "--wrapper.name", "longmem", "--wrapper.segment_len", "16", "--wrapper.capacity", "64",
                               "--wrapper.backbone", "none"])
    assert cli.resolved_wrapper()[1] == LongMemConfig(segment_len=16, capacity=64, backbone=None)
    assert resolve_config("tiny").wrapper is None


def test_old_longmem_sections_still_work_with_a_deprecation_warning(tmp_path):
    (tmp_path / "old.yaml").write_text("longmem:\n  backbone: null\n  capacity: 128\n")
    with pytest.warns(DeprecationWarning, match="'longmem' is deprecated"):
        old = resolve_config("longmem_tiny", file=tmp_path / "old.yaml")
    assert old == resolve_config("longmem_tiny", overrides={"wrapper.backbone": "none", "wrapper.capacity": "128"})
    with pytest.warns(DeprecationWarning, match="'longmem' is deprecated"):
        cli, _ = parse_train_args(["--preset", "longmem_tiny", "--longmem.capacity", "128", "--longmem.backbone",
                                   "none"])
    assert cli == old
    # A config.json written before the wrapper protocol (hmt: null, longmem: {...}) loads.
    saved = json.loads(old.to_json())
    saved["longmem"], saved["hmt"] = {k: v for k, v in saved.pop("wrapper").items() if k != "name"}, None
    with pytest.warns(DeprecationWarning):
        assert TrainConfig.from_dict(saved) == old


@pytest.mark.parametrize(("overrides", "match"), [
    ({"data.pack": "block"}, "data.pack 'stream'"),
    ({"data.segment_len": "48", "data.seq_len": "96"}, "multiple of the longmem segment_len=32"),
    ({"data.segment_len": "none"}, "multiple of the longmem segment_len"),
    ({"data.tokenizer": "train:512"}, "tokenizer"),
    ({"wrapper.capacity": "30"}, "capacity=30 must be a positive multiple"),
    ({"wrapper.capcity": "64"}, "did you mean 'capacity'"),
    ({"wrapper.name": "longmen"}, "did you mean 'longmem'"),
])
def test_bad_longmem_configs_fail_fast(overrides, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config("longmem_tiny", overrides={"wrapper.backbone": "none", **overrides})


def test_a_missing_backbone_fails_before_training(tmp_path):
    cfg = small_config(tmp_path / "run", "longmem_tiny", **dict(LONGMEM, **{"wrapper.backbone": str(tmp_path / "x")}))
    with pytest.raises(ConfigError, match="not a memzoo export folder"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_run_segments_resets_bank_rows():
    torch.manual_seed(0)
    lm = LanguageModel(ModelConfig(vocab_size=32, d_model=16, n_layers=2, mixers={"attention": {"n_heads": 2}}))
    model = LongMem(lm, LongMemConfig(segment_len=4, capacity=32, chunk_size=2, n_chunks=2))
    ids = torch.randint(0, 32, (2, 12))
    resets = torch.tensor([[False, False, False], [False, True, False]])
    ce, _, state = run_segments(model, Batch(ids, ids, resets=resets), segment_len=4, state=model.init_state(2),
                                backward=lambda loss: loss.backward())
    assert isinstance(state, LongMemState) and torch.isfinite(ce)
    # Row 1 restarted before its second segment: 2 segments x 2 chunks since, row 0 holds 3 x 2.
    assert state.bank.fill.tolist() == [6, 4]
    assert all(p.grad is None for p in lm.parameters())
    assert all(p.grad is not None for p in model.trainable_parameters())
    ids_in_groups = {id(p) for g in param_groups(model, 0.1, 1e-3) for p in g["params"]}
    assert ids_in_groups == {id(p) for p in model.trainable_parameters()}


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory):
    """Stage 1: a tiny backbone, 2 steps, exported.  Stage 2: LongMem over it, 4 steps, checkpoints at 2 and 4."""
    root = tmp_path_factory.mktemp("longmem")
    train(small_config(root / "bb", **{"train.max_steps": 2, "ckpt.export_safetensors": True}))
    overrides = dict(LONGMEM, **{"wrapper.backbone": str(root / "bb" / "final"), "train.max_steps": 4,
                                 "ckpt.every": 2, "ckpt.keep": 5, "ckpt.export_safetensors": True})
    cfg = small_config(root / "a", "longmem_tiny", **overrides)
    summary = train(cfg)
    return root, cfg, overrides, summary


def _trained_from_checkpoint(root, step):
    """The trained LongMem as Accelerate saved it (backbone included) at ``step``."""
    backbone = from_pretrained(root / "bb" / "final")
    model = LongMem(backbone, LongMemConfig(segment_len=16, capacity=64, chunk_size=4, n_chunks=4))
    saved = load_file(str(root / "a" / "checkpoints" / f"checkpoint_{step}" / "model.safetensors"))
    missing, unexpected = model.load_state_dict(saved, strict=False)
    assert missing == ["backbone.lm_head.weight"] and not unexpected  # the tied head
    return model.eval(), saved


def test_two_stage_run_trains_only_the_sidenet(two_stage):
    root, cfg, _, summary = two_stage
    assert cfg.model == from_pretrained(root / "bb" / "final").config  # the backbone's config replaced the preset's
    assert summary["step"] == 4 and all(math.isfinite(v) for v in losses(root / "a").values())
    model, saved = _trained_from_checkpoint(root, 4)
    backbone = from_pretrained(root / "bb" / "final")
    for k, v in backbone.state_dict().items():
        if k != "lm_head.weight":
            assert torch.equal(saved[f"backbone.{k}"], v), k  # bit-identical after training
    fresh = LongMem(backbone, model.config)
    assert any(not torch.equal(a, b) for a, b in zip(fresh.side.parameters(), model.side.parameters()))
    # The optimizer state covers exactly the SideNet's tensors.
    opt = torch.load(root / "a" / "checkpoints" / "checkpoint_4" / "optimizer.bin", weights_only=False)
    n_opt = sum(len(g["params"]) for g in opt["param_groups"])
    assert n_opt == len(opt["state"]) == len(model.trainable_parameters())
    metrics = [json.loads(line) for line in (root / "a" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("mem/state_bytes", 0) > 0 for r in metrics)


def test_a_checkpoint_folder_reloads_as_the_longmem_it_saved(two_stage):
    root, cfg, _, _ = two_stage
    expected, _ = _trained_from_checkpoint(root, 2)
    loaded = from_pretrained(root / "a" / "checkpoints" / "checkpoint_2")  # the run config names the wrapper
    assert isinstance(loaded, LongMem) and not loaded.training
    assert dataclasses.replace(loaded.config, backbone=None) == expected.config
    for k, v in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert loaded.backbone_record["path"] == cfg.wrapper["backbone"]


def test_export_holds_the_sidenet_only_and_reloads_exactly(two_stage, tmp_path):
    root, _, _, summary = two_stage
    final = root / "a" / "final"
    assert summary["final"] == str(final)
    tensors = load_file(str(final / "model.safetensors"))
    model, _ = _trained_from_checkpoint(root, 4)
    assert set(tensors) == set(model.side.state_dict())
    assert not any(k.startswith(("backbone", "embed", "lm_head")) for k in tensors)
    meta = json.loads((final / "wrapper.json").read_text())
    assert meta["name"] == "longmem" and meta["backbone"]["path"] == str(root / "bb" / "final")
    assert meta["backbone"]["sha256"] == weights_hash(from_pretrained(root / "bb" / "final"))
    assert meta["config"] == {**vars(LongMemConfig(segment_len=16, capacity=64, chunk_size=4, n_chunks=4,
                                                   backbone=str(root / "bb" / "final")))}
    for loaded in (load_longmem(final), memzoo.from_pretrained(final)):
        assert isinstance(loaded, LongMem)
        # A reloaded LongMem carries its backbone record, so it can be fine-tuned and exported again.
        assert loaded.backbone_record == {"path": meta["backbone"]["path"], "sha256": meta["backbone"]["sha256"]}
        ids = torch.randint(0, 256, (2, 40))
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits)
    # A backbone whose weights differ from the recorded hash is refused.
    other = tmp_path / "other"
    shutil.copytree(root / "bb" / "final", other)
    weights = load_file(str(other / "model.safetensors"))
    weights["norm.weight"] = weights["norm.weight"] + 1e-3
    save_file(weights, str(other / "model.safetensors"))
    with pytest.raises(ValueError, match="sha256"):
        load_longmem(final, backbone=other)


def test_resume_reproduces_the_run_with_the_bank(two_stage, tmp_path):
    root, _, overrides, _ = two_stage
    ref = losses(root / "a")
    b = tmp_path / "b"
    shutil.copytree(root / "a" / "checkpoints" / "checkpoint_2", b / "checkpoints" / "checkpoint_2")
    shutil.copy(root / "a" / "metrics.jsonl", b / "metrics.jsonl")
    saved = torch.load(b / "checkpoints" / "checkpoint_2" / "stream_state_0.pt", weights_only=True)
    # The bank is part of the state pytree: its tensors are saved as leaves (keys first, then values, ...).
    template = LongMem(from_pretrained(root / "bb" / "final"), LongMemConfig(
        segment_len=16, capacity=64, chunk_size=4, n_chunks=4)).init_state(2)
    assert isinstance(saved, list) and len(saved) == len(state_leaves(template))
    assert saved[0].shape == template.bank.keys.shape and int(saved[3].sum()) > 0  # valid chunks were written
    summary = train(small_config(b, "longmem_tiny", **dict(overrides, **{"ckpt.resume": "auto"})))
    assert summary["step"] == 4
    assert losses(b) == ref  # bit-identical: steps 3-4 read the restored bank


def test_random_backbone_smoke_run_exports_a_reloadable_model(tmp_path, capsys):
    cfg = small_config(tmp_path / "r", "longmem_tiny",
                       **dict(LONGMEM, **{"wrapper.backbone": "none", "train.max_steps": 1,
                                          "ckpt.export_safetensors": True}))
    summary = train(cfg)
    assert "RANDOMLY INITIALISED" in capsys.readouterr().out
    meta = json.loads((tmp_path / "r" / "final" / "wrapper.json").read_text())
    assert meta["backbone"]["random_init"] and (tmp_path / "r" / "random_backbone" / "model.safetensors").is_file()
    assert isinstance(memzoo.from_pretrained(summary["final"]), LongMem)
