"""``python -m memzoo.eval mqar --preset ci`` end to end (learnability), and short runs of every task."""

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import memzoo
from memzoo.eval.cli import run_and_save
from memzoo.eval.config import ModelSpec
from memzoo.eval.presets import get_bench_preset
from memzoo.eval.results import CSV_FIELDS

ROOT = Path(__file__).resolve().parents[2]
RECORD_KEYS = {"model", "pattern", "mixers", "n_layers", "d_model", "lr", "seed", "train_segments", "test_segments",
               "train_seeds", "test_seeds", "params", "state_floats", "metrics", "primary", "curve", "steps",
               "epochs_run", "stopped_early", "wall_s", "data_index", "best_lr", "batch_size"}


def _check_payload(payload, task):
    assert {"run_id", "created", "task", "preset", "config", "seeds", "environment", "wall_s", "records",
            "summary"} <= set(payload)
    assert payload["task"] == task
    env = payload["environment"]
    assert {"git_commit", "git_dirty", "python", "torch", "numpy", "memzoo", "device", "torch_threads"} <= set(env)
    for r in payload["records"]:
        assert RECORD_KEYS <= set(r), RECORD_KEYS - set(r)
        assert {"all"} <= set(r["metrics"]) and all(k.startswith("seq_len=") for k in r["metrics"] if k != "all")
        for m in r["metrics"].values():
            assert {"accuracy", "exact_match", "loss", "n"} <= set(m) and 0.0 <= m["accuracy"] <= 1.0
        assert r["curve"] and {"epoch", "step", "lr", "train_loss", "valid_loss", r["primary"]} <= set(r["curve"][0])
        assert all(v is None or v > 0 for v in r["state_floats"].values())


def test_cli_mqar_ci_learns_and_writes_everything(tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "memzoo.eval", "mqar", "--preset", "ci", "--out", str(out),
                           "--no-progress"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = (out / "results").glob("mqar-ci-*.json")
    payload = json.loads(path.read_text())
    _check_payload(payload, "mqar")
    (rec,) = payload["records"]
    # Learnability: 1-head attention solves the CI preset within its step budget.
    assert rec["metrics"]["all"]["accuracy"] > 0.9, rec["curve"]
    assert rec["steps"] <= 6 * 125 and rec["best_lr"]
    assert rec["state_floats"] == {"32": memzoo.build_model(
        memzoo.ModelConfig(vocab_size=64, d_model=128, n_layers=2, d_ff=0,
                           mixers={"attention": {"n_heads": 1}})).state_size(32)}
    assert rec["test_seeds"][0] >= 2**31 > rec["train_seeds"][0]

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert tuple(rows[0]) == CSV_FIELDS
    assert {r["slice"] for r in rows} == {"all", "seq_len=32", "seq_len=32/num_kv_pairs=4"}
    assert all(r["run_id"] == payload["run_id"] and int(r["state_bytes"]) == 4 * rec["state_floats"]["32"]
               for r in rows)
    plots = sorted((out / "plots").glob("*.png"))
    assert [p.name.split("_", 1)[1] for p in plots] == ["acc_vs_dmodel.png", "acc_vs_state.png"]
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in plots)
    assert "best-of-sweep attention" in proc.stdout
    assert "memzoo-bench: 1 runs (1 models x 1 widths x 1 data x 1 lrs x 1 seeds), at most 750 training steps" \
        in proc.stdout


def _short(task, **train):
    cfg = get_bench_preset(task, "ci")
    return cfg.replace(train=dataclasses.replace(cfg.train, **train))


@pytest.mark.parametrize("task", ["niah", "set_disjointness", "selective_copy", "regbench", "pydoc_lm"])
def test_every_task_runs_and_appends_to_one_csv(tmp_path, task):
    cfg = _short(task, epochs=1, max_steps=3)
    res = run_and_save(cfg, tmp_path, progress=False, log=lambda *_: None)
    _check_payload(res, task)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert rows and all(r["task"] == task for r in rows)
    again = run_and_save(cfg, tmp_path, progress=False, plots=False, log=lambda *_: None)
    rows2 = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(rows2) == 2 * len(rows) and again["run_id"] != res["run_id"]
    # Same seeds, same data, same model: the rerun reproduces the metrics exactly.
    assert again["records"][0]["metrics"] == res["records"][0]["metrics"]
    if task == "niah":
        names = {Path(p).name.split("_", 1)[1] for p in res["paths"]["plots"]}
        assert {"niah_heatmap.png", "acc_vs_length.png"} <= names
        assert "seq_len=256/depth=50" in res["records"][0]["metrics"]


@pytest.mark.parametrize("mixer", sorted(memzoo.MIXERS))
def test_any_registered_mixer_trains_in_the_harness(tmp_path, mixer):
    cfg = _short("mqar", epochs=1, max_steps=2).replace(models=(ModelSpec((mixer,)), ModelSpec((mixer, "attention"))),
                                                        d_models=(64,), lrs=(1e-3, 3e-3))
    res = run_and_save(cfg, tmp_path, progress=False, plots=False, log=lambda *_: None)
    assert len(res["records"]) == 4 and sum(r["best_lr"] for r in res["records"]) == 2
    for r in res["records"]:
        assert r["steps"] == 2 and r["params"] > 0
        assert math.isfinite(r["curve"][0]["train_loss"]), "finite loss"


@pytest.mark.parametrize("backbone", ["attention", "gated_delta"])
def test_hmt_wrapped_models_train_in_the_harness(tmp_path, backbone):
    spec = ModelSpec.parse(f"hmt:{backbone}")
    assert spec.name == f"hmt({backbone})" and spec.wrapper["name"] == "hmt" and spec.wrapper["segment_len"] == 16
    cfg = _short("mqar", epochs=1, max_steps=2).replace(models=(spec,), d_models=(64,), lrs=(1e-3,))
    (rec,) = run_and_save(cfg, tmp_path, progress=False, plots=False, log=lambda *_: None)["records"]
    assert rec["model"] == f"hmt({backbone})" and rec["wrapper"] == spec.wrapper and rec["steps"] == 2
    plain = ModelSpec((backbone,)).build(64, 64)
    # The wrapper adds its memory parameters on top of the backbone's.
    assert rec["params"] > plain.num_parameters()
    assert math.isfinite(rec["curve"][0]["train_loss"]), "finite loss"


def test_cli_accepts_hmt_models():
    from memzoo.eval import cli

    cfg = cli.build_config(cli._parser().parse_args(["mqar", "--preset", "ci", "--model", "attention,hmt:gla"]))
    assert [m.name for m in cfg.models] == ["attention", "hmt(gla)"] and cfg.models[1].wrapper["name"] == "hmt"


def test_bad_hmt_options_fail_when_the_spec_is_built():
    with pytest.raises(ValueError, match="segment_len"):
        ModelSpec(("attention",), wrapper={"name": "hmt", "segment_len": 3, "n_sensory": 4})


@pytest.mark.slow
def test_gated_delta_learns_the_ci_preset(tmp_path):
    # The spec's second learnability anchor: a gated-delta layer solves the same tiny MQAR (~500 steps).
    cfg = get_bench_preset("mqar", "ci").replace(models=(ModelSpec(("gated_delta",)),))
    (rec,) = run_and_save(cfg, tmp_path, progress=False, plots=False, log=lambda *_: None)["records"]
    assert rec["metrics"]["all"]["accuracy"] > 0.9, rec["curve"]
