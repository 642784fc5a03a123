"""Measure the times and scores the README and docs quote, by running their commands as a user would.

Each command runs in a fresh interpreter from the repository root.  For each one the result records the
wall time, the CPU time of the child processes (user + system, from ``getrusage``), the 1-minute load average
before and after, and the score the docs quote (read from the command's own output files).  On an idle machine
the wall time of these single-process commands is about their CPU time; on a shared machine wall time grows
with the load and CPU time much less, so both are kept.  The commands run with one thread by default: with two,
threads that wait for each other on a busy machine burn CPU time too, and neither number means much.

    python benchmarks/readme_numbers.py                       # every command (tens of minutes on 2 cores)
    python benchmarks/readme_numbers.py --only quickstart,mqar-ci --save
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _mqar_score(out: Path) -> dict:
    (path,) = (out / "results").glob("*.json")
    (rec,) = json.loads(path.read_text())["records"]
    return {"accuracy": round(rec["metrics"]["all"]["accuracy"], 4), "steps": rec["steps"]}


def _niah_score(out: Path) -> dict:
    (path,) = (out / "results").glob("*.json")
    (rec,) = json.loads(path.read_text())["records"]
    m = rec["metrics"]["all"]
    return {"exact_match": round(m["exact_match"], 4), "accuracy": round(m["accuracy"], 4), "steps": rec["steps"]}


def _train_score(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = [r["loss/val"] for r in rows if "loss/val" in r]
    return {"val_loss": round(val[-1], 4) if val else None, "steps": max(r["step"] for r in rows)}


# name -> (README / docs command, argv after ``python``, score reader or None)
COMMANDS = {
    "python-m-memzoo": ("python -m memzoo", ["-m", "memzoo"], None),
    "quickstart": ("python examples/quickstart.py", ["examples/quickstart.py"], None),
    "readme-build-model": ("the README's build_model block", None, None),
    "mqar-ci": ("python -m memzoo.eval mqar --preset ci", ["-m", "memzoo.eval", "mqar", "--preset", "ci",
                                                            "--no-progress", "--out", "{out}"], _mqar_score),
    "niah-ci": ("memzoo-bench niah --preset ci", ["-m", "memzoo.eval", "niah", "--preset", "ci", "--no-progress",
                                                  "--out", "{out}"], _niah_score),
    "cil-ci": ("memzoo-bench cil --preset ci", ["-m", "memzoo.eval", "cil", "--preset", "ci", "--out", "{out}"], None),
    "train-tiny": ("python -m memzoo.train --preset tiny", ["-m", "memzoo.train", "--preset", "tiny",
                                                             "--log.progress", "false", "--out_dir", "{out}"],
                   _train_score),
}


def _readme_block() -> str:
    import re

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return next(b for b in blocks if "build_model(" in b)


def run(name: str, threads: int | None = 1) -> dict:
    command, argv, score = COMMANDS[name]
    if argv is None:
        argv = ["-c", _readme_block()]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        argv = [a.replace("{out}", str(out)) for a in argv]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
        proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise SystemExit(f"{command} failed:\n{proc.stderr[-3000:]}")
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        row = {"name": name, "command": command, "threads": threads, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
               "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)}
        if score is not None:
            row.update(score(out))
        if name == "quickstart":
            row["last_line"] = proc.stdout.strip().splitlines()[-1][:200]
        return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help=f"comma-separated subset of {', '.join(COMMANDS)}")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS of the commands (default 1: CPU time is then not inflated by threads "
                        "waiting for each other on a busy machine; 0 = torch's default, one per core)")
    p.add_argument("--save", action="store_true", help="write results/readme-numbers-<device>-<date>.json")
    a = p.parse_args()
    names = a.only.split(",") if a.only else list(COMMANDS)
    unknown = sorted(set(names) - set(COMMANDS))
    if unknown:
        raise SystemExit(f"unknown command name(s) {unknown}; choose from {', '.join(COMMANDS)}")
    rows = []
    for name in names:
        rows.append(run(name, a.threads or None))
        print(json.dumps(rows[-1]), flush=True)
    print_table(rows, ["name", "wall_s", "cpu_s", "load_before", "load_after"])
    if a.save:
        import torch

        name = "readme-numbers" + (f"-{a.only.replace(',', '-')}" if a.only else "")
        print(write_result(name, {"cores": os.cpu_count(), "torch_threads_default": torch.get_num_threads(),
                                  "rows": rows}))


if __name__ == "__main__":
    main()
