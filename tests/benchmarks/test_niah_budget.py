"""benchmarks/niah_budget.py: its --grad-clip option."""

from __future__ import annotations

import pytest
from bench_scripts import load_benchmark

niah_budget = load_benchmark("niah_budget")


def test_grad_clip_defaults_to_the_suites_setting():
    p = niah_budget.parser()
    # Absent: no attribute, so the run keeps the suite's clip (main reads it with the suite's as the fallback).
    assert not hasattr(p.parse_args(["--key", "k"]), "grad_clip")
    assert p.parse_args(["--key", "k", "--grad-clip", "none"]).grad_clip is None
    assert p.parse_args(["--key", "k", "--grad-clip", "0.5"]).grad_clip == 0.5


@pytest.mark.parametrize("bad", ["0", "-1", "suite", "nan", "x"])
def test_grad_clip_refuses_what_is_not_a_positive_norm(bad, capsys):
    with pytest.raises(SystemExit):
        niah_budget.parser().parse_args(["--key", "k", "--grad-clip", bad])
    assert "--grad-clip" in capsys.readouterr().err


def test_scores_reads_the_metric_of_each_top_level_slice():
    rec = {"metrics": {"all": {"accuracy": 0.4567, "loss": 1.0}, "seq_len=64": {"accuracy": 0.5},
                       "seq_len=64/pos=0": {"accuracy": 0.1}}}
    assert niah_budget.scores(rec, "accuracy") == {"all": 0.457, "seq_len=64": 0.5}


def test_an_mqar_rerun_of_an_unfinished_sweep_is_refused(tmp_path, monkeypatch):
    # The rerun's rate comes from its sweep: with no sweep run stored there is none to retrain at.
    monkeypatch.setattr(niah_budget, "SUITE", tmp_path)
    monkeypatch.setattr("sys.argv", ["niah_budget.py", "--key", "mqar-titans_mag-d64-T64-kv4-best-s1"])
    with pytest.raises(SystemExit, match="reruns the best rate of a sweep that has not finished"):
        niah_budget.main()
    monkeypatch.setattr("sys.argv", ["niah_budget.py", "--key", "hmt-swa-s0"])
    with pytest.raises(SystemExit, match="not a run of the cpu preset's needle, MAC or MQAR study"):
        niah_budget.main()
