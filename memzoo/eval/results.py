"""Run records on disk: ``results/<run_id>.json``, the tidy ``results.csv``, per-sample JSONL.

The JSON holds everything needed to reproduce and re-plot a run: the resolved config, the seeds,
the git commit, library versions, the device, per-slice metrics and learning curves.  The CSV has
one row per model x task x slice x seed x learning rate and is appended to, so many runs collect
in one table (``pandas.read_csv`` it).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import os
import platform
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from .tasks import sweep_score

__all__ = ["CSV_FIELDS", "environment", "new_run_id", "write_json", "csv_rows", "append_csv", "summarize",
           "write_jsonl", "slice_seq_len"]

CSV_FIELDS = (
    "run_id", "created", "task", "preset", "model", "pattern", "n_layers", "d_model", "data_index", "lr", "seed",
    "best_lr", "slice", "seq_len", "accuracy", "exact_match", "loss", "n", "params", "state_bytes", "steps",
    "epochs_run", "stopped_early", "wall_s",
)


_ROOT = Path(__file__).resolve().parents[2]


def _git(*args: str, root: Path = _ROOT) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def tree_dirty(root: Path = _ROOT) -> bool | None:
    """Whether the tracked files of the git tree at ``root`` differ from its commit (None outside git).  Untracked
    files do not count: they are the run's own result files far more often than code."""
    status = _git("status", "--porcelain", "--untracked-files=no", root=root)
    return None if status is None else bool(status)


def environment(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Git commit (and whether the tree was dirty), versions, device and CPU threads."""
    import numpy

    import memzoo

    device = torch.device(device)
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": tree_dirty(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "memzoo": memzoo.__version__,
        "platform": platform.platform(),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def new_run_id(task: str, name: str = "") -> str:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return "-".join(p for p in (task, name, stamp, secrets.token_hex(2)) if p)


def write_json(out_dir: str | Path, run_id: str, payload: dict[str, Any]) -> Path:
    path = Path(out_dir) / "results" / f"{run_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, allow_nan=True))
    return path


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def _state_bytes(record: dict[str, Any], seq_len: int | None) -> int | None:
    floats = record.get("state_floats", {})
    if not floats:
        return None
    key = str(seq_len) if seq_len is not None and str(seq_len) in floats else max(floats, key=int)
    return None if floats[key] is None else 4 * floats[key]


def slice_seq_len(name: str) -> int | None:
    """``seq_len=256/depth=50`` -> 256; ``all`` -> None."""
    head = name.split("/", 1)[0]
    return int(head.split("=", 1)[1]) if head.startswith("seq_len=") else None


def csv_rows(run_id: str, created: str, task: str, preset: str, records: list[dict[str, Any]]) -> list[dict]:
    rows = []
    for r in records:
        for name, m in r["metrics"].items():
            T = slice_seq_len(name)
            rows.append({
                "run_id": run_id, "created": created, "task": task, "preset": preset, "model": r["model"],
                "pattern": "+".join(r["pattern"]), "n_layers": r["n_layers"], "d_model": r["d_model"],
                "data_index": r["data_index"], "lr": r["lr"], "seed": r["seed"], "best_lr": r.get("best_lr"),
                "slice": name, "seq_len": T, "accuracy": m["accuracy"], "exact_match": m["exact_match"],
                "loss": m["loss"], "n": m["n"], "params": r["params"], "state_bytes": _state_bytes(r, T),
                "steps": r["steps"], "epochs_run": r["epochs_run"], "stopped_early": r["stopped_early"],
                "wall_s": r["wall_s"],
            })
    return rows


def append_csv(path: str | Path, rows: list[dict[str, Any]], fields: tuple[str, ...] = CSV_FIELDS, *,
               extra: str = "raise") -> Path:
    """Append ``rows`` to the CSV at ``path``, writing the header when the file is new.

    ``fields`` are the columns (the recall tasks' by default); an existing file with other columns is an
    error, never a silently misaligned table.  A row key outside ``fields`` is an error unless
    ``extra="ignore"`` (for rows that also feed the JSON).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != tuple(fields):
            raise ValueError(f"{path} has columns {header}, expected {list(fields)}; use another --out")
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction=extra)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best-of-sweep per (model, d_model, data, slice): mean, std, max and the best seed's value over seeds.

    For every seed the learning rate with the best overall score is taken (``best_lr``); its
    per-slice values are then aggregated over seeds.  ``state_bytes`` is 4 x the model's
    ``state_size`` at the slice's sequence length (the longest test length for ``all``).
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("best_lr"):
            groups.setdefault((r["model"], r["d_model"], r["data_index"]), []).append(r)
    out = []
    for (model, d, di), runs in groups.items():
        primary = runs[0]["primary"]
        for name in runs[0]["metrics"]:
            vals = [r["metrics"][name][primary] for r in runs if name in r["metrics"]]
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
            T = slice_seq_len(name)
            out.append({"model": model, "d_model": d, "data_index": di, "slice": name, "seq_len": T,
                        "metric": primary, "mean": mean, "std": std, "max": max(vals),
                        "best": max(vals, key=lambda v: sweep_score(primary, v)), "n_seeds": len(vals),
                        "lrs": sorted({r["lr"] for r in runs}), "state_bytes": _state_bytes(runs[0], T),
                        "params": runs[0]["params"]})
    return out
