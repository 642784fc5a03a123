"""The trainer's skip of a non-finite step names the step (and counts it)."""

from __future__ import annotations

from conftest import poison_third_forward, small_config

from memzoo.train import train


def test_skipped_step_is_named(tmp_path, monkeypatch, capsys):
    poison_third_forward(monkeypatch)
    summary = train(small_config(tmp_path, train__max_steps=4))
    out = capsys.readouterr().out
    assert summary["skipped_steps"] == 1
    skips = [line for line in out.splitlines() if "optimizer update skipped" in line]
    assert skips == ["step 3: non-finite gradient norm nan; optimizer update skipped (1 skipped so far)"]
