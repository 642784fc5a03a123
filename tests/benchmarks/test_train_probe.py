"""benchmarks/train_probe.py: its steps are the harness's own, and it names what it measures."""

from __future__ import annotations

import pytest
from bench_scripts import load_benchmark

from memzoo.eval.harness import train_one
from memzoo.eval.report_suite import build_suite

train_probe = load_benchmark("train_probe")


@pytest.mark.parametrize("model", ["titans_mal", "attention"])
def test_the_probed_steps_are_the_runs_own(model):
    run = next(r for r in build_suite("tiny") if r.study == "niah" and r.labels["model"] == model)
    steps = run.train.max_steps
    rows = train_probe.probe(run, steps=steps, every=1, progress=False)
    rec = train_one(run.spec, run.d_model, run.data, run.lr, run.seed, run.train, task=run.task, progress=False)
    assert [r["step"] for r in rows] == list(range(steps))
    # The harness's first epoch is these steps: its mean training loss is theirs, to the last bit.
    assert rec["steps"] == steps and rec["curve"][0]["train_loss"] == sum(r["loss"] for r in rows) / steps
    assert all(r["lr"] == run.lr for r in rows)


def test_parts_and_gradient_groups_of_mal():
    run = next(r for r in build_suite("tiny") if r.study == "niah" and r.labels["model"] == "titans_mal")
    rows = train_probe.probe(run, steps=2, every=1, progress=False)
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
