"""Shared benchmark plumbing: timing, environment metadata and result files.

Speed is reported as ratios against a peer measured in the same run; a result file records the
device, date, commit and versions so numbers stay comparable.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

# $MEMZOO_RESULTS_DIR redirects the result files (a GPU session writes them where its output is collected).
RESULTS_DIR = Path(os.environ.get("MEMZOO_RESULTS_DIR") or Path(__file__).resolve().parent / "results")


def git_commit() -> str:
    """``git rev-parse --short HEAD`` (``-dirty`` with uncommitted changes), or ``$MEMZOO_COMMIT`` where it is set
    (a copy of the tree without its .git, as on a lent GPU machine)."""
    if os.environ.get("MEMZOO_COMMIT"):
        return os.environ["MEMZOO_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception:  # an optional peer that fails to import is simply absent from the record
        return None


def environment() -> dict:
    """Device, date, commit and library versions of this run."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "device": device,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": _version("triton"),
            "fla": _version("fla"),
            "flash_attn": _version("flash_attn"),
            "cuda": torch.version.cuda,
        },
    }


def time_ms(fn: Callable[[], object], *, cuda: bool, warmup: int = 1, reps: int = 3,
            clock: Callable[[], float] = time.perf_counter) -> float:
    """Median wall time of ``fn`` in milliseconds (``triton.testing.do_bench`` on CUDA); on CPU ``clock`` may be
    ``time.process_time`` (this process's CPU time, which moves less with other load on a shared machine)."""
    if cuda:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])[0])
    return clock_ms(fn, (clock,), warmup=warmup, reps=reps)[0]


def clock_ms(fn: Callable[[], object], clocks: tuple[Callable[[], float], ...], *, warmup: int = 1,
             reps: int = 3) -> list[float]:
    """Median time of ``fn`` in milliseconds on each of ``clocks``, all read around the same calls (e.g.
    ``(time.process_time, time.perf_counter)``: CPU time and wall time of one set of repetitions)."""
    for _ in range(warmup):
        fn()
    times: list[list[float]] = [[] for _ in clocks]
    for _ in range(reps):
        start = [c() for c in clocks]
        fn()
        stop = [c() for c in clocks]
        for t, a, b in zip(times, start, stop):
            t.append((b - a) * 1e3)
    return [statistics.median(t) for t in times]


def write_result(name: str, payload: dict) -> Path:
    """Write ``payload`` (plus the environment) to ``results/<name>-<device>-<date>.json``."""
    env = environment()
    slug = "".join(c if c.isalnum() else "-" for c in env["device"].split("(")[0].strip().lower()).strip("-")
    path = RESULTS_DIR / f"{name}-{slug}-{env['date'][:10]}.json"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**env, **payload}, indent=2) + "\n")
    return path


def trained_once(path: Path, meta: dict, run) -> dict:
    """The harness record of ``run`` (a ``memzoo.eval.report.Run``) stored at ``path``; trained first
    (``memzoo.eval.harness.train_one``, no progress bar) and written there with ``meta``, the run's ``config`` and
    ``resolved`` model, the package's environment and the CPU time, when the file does not exist.  A file that
    holds another run (other settings, or a model default changed since) is an error naming what differs: it is
    neither reused for this run nor overwritten."""
    from memzoo.eval.report import config_differences, resolved_config

    if path.exists():
        payload = json.loads(path.read_text())
        differs = config_differences(payload, run)
        if differs:
            raise SystemExit(f"{path} holds a run with other settings ({', '.join(differs)} differ from this "
                             f"run's); move it away to train this one")
        return payload["record"]
    from memzoo.eval.harness import train_one
    from memzoo.eval.results import environment as run_environment

    env = run_environment("cpu")  # the commit that trains it, read before a long run (the tree may move on)
    c0 = time.process_time()
    rec = train_one(run.spec, run.d_model, run.data, run.lr, run.seed, run.train, task=run.task, progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**meta, "config": run.config(), "resolved": resolved_config(run), "environment": env,
                                "cpu_s": round(time.process_time() - c0, 1), "record": rec}, indent=1) + "\n")
    return rec


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if v < 100 else f"{v:.1f}"
    return str(v)
