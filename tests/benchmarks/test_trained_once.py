"""benchmarks/common.trained_once: a stored run is reused only when it is the run asked for, never overwritten."""

from __future__ import annotations

import dataclasses
import json

import pytest
from bench_scripts import load_benchmark

import memzoo.eval.harness as harness
from memzoo.eval.report_suite import build_suite

common = load_benchmark("common")


@pytest.fixture
def run():
    return next(r for r in build_suite("tiny") if r.task == "mqar" and r.lr is not None)


@pytest.fixture
def trains(monkeypatch):
    """Counts train_one calls and returns a fake record instead of training."""
    calls = []

    def fake_train_one(spec, d_model, data, lr, seed, train, *, task, progress=True, **kw):
        calls.append((spec.name, lr, seed, train.epochs, task, progress))
        return {"model": spec.name, "metrics": {"all": {"accuracy": 0.5}}, "epochs_run": train.epochs}

    monkeypatch.setattr(harness, "train_one", fake_train_one)
    return calls


def test_trains_once_then_reuses_the_file(tmp_path, run, trains):
    path = tmp_path / "r.json"
    rec = common.trained_once(path, {"base": run.key}, run)
    assert rec["metrics"]["all"]["accuracy"] == 0.5 and len(trains) == 1
    assert trains[0] == (run.spec.name, run.lr, run.seed, run.train.epochs, "mqar", False)
    stored = json.loads(path.read_text())
    assert stored["base"] == run.key and stored["config"]["train"]["epochs"] == run.train.epochs
    assert stored["resolved"]["model"]["pattern"] == list(run.spec.pattern) and "cpu_s" in stored
    assert common.trained_once(path, {"base": run.key}, run) == rec
    assert len(trains) == 1  # reused, not trained again


@pytest.mark.parametrize("change, named", [
    (lambda r: {"train": dataclasses.replace(r.train, epochs=r.train.epochs + 1)}, "train"),
    (lambda r: {"lr": r.lr * 2}, "lr"),
    (lambda r: {"seed": r.seed + 1}, "seed"),
    (lambda r: {"spec": dataclasses.replace(r.spec, n_layers=r.spec.n_layers + 1)}, "model"),
    (lambda r: {"d_model": r.d_model * 2}, "d_model"),
])
def test_a_file_of_another_run_is_an_error_and_kept(tmp_path, run, trains, change, named):
    path = tmp_path / "r.json"
    common.trained_once(path, {}, run)
    before = path.read_text()
    with pytest.raises(SystemExit, match=rf"r\.json holds a run with other settings \((.*, )?{named}[,) ]"):
        common.trained_once(path, {}, dataclasses.replace(run, **change(run)))
    assert path.read_text() == before and len(trains) == 1


def test_a_file_without_its_config_is_refused(tmp_path, run, trains):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"record": {"metrics": {}}}))
    with pytest.raises(SystemExit, match=r"\(config differ"):
        common.trained_once(path, {}, run)
    assert not trains


def test_a_changed_model_default_is_named(tmp_path, run, trains):
    path = tmp_path / "r.json"
    common.trained_once(path, {}, run)
    payload = json.loads(path.read_text())
    mixer = next(iter(payload["resolved"]["model"]["mixers"]))
    field = next(k for k, v in payload["resolved"]["model"]["mixers"][mixer].items() if isinstance(v, (int, float)))
    payload["resolved"]["model"]["mixers"][mixer][field] += 1  # as if the default had been another when it ran
    path.write_text(json.dumps(payload))
    with pytest.raises(SystemExit, match="resolved model"):
        common.trained_once(path, {}, run)
