"""``memzoo-bench`` sizes a sweep before it starts: run count, step count, ETA, and a refusal past an hour."""

import dataclasses
import math

import pytest
import torch

from memzoo.eval import cli, estimate
from memzoo.eval.config import ModelSpec
from memzoo.eval.estimate import HOUR, estimate_sweep, format_seconds
from memzoo.eval.harness import steps_per_epoch
from memzoo.eval.presets import get_bench_preset


def _grid():
    cfg = get_bench_preset("mqar", "ci")
    return cfg.replace(models=(ModelSpec(("attention",)), ModelSpec(("gated_delta",))), d_models=(32, 64),
                       lrs=(1e-3, 3e-3), seeds=(0, 1, 2), train=dataclasses.replace(cfg.train, max_steps=None))


def test_runs_and_steps_are_the_product_of_the_grid():
    cfg = _grid()
    est = estimate_sweep(cfg, step_timer=lambda spec, d, data, train, device: 0.01)
    assert est["runs"] == 2 * 2 * 2 * 3 == len(cfg.models) * len(cfg.d_models) * len(cfg.lrs) * len(cfg.seeds)
    assert est["steps"] == est["runs"] * steps_per_epoch(cfg.data[0], cfg.train) * cfg.train.epochs
    assert est["measured"] == est["cells"] == 4


def test_seconds_scale_with_the_measured_step_and_cap_at_max_steps():
    cfg = _grid()
    one = estimate_sweep(cfg, step_timer=lambda *a: 0.01)["seconds"]
    assert estimate_sweep(cfg, step_timer=lambda *a: 0.03)["seconds"] == pytest.approx(3 * one)
    capped = cfg.replace(train=dataclasses.replace(cfg.train, max_steps=10))
    est = estimate_sweep(capped, step_timer=lambda *a: 0.01)
    assert est["steps"] == 10 * est["runs"] and est["seconds"] < one / 10


def test_cells_past_the_budget_scale_by_width():
    cfg = _grid().replace(models=(ModelSpec(("attention",)),), lrs=(1e-3,), seeds=(0,))
    widths = []

    def timer(spec, d, data, train, device):
        widths.append(d)
        return 1.0

    est = estimate_sweep(cfg, budget_s=0.0, step_timer=timer)
    assert widths == [32] and est["measured"] == 1 and est["cells"] == 2
    # The unmeasured d=64 cell costs twice the measured d=32 cell per step.
    assert est["seconds"] == pytest.approx(3 * estimate_sweep(cfg.replace(d_models=(32,)), step_timer=timer)["seconds"])


def test_real_warm_up_times_a_step():
    cfg = get_bench_preset("mqar", "ci")
    est = estimate_sweep(cfg)
    assert est["measured"] == est["cells"] == 1 and math.isfinite(est["seconds"]) and est["seconds"] > 0


def test_format_seconds():
    assert [format_seconds(s) for s in (42, 17 * 60, 3.5 * HOUR, 6 * 24 * HOUR)] == ["42 s", "17 min", "3.5 h",
                                                                                    "6 days"]


def test_cli_refuses_a_sweep_over_an_hour_without_yes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(estimate, "estimate_sweep", lambda cfg, device: {"runs": 192, "steps": 10**6,
                                                                          "seconds": 70 * HOUR})
    out = tmp_path / "bench"
    argv = ["mqar", "--preset", "ci", "--out", str(out), "--no-progress", "--no-plots", "--max-steps", "2"]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert "192 runs" in captured.out and "estimated at most 3 days on cpu" in captured.out
    assert "pass --yes" in captured.err and "--seeds" in captured.err and not out.exists()
    # The CPU thread count is set before the estimate (1 unless --threads says otherwise).
    assert torch.get_num_threads() == 1 and cli.main([*argv, "--threads", "2"]) == 2
    assert torch.get_num_threads() == 2
    assert cli.main([*argv, "--yes"]) == 0
    assert list((out / "results").glob("mqar-ci-*.json"))
