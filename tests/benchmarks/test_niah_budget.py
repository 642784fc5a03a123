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
