"""``memzoo.eval.longmem_recall``: LongMem's recall experiment at tiny sizes, and its command line."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memzoo.eval.longmem_recall import LongMemRecallConfig, Task, run_longmem_recall

ROOT = Path(__file__).resolve().parents[2]
TINY = LongMemRecallConfig(segment_len=16, gap=1, n_facts=2, n_keys=8, n_values=8, n_filler=8, d_model=16,
                           n_layers=2, n_heads=2, batch_size=4, backbone_steps=3, side_steps=3, capacity=32,
                           n_chunks=2, eval_streams=8)


def _without_time(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != "seconds"}


def test_one_seed_trains_both_arms_over_one_backbone_and_is_deterministic():
    rec = run_longmem_recall(TINY, 0, progress=False)
    assert set(rec) == {"config", "seed", "backbone", "memory", "no_memory", "chance", "seconds"}
    assert rec["config"] == dataclasses.asdict(TINY) and rec["seed"] == 0 and rec["chance"] == 1 / 8
    assert set(rec["backbone"]) == {"in_segment_acc", "in_segment_loss", "stream_acc_local", "stream_loss_local"}
    for arm in ("memory", "no_memory"):
        r = rec[arm]
        assert {"query_acc", "query_loss", "gate_sigmoid", "memory_mass"} <= set(r)
        assert 0 <= r["query_acc"] <= 1 and math.isfinite(r["query_loss"])
        assert len(r["gate_sigmoid"]) == TINY.n_heads
    # The gate-0 arm reads nothing from the bank; the memory arm does.
    assert rec["no_memory"]["memory_mass"] == 0 and rec["memory"]["memory_mass"] > 0
    assert rec["memory"]["query_loss"] != rec["no_memory"]["query_loss"]
    json.dumps(rec)
    assert _without_time(run_longmem_recall(TINY, 0, progress=False)) == _without_time(rec)
    assert run_longmem_recall(TINY, 1, progress=False)["backbone"] != rec["backbone"]


def test_streams_hold_the_facts_only_outside_the_query_segment():
    task = TINY.task()
    ids, labels = task.stream(5, TINY.gap, torch.Generator().manual_seed(0))
    S, f = TINY.segment_len, 2 * TINY.n_facts
    assert ids.shape == (5, (TINY.gap + 2) * S)
    q0 = (TINY.gap + 1) * S
    # Only the answers of the last segment's queries are scored, and each answer is the value given in segment 0.
    assert (labels[:, :q0] == -100).all() and (labels[:, q0 + 1:q0 + f:2] >= task.n_keys).all()
    for b in range(5):
        facts = dict(zip(ids[b, :f:2].tolist(), ids[b, 1:f:2].tolist()))
        queries = dict(zip(ids[b, q0:q0 + f:2].tolist(), labels[b, q0 + 1:q0 + f:2].tolist()))
        assert queries == facts
        assert not (ids[b, f:q0] < task.filler0).any()


@pytest.mark.parametrize("change, match", [
    ({"backbone_steps": 0}, "backbone_steps must be >= 1"),
    ({"gap": -1}, "gap must be >= 0"),
    ({"side_lr": 0.0}, "side_lr must be > 0"),
    ({"n_facts": 9}, "n_facts=9 must be <= n_keys=8"),
    ({"n_facts": 5}, "segment_len=16 must hold"),
    ({"n_heads": 3}, "d_model=16 must be a multiple of n_heads=3"),
    ({"chunk_size": 3}, "multiple of chunk_size=3"),
    ({"capacity": 31}, "capacity=31"),
], ids=["steps", "gap", "lr", "facts-keys", "facts-segment", "heads", "chunk", "capacity"])
def test_bad_config_values_name_the_argument(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, **change)


def test_bad_types_and_seed_are_refused():
    with pytest.raises(TypeError, match="d_model must be an int"):
        dataclasses.replace(TINY, d_model=16.0)
    with pytest.raises(TypeError, match="cfg must be a LongMemRecallConfig"):
        run_longmem_recall(dataclasses.asdict(TINY), 0)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        run_longmem_recall(TINY, -1)
    with pytest.raises(ValueError, match="4 \\* n_facts"):
        Task(8, 8, 8, 5, 16)


def test_the_example_is_a_command_line_over_the_library(tmp_path):
    out = tmp_path / "r.json"
    flags = [f"--{f.name.replace('_', '-')}={getattr(TINY, f.name)}" for f in dataclasses.fields(TINY)]
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "longmem_recall.py"), *flags, "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "SideNet with memory   : query acc" in proc.stdout and "sigma(gate) forced to 0" in proc.stdout
    results = json.loads(out.read_text())
    assert set(results) == {"args", "backbone", "memory", "no_memory", "chance", "seconds"}
    assert results["args"]["seed"] == 0 and results["args"]["side_steps"] == TINY.side_steps
    rec = run_longmem_recall(TINY, 0, progress=False)
    assert {k: results[k] for k in ("backbone", "memory", "no_memory")} == {
        k: rec[k] for k in ("backbone", "memory", "no_memory")}
    bad = subprocess.run([sys.executable, str(ROOT / "examples" / "longmem_recall.py"), "--gap", "-1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "gap must be >= 0" in bad.stderr
