"""``memzoo-bench report``: a declared suite of small training runs, run resumably, summarised in one page.

Each run is one ``train_one`` call (one model, width, data, learning rate and seed), or one call of another
experiment named by its task in ``RUN_KINDS`` (e.g. ``longmem_recall``), and leaves one JSON file,
``<results>/<preset>/<key>.json``, holding its config, the model as built (``resolved``: every default filled
in), seed, git commit, machine, CPU and wall time and the record.  A run whose file exists under the same config
is skipped, so an interrupted suite resumes where it stopped (a changed config or default runs it again), and the
page (``report_page.py``) is rebuilt from the files alone: a declared run without a file is shown as pending.

    memzoo-bench report --preset tiny --out /tmp/r          # the CI-sized suite, about a minute
    memzoo-bench report --preset cpu --only mac,niah        # part of the CPU suite, resumable
    memzoo-bench report --preset cpu --page-only            # rebuild docs/results.md from what has run

Several workers may share one folder (``memzoo-bench report ... &`` twice, one per core): a worker claims a run
with ``<key>.lock`` before training it, and a lock whose process has died (same machine) is taken over.

The studies and the paper claims they test live in ``report_suite.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import BenchTrainConfig, DataSpec, ModelSpec
from .tasks import sweep_score

__all__ = ["Run", "RUN_KINDS", "run_path", "load_result", "config_differences", "run_suite", "main"]

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Run:
    """One run of the suite: what ``train_one`` needs, plus where it goes on the page.

    A run whose task is a key of ``RUN_KINDS`` is another experiment: its settings are ``experiment`` (that kind's
    frozen config dataclass) and ``spec``, ``d_model``, ``data``, ``lr`` and ``train`` are None
    (``Run.of_experiment`` builds one).
    """

    # File stem, unique within a preset.
    key: str
    # The study (one table of the page) the run belongs to.
    study: str
    # A harness task (``memzoo.eval.tasks.TASKS``), or a key of ``RUN_KINDS``.
    task: str
    spec: ModelSpec | None
    d_model: int | None
    data: DataSpec | None
    # None with ``lr_from``: the learning rate is chosen when the run starts (``resolve`` sets it).
    lr: float | None
    seed: int
    train: BenchTrainConfig | None
    # Labels the page groups by (e.g. {"variant": "residual"}); JSON values only.
    labels: dict[str, Any] = field(default_factory=dict)
    # Keys of a learning-rate sweep (other runs of the suite): this run takes the learning rate of the sweep run
    # with the best primary metric (the highest; the lowest for a loss), so the sweep is run at one seed and only
    # its best rate at the others.
    lr_from: tuple[str, ...] = ()
    # The settings of a ``RUN_KINDS`` experiment (a frozen dataclass); None for a harness run.
    experiment: Any = None

    def __post_init__(self) -> None:
        if self.task in RUN_KINDS:
            if not dataclasses.is_dataclass(self.experiment):
                raise ValueError(f"run {self.key}: task {self.task!r} needs experiment=<its config dataclass>, "
                                 f"got {self.experiment!r}")
            harness = {"spec": self.spec, "d_model": self.d_model, "data": self.data, "lr": self.lr,
                       "train": self.train, "lr_from": self.lr_from or None}
            given = [k for k, v in harness.items() if v is not None]
            if given:
                raise ValueError(f"run {self.key}: task {self.task!r} takes its settings from experiment; "
                                 f"{', '.join(given)} must be None")
            return
        if self.experiment is not None:
            raise ValueError(f"run {self.key}: experiment is for the tasks {sorted(RUN_KINDS)}, not {self.task!r}")
        missing = [k for k in ("spec", "d_model", "data", "train") if getattr(self, k) is None]
        if missing:
            raise ValueError(f"run {self.key}: a {self.task!r} run needs {', '.join(missing)}")
        if self.lr is None and not self.lr_from:
            raise ValueError(f"run {self.key}: give lr, or lr_from (a sweep to take the best rate of)")

    @classmethod
    def of_experiment(cls, key: str, study: str, task: str, experiment: Any, seed: int,
                      labels: dict[str, Any] | None = None) -> Run:
        """A run of the ``RUN_KINDS`` experiment ``task`` with settings ``experiment``."""
        return cls(key, study, task, None, None, None, None, seed, None, labels or {}, experiment=experiment)

    def config(self) -> dict[str, Any]:
        if self.experiment is not None:
            return {"task": self.task, "experiment": dataclasses.asdict(self.experiment), "seed": self.seed,
                    "labels": self.labels}
        return {
            "task": self.task, "model": dataclasses.asdict(self.spec), "d_model": self.d_model,
            "data": {"train": [dataclasses.asdict(c) for c in self.data.train],
                     "test": [dataclasses.asdict(c) for c in self.data.test], "batch_size": self.data.batch_size},
            "lr": self.lr, "seed": self.seed, "train": dataclasses.asdict(self.train), "labels": self.labels,
            "lr_from": list(self.lr_from) or None,
        }

    def resolve(self, results_dir: str | Path, suite: dict[str, Run]) -> Run | None:
        """This run with its learning rate fixed: itself when it has one, else the best rate of its sweep, or
        None while a run of the sweep has not finished (``suite``: the preset's runs by key)."""
        if not self.lr_from:
            return self
        best: tuple[float, float] | None = None
        for key in self.lr_from:
            sweep_run = suite.get(key)
            if sweep_run is None or sweep_run.lr is None:
                raise ValueError(f"run {self.key}: its sweep names {key!r}, not a run of the suite with a rate")
            payload = load_result(results_dir, sweep_run)
            if payload is None:
                return None
            rec = payload["record"]
            score = sweep_score(rec["primary"], float(rec["metrics"]["all"][rec["primary"]]))
            if best is None or score > best[0]:
                best = (score, sweep_run.lr)
        assert best is not None
        return dataclasses.replace(self, lr=best[1])


def run_path(results_dir: str | Path, run: Run) -> Path:
    return Path(results_dir) / f"{run.key}.json"


def load_result(results_dir: str | Path, run: Run, suite: dict[str, Run] | None = None) -> dict[str, Any] | None:
    """The run's stored result, or None when it has not run (or ran under another config: then it reruns).

    A run that takes its rate from a sweep (``lr_from``) needs ``suite`` (runs by key), and is pending while the
    sweep is: its stored result counts only if it was trained at the sweep's current best rate.
    """
    if run.lr_from:
        resolved = run.resolve(results_dir, suite or {})
        if resolved is None:
            return None
        run = resolved
    path = run_path(results_dir, run)
    if not path.exists():
        return None
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return None if config_differences(payload, run) else payload


def config_differences(payload: dict[str, Any], run: Run) -> list[str]:
    """What keeps a stored run file ``payload`` from being ``run``: the names of the config entries that differ
    (``model``, ``data``, ``lr``, ``train``, ...), ``resolved model`` when a default of the model has changed since
    it ran, or ``config`` when the file records none; empty when it is ``run``'s result.  An option renamed since
    compares equal to its new name; one added since (or with a None default) is taken at its default."""
    stored = payload.get("config")
    if not isinstance(stored, dict):
        return ["config"]
    stored = _canonical(_resolve_mixers(stored))
    wanted = _canonical(_resolve_mixers(json.loads(json.dumps(run.config()))))
    out = [k for k in dict.fromkeys([*wanted, *stored]) if stored.get(k) != wanted.get(k)]
    # A file that records the model as it was built reruns when a default has changed since.
    then = _current_names(payload.get("resolved"))
    if then is not None and _canonical(then) != _canonical(_known(resolved_config(run), then)):
        out.append("resolved model")
    return out


def resolved_config(run: Run) -> dict[str, Any] | None:
    """The model ``run`` builds, with every default filled in, as JSON values: its ``ModelConfig``, each mixer of
    its pattern at its full config and, for a wrapper, the wrapper's config.  Stored in each run file as
    ``resolved``, so that a default changed after the run makes it run again.  None for a ``RUN_KINDS``
    experiment (its settings are all in ``experiment``)."""
    if run.spec is None:
        return None
    mc = run.spec.model_config(run.data.vocab_size, run.d_model)
    model = dataclasses.asdict(mc)
    model["mixers"] = {name: _full_mixer(name, mc.d_model, (mc.mixers or {}).get(name))
                       for name in dict.fromkeys(mc.pattern)}
    out = {"model": model}
    if run.spec.wrapper is not None:
        out["wrapper"] = dataclasses.asdict(run.spec.wrapper_config()[1])
    return json.loads(json.dumps(out))


def _current_names(resolved: Any) -> Any:
    """A stored ``resolved`` with each mixer's renamed fields under their current names (``renamed_options``, the
    rule every config takes old option names by): a rename since the run changes no model, so it must not make the
    run again.  A mixer this version does not know, or whose fields cannot be renamed, is left as it was stored."""
    from memzoo.models.contract import renamed_options
    from memzoo.models.registry import MIXERS

    mixers = resolved.get("model", {}).get("mixers") if isinstance(resolved, dict) else None
    if not isinstance(mixers, dict):
        return resolved
    out = {}
    for name, cfg in mixers.items():
        if name in MIXERS and isinstance(cfg, dict):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                try:
                    cfg = renamed_options(f"mixer {name!r}", MIXERS[name].config_class, cfg)
                except TypeError:  # old and new name both stored: compared as stored (a mismatch reruns it)
                    pass
        out[name] = cfg
    return {**resolved, "model": {**resolved["model"], "mixers": out}}


def _known(now: Any, then: Any) -> Any:
    """``now`` without the dict keys ``then`` lacks, at any depth: an option added after a run was stored is taken
    to keep the old behaviour at its default."""
    if isinstance(now, dict) and isinstance(then, dict):
        return {k: _known(v, then[k]) for k, v in now.items() if k in then}
    return now


def _canonical(value: Any) -> Any:
    """A config with None-valued keys dropped: a field added later with a None default leaves old runs valid."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def _full_mixer(name: str, d_model: Any, opts: dict[str, Any] | None) -> dict[str, Any]:
    """Mixer ``name``'s validated config for ``opts`` with every default filled in, as JSON values (an old option
    name is accepted without its deprecation warning)."""
    from memzoo.models.registry import mixer_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return json.loads(json.dumps(dataclasses.asdict(mixer_config(name, d_model, opts))))


def _resolve_mixers(config: Any) -> Any:
    """``config`` with each mixer's options replaced by its full, validated config, so that an option renamed
    since the run was stored (the old name still accepted) compares equal to the new one."""
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        return config
    resolved = {}
    for name, opts in (config["model"].get("mixers") or {}).items():
        try:
            resolved[name] = _full_mixer(name, config.get("d_model"), opts)
        except (ValueError, TypeError):
            resolved[name] = opts
    return {**config, "model": {**config["model"], "mixers": resolved}}


def _write_atomic(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, allow_nan=True))
    tmp.replace(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim(path: Path) -> bool:
    """Create the run's lock file; False when a live worker holds it.  A lock left by a dead process of this
    machine is taken over; one from another machine is respected (its owner cannot be checked from here)."""
    lock = path.with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                host, pid = lock.read_text().split()
            except (OSError, ValueError):
                return False  # being written by its owner this instant, or unreadable: leave it
            if host != socket.gethostname() or _pid_alive(int(pid)):
                return False
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return True
    return False


def _harness_run(run: Run, *, device: str, progress: bool, desc: str, compile: bool = False) -> dict[str, Any]:
    from .harness import train_one

    return train_one(run.spec, run.d_model, run.data, run.lr, run.seed, run.train, task=run.task, device=device,
                     progress=progress, desc=desc, compile=compile)


def _longmem_recall_run(run: Run, *, device: str, progress: bool, desc: str, compile: bool = False) -> dict[str, Any]:
    """``run_longmem_recall``'s record, plus ``primary`` and ``metrics`` as the page reads them (``arm_metrics``)."""
    from .longmem_recall import arm_metrics, run_longmem_recall

    # Its two arms and the backbone are trained eagerly; ``compile`` is for the harness runs.
    rec = run_longmem_recall(run.experiment, run.seed, device=device, progress=progress, desc=f"{desc} ")
    return {**rec, "primary": "accuracy", "metrics": arm_metrics(rec)}


# Experiments other than ``train_one``, by ``Run.task``: (run, device, progress, desc) -> record with ``primary``
# and ``metrics`` (slice -> metric -> value).
RUN_KINDS: dict[str, Callable[..., dict[str, Any]]] = {"longmem_recall": _longmem_recall_run}


def _summary(rec: dict[str, Any]) -> str:
    """The record's primary metric, of the slice ``all`` or else of every slice."""
    primary, metrics = rec["primary"], rec["metrics"]
    if "all" in metrics:
        return f"{primary} {metrics['all'][primary]:.3f}"
    return ", ".join(f"{name} {primary} {m[primary]:.3f}" for name, m in metrics.items())


def run_suite(runs: list[Run], results_dir: str | Path, *, device: str = "cpu", progress: bool = True,
              max_runs: int | None = None, log: Any = print, suite: list[Run] | None = None,
              compile: bool = False, compile_skip: tuple[str, ...] = ()) -> dict[str, int]:
    """Train the runs without a stored result (the first ``max_runs`` of them) and store each as soon as it ends.

    ``compile``: train the harness runs through ``torch.compile`` (``train_one``).  It is not part of a run's
    config, so a stored run counts whichever way it was trained; a compiled run's ``environment`` says
    ``torch_compile: true``.  ``RUN_KINDS`` experiments, and models named in ``compile_skip`` (their
    ``ModelSpec.name``), train eagerly.

    ``suite`` (default ``runs``): every run of the preset, where the sweeps named by ``lr_from`` are looked up.
    A run whose sweep has not finished, or that another worker holds, is left for a later call.  Returns counts
    of ``done``, ``skipped`` (already stored), ``waiting`` (sweep unfinished or held elsewhere) and CPU seconds.
    """
    from .results import environment

    results_dir = Path(results_dir)
    by_key = {r.key: r for r in (suite if suite is not None else runs)}
    todo = [r for r in runs if load_result(results_dir, r, by_key) is None]
    log(f"report: {len(runs)} runs selected, {len(runs) - len(todo)} already done, {len(todo)} to run"
        + (f" (this call: at most {max_runs})" if max_runs is not None else ""))
    skipped = len(runs) - len(todo)
    env = environment(device)
    cpu_total, done, waiting = 0.0, 0, 0
    for n, pending in enumerate(todo, 1):
        if max_runs is not None and done >= max_runs:
            break
        # Resolved now, not up front: the sweep may have finished earlier in this call.
        run = pending.resolve(results_dir, by_key)
        path = run_path(results_dir, pending)
        if run is None or not _claim(path):
            waiting += 1
            log(f"[{n}/{len(todo)}] {pending.key}: "
                + ("its learning-rate sweep has not finished" if run is None else "held by another worker"))
            continue
        try:
            if load_result(results_dir, pending, by_key) is not None:  # finished by another worker meanwhile
                skipped += 1
                continue
            c0, t0 = time.process_time(), time.perf_counter()
            compiled = compile and run.task not in RUN_KINDS and run.spec.name not in compile_skip
            rec = RUN_KINDS.get(run.task, _harness_run)(run, device=device, progress=progress,
                                                        desc=f"[{n}/{len(todo)}] {run.key}", compile=compiled)
            cpu_s, wall_s = time.process_time() - c0, time.perf_counter() - t0
            payload = {"key": run.key, "study": run.study, "created": dt.datetime.now().isoformat(timespec="seconds"),
                       "config": run.config(),
                       "environment": {**env, "torch_compile": True} if compiled else env,
                       "cpu_s": round(cpu_s, 1),
                       "wall_s": round(wall_s, 1), "record": rec}
            resolved = resolved_config(run)
            if resolved is not None:
                payload = {**payload, "resolved": resolved}
            _write_atomic(path, payload)
        finally:
            path.with_suffix(".lock").unlink(missing_ok=True)
        cpu_total += cpu_s
        done += 1
        lr = f", lr {run.lr:g} (best of its sweep)" if run.lr_from else ""
        log(f"[{n}/{len(todo)}] {run.key}: {_summary(rec)}{lr} in {wall_s:.0f}s wall, "
            f"{cpu_s:.0f}s CPU (suite so far {cpu_total / 60:.1f} CPU min)")
    return {"done": done, "skipped": skipped, "waiting": waiting, "cpu_s": round(cpu_total, 1)}


def _parser() -> argparse.ArgumentParser:
    from .report_suite import PRESETS, STUDIES

    p = argparse.ArgumentParser(prog="memzoo-bench report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="suite size (default: cpu)")
    p.add_argument("--only", default="", help=f"comma-separated studies to run, of {', '.join(STUDIES)}")
    p.add_argument("--out", type=Path, default=None,
                   help="folder of the run JSONs (default benchmarks/results/report/<preset>)")
    p.add_argument("--page", type=Path, default=None, help="page to write (default docs/results.md)")
    p.add_argument("--page-only", action="store_true", help="rebuild the page from the stored runs, train nothing")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    p.add_argument("--list", action="store_true", help="print the declared runs and whether each has run, then exit")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per worker (default 1; run one worker per core for more)")
    p.add_argument("--compile", action="store_true",
                   help="train through torch.compile (about a minute of compiling per run, then 1.6-1.8x faster "
                        "steps for gated delta or GLA on a CPU; needs a C++ compiler there); stored runs stay valid")
    p.add_argument("--compile-skip", default="",
                   help="with --compile: comma-separated models (the zoo's names) to train eagerly, e.g. "
                        "titans_mac, whose compile took 13 minutes on a CPU for slower steps")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    from .report_page import write_page
    from .report_suite import STUDIES, build_suite

    args = _parser().parse_args(argv)
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = [s for s in only if s not in STUDIES]
    if unknown:
        raise SystemExit(f"--only: unknown studies {unknown}; known: {list(STUDIES)}")
    results_dir = args.out or ROOT / "benchmarks" / "results" / "report" / args.preset
    page = args.page or (ROOT / "docs" / "results.md" if args.out is None else Path(args.out) / "results.md")
    runs = build_suite(args.preset)
    by_key = {r.key: r for r in runs}
    if args.list:
        for r in runs:
            print(f"{'done   ' if load_result(results_dir, r, by_key) else 'pending'} {r.study:10s} {r.key}")
        return 0
    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    skip = tuple(s.strip() for s in args.compile_skip.split(",") if s.strip())
    names = {r.spec.name for r in runs if r.spec is not None}
    if skip and not args.compile:
        raise SystemExit("--compile-skip goes with --compile")
    if set(skip) - names:
        raise SystemExit(f"--compile-skip: unknown models {sorted(set(skip) - names)}; the {args.preset} preset has "
                         f"{sorted(names)}")
    if not args.page_only:
        if args.device == "cpu":
            import torch

            torch.set_num_threads(args.threads)
        todo = [r for r in runs if not only or r.study in only]
        stats = run_suite(todo, results_dir, device=args.device, progress=not args.no_progress,
                          max_runs=args.max_runs, suite=runs, compile=args.compile, compile_skip=skip)
        print(f"report: ran {stats['done']}, skipped {stats['skipped']}, waiting {stats['waiting']}, "
              f"{stats['cpu_s'] / 60:.1f} CPU minutes")
    path = write_page(args.preset, runs, results_dir, page)
    print(f"report: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
