"""Shared helpers for the trainer tests: small, fast configs built through the real config path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from memzoo.train import TrainConfig, resolve_config


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def small_config(out_dir: Path, preset: str = "tiny", **overrides: Any) -> TrainConfig:
    """A tiny preset shrunk to seconds: d_model 32, 2 layers, 32-token rows, 4 rows, no progress bar."""
    base = {
        "model.d_model": 32, "model.n_layers": 2, "data.seq_len": 32, "train.micro_bs": 4,
        "train.max_steps": 4, "sched.warmup_steps": 2, "log.every": 1, "log.eval_every": 0, "log.eval_iters": 2,
        "log.progress": False, "ckpt.every": 0, "ckpt.export_safetensors": False, "out_dir": str(out_dir),
    }
    base.update({k.replace("__", "."): v for k, v in overrides.items()})
    return resolve_config(preset, overrides={k: str(v) if not isinstance(v, str) else v for k, v in base.items()})


def poison_third_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the trainer's model return NaN embeddings on its third forward call (one non-finite step)."""
    import memzoo
    import memzoo.train.loop as loop

    calls = {"n": 0}

    def poisoned(config: Any) -> Any:
        model = memzoo.build_model(config)

        def hook(module: Any, args: Any, out: Any) -> Any:
            calls["n"] += 1
            return out * float("nan") if calls["n"] == 3 else out

        model.embed.register_forward_hook(hook)
        return model

    monkeypatch.setattr(loop, "build_model", poisoned)
