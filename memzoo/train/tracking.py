"""Experiment tracking: the always-on ``metrics.jsonl`` tracker, opt-in trackers, and peak FLOP/s for MFU.

``JSONLTracker`` is an Accelerate ``GeneralTracker`` (name ``"jsonl"``) that appends one JSON
object per ``accelerator.log`` call to ``out_dir/metrics.jsonl`` on the main process.
Accelerate silently drops requested trackers whose package is missing, so ``resolve_trackers``
checks availability itself and warns.  Trackers are imported lazily by Accelerate when they start.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate.tracking import GeneralTracker

__all__ = ["JSONLTracker", "resolve_trackers", "trim_metrics", "read_metrics", "peak_flops", "flat_config"]

# Dense bf16 peak FLOP/s per device (torchtitan's table); MFU is reported only for these.
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


class JSONLTracker(GeneralTracker):
    """Append ``{"step": s, "time": t, metric: value, ...}`` lines to ``logging_dir/metrics.jsonl``."""

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_name: str, logging_dir: str | Path) -> None:
        super().__init__()
        self.run_name = run_name
        self.path = Path(logging_dir, "metrics.jsonl")
        self._file: Any = None

    @property
    def tracker(self) -> Any:
        return self._file

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in finish)

    def store_init_configuration(self, values: dict[str, Any]) -> None:
        # The resolved config is written to out_dir/config.json before training; not repeated here.
        pass

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        if self._file is None:
            self.start()
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: _jsonable(v) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _available(name: str) -> bool:
    if name == "tensorboard":
        return any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))
    return importlib.util.find_spec(name) is not None


def resolve_trackers(report_to: str) -> list[str]:
    """The requested extra trackers that are installed; each missing one is warned about by name.

    ``"all"`` means every installed tracker among tensorboard, wandb and trackio.  A wandb run with
    neither ``WANDB_API_KEY`` nor ``WANDB_MODE`` set goes offline instead of failing.
    """
    names = [r.strip() for r in report_to.split(",") if r.strip() and r.strip() != "none"]
    everything = "all" in names
    if everything:
        names = ["tensorboard", "wandb", "trackio"]
    chosen = []
    for name in names:
        if _available(name):
            chosen.append(name)
        elif not everything:
            pip = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}[name]
            warnings.warn(f"log.report_to asks for {name!r}, but it is not installed (pip install {pip}); "
                          f"training continues WITHOUT {name} (metrics.jsonl is still written)",
                          RuntimeWarning, stacklevel=2)
    if "wandb" in chosen and not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        os.environ["WANDB_MODE"] = "offline"
        warnings.warn("wandb: no WANDB_API_KEY and no WANDB_MODE: logging offline (upload later with `wandb sync`)",
                      RuntimeWarning, stacklevel=2)
    return chosen


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a torn last line from a crash is skipped)."""
    records = []
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def trim_metrics(path: str | Path, max_step: int) -> None:
    """Drop records after ``max_step`` (steps a resumed run will redo), or the whole file for a fresh run."""
    p = Path(path)
    if not p.exists():
        return
    keep = [r for r in read_metrics(p) if r.get("step") is not None and r["step"] <= max_step]
    p.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of ``device``, or ``None`` (CPU, unknown GPU): MFU is then reported as null."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)


def flat_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": 1e-3}`` with scalar values (what tensorboard hparams take)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
