"""The trainer's skip of a non-finite step names the step (and counts it)."""

from __future__ import annotations

from conftest import small_config

import memzoo
from memzoo.train import train


def test_skipped_step_is_named(tmp_path, monkeypatch, capsys):
    import memzoo.train.loop as loop

    calls = {"n": 0}

    def poisoned(config):
        model = memzoo.build_model(config)

        def hook(module, args, out):
            calls["n"] += 1
            return out * float("nan") if calls["n"] == 3 else out

        model.embed.register_forward_hook(hook)
        return model

    monkeypatch.setattr(loop, "build_model", poisoned)
    summary = train(small_config(tmp_path, train__max_steps=4))
    out = capsys.readouterr().out
    assert summary["skipped_steps"] == 1
    skips = [line for line in out.splitlines() if "optimizer update skipped" in line]
    assert skips == ["step 3: non-finite gradient norm nan; optimizer update skipped (1 skipped so far)"]
