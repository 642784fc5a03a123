"""benchmarks/train_probe.py: its steps are the harness's own, and it names what it measures."""

from __future__ import annotations

import pytest
import torch
from bench_scripts import load_benchmark

from memzoo.eval.harness import train_one
from memzoo.eval.report_suite import build_suite

train_probe = load_benchmark("train_probe")


@pytest.mark.parametrize("model", ["titans_mal", "attention"])
def test_the_probed_steps_are_the_runs_own(model):
    run = next(r for r in build_suite("tiny") if r.study == "niah" and r.labels["model"] == model)
    steps = run.train.max_steps
    rows, probed = train_probe.probe(run, steps=steps, every=1, progress=False)
    rec = train_one(run.spec, run.d_model, run.data, run.lr, run.seed, run.train, task=run.task, progress=False)
    assert [r["step"] for r in rows] == list(range(steps))
    # The harness's first epoch is these steps: its mean training loss is theirs, to the last bit.
    assert rec["steps"] == steps and rec["curve"][0]["train_loss"] == sum(r["loss"] for r in rows) / steps
    assert all(r["lr"] == run.lr for r in rows)
    # Observing changes nothing: the probed run's record is the plain run's (but for the clock).
    def untimed(r):
        return {**r, "wall_s": None, "curve": [{**c, "wall_s": None} for c in r["curve"]]}

    assert untimed(probed) == untimed(rec)


def test_rows_every_n_steps_and_the_last():
    run = next(r for r in build_suite("tiny") if r.study == "niah" and r.labels["model"] == "attention")
    assert run.train.max_steps > 3
    rows, rec = train_probe.probe(run, steps=3, every=2, progress=False)
    # Steps 0 and 2, then stops at --steps even when the run would go on.
    assert rec["steps"] == 3 and [r["step"] for r in rows] == [0, 2]
    rows, rec = train_probe.probe(run, steps=3, every=3, progress=False)
    assert [r["step"] for r in rows] == [0, 2]  # the last step too


def test_recorder_keeps_training_passes_since_the_last_take():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    rec = train_probe.ActivationRecorder({"a": a, "b": b})
    x = torch.ones(1, 2)
    a(x)
    first = rec.take()
    b(x)
    # a was not called since: it has no value, not the last one.
    assert set(first) == {"a"} and set(rec.take()) == {"b"}
    b.eval()
    b(x)  # an evaluation pass is not a training step
    assert rec.take() == {}


def test_parts_and_gradient_groups_of_mal():
    run = next(r for r in build_suite("tiny") if r.study == "niah" and r.labels["model"] == "titans_mal")
    rows, _ = train_probe.probe(run, steps=2, every=1, progress=False)
    row = rows[-1]
    for i in range(run.spec.n_layers):
        # MAL's memory and norm are called as modules; its attention only through its projections.
        assert {f"rms L{i}", f"rms L{i}.memory", f"rms L{i}.norm", f"rms L{i}.attn.o_proj"} <= set(row)
        assert f"rms L{i}.attn" not in row
        assert {f"grad L{i}.memory", f"grad L{i}.attn", f"grad L{i}.norm", f"grad L{i}.rest"} <= set(row)
    assert row["grad embed"] > 0 and row["grad head"] > 0
    model = run.spec.build(run.data.vocab_size, run.d_model)
    grouped = sum(p.numel() for ps in train_probe.grad_groups(model).values() for p in ps)
    assert grouped == sum(p.numel() for p in model.parameters() if p.requires_grad)
