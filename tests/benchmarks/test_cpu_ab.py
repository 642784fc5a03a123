"""benchmarks/cpu_ab.py: its refusals, the paired-ratio summary, and the worker's check of which memzoo it timed."""

from __future__ import annotations

import sys

import pytest
from bench_scripts import load_benchmark

cpu_ab = load_benchmark("cpu_ab")


@pytest.mark.parametrize("argv, message", [
    (["main"], "exactly two revisions"),
    (["a", "b", "c"], "exactly two revisions"),
    (["a", "b", "--ops", "gla,attention"], "unknown ['attention']"),
    (["a", "b", "--ops", ","], "empty list"),
    (["a", "b", "--shapes", "2,256,4"], "B,T,H,D"),
    (["a", "b", "--shapes", "2,0,4,64"], "B,T,H,D"),
    (["a", "b", "--check-shape", "x"], "B,T,H,D"),
    (["a", "b", "--rounds", "0"], "must be >= 1"),
    (["a", "b", "--reps", "-1"], "must be >= 1"),
    (["--worker", "--op", "gla"], "--worker needs"),
])
def test_refusals_name_the_argument(argv, message, capsys):
    with pytest.raises(SystemExit):
        cpu_ab.parse_args(argv)
    assert message in capsys.readouterr().err


def test_defaults():
    args = cpu_ab.parse_args(["c3804ee^", "main"])
    assert args.revisions == ["c3804ee^", "main"]
    assert args.ops == list(cpu_ab.OPS) and args.shapes == [(2, 2048, 4, 64), (2, 256, 4, 64)]
    assert args.rounds == 5 and args.reps == 3 and args.tol == 1e-5


def test_unknown_revision_refused():
    with pytest.raises(SystemExit, match="no-such-revision-x"):
        cpu_ab.resolve("no-such-revision-x")


def test_summary_pairs_the_rounds():
    # B is 2x A in round 1 and 1x in round 2 while the load halves everything: the paired ratios are 2 and 1.
    def sample(ms):
        return {f"{stage}_{m}": ms for stage in ("fwd", "fwdbwd") for m in cpu_ab.CLOCKS}

    a, b = [sample(10.0), sample(5.0), sample(4.0)], [sample(20.0), sample(5.0), sample(6.0)]
    (row,) = cpu_ab.summarise({("gla", (1, 2, 3, 4)): (a, b)})
    assert row["shape"] == "1,2,3,4"
    assert row["A_fwd_cpu_ms"] == 5.0 and row["B_fwd_cpu_ms"] == 6.0
    assert row["B/A_fwdbwd_cpu"] == 1.5 and row["B/A_fwd_wall_range"] == [1.0, 2.0] and row["B/A_fwd_user"] == 1.5
    assert row["A_fwdbwd_faults"] == 5.0


def test_worker_refuses_a_memzoo_from_another_tree(tmp_path, monkeypatch):
    # A tree without memzoo/: the import falls through to the installed memzoo, which must not be timed.
    monkeypatch.setattr(sys, "path", list(sys.path))
    args = cpu_ab.parse_args(["--worker", "--tree", str(tmp_path), "--op", "gla", "--shape", "1,16,1,16"])
    with pytest.raises(RuntimeError, match="expected the tree"):
        cpu_ab.worker(args)
