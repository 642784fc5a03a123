"""The ahead-of-time GPU compile gate (``memzoo.kernels.aot``): every launch of every Triton op, compiled for sm_80
and sm_90 on this CPU machine.

Per kernel module and target: every captured launch compiles, fits the per-block shared memory, spills nothing at
its default config, and (bf16/fp16 inputs) runs every ``tl.dot`` on tensor cores.  CI compiles each op's default
configs at the CI cases (``aot.py``'s ``--ci``); ``pytest -m aot_sweep tests/kernels/test_gpu_compile.py`` runs the
same checks over every case and every autotune config.

Compiling needs Triton outside interpreter mode, so the results come from ``python -m memzoo.kernels.aot``
subprocesses, once per pytest session (xdist workers share them through a lock file).
"""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the compile gate compiles Triton kernels: triton is not installed")

from filelock import FileLock  # noqa: E402  (torch's dependency)

import memzoo.kernels  # noqa: E402
from memzoo.kernels.aot import ARCHS, CASES, SMEM_LIMIT  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
KERNELS = Path(memzoo.kernels.__file__).parent
MODULES = sorted(f"{op}.{m.name}" for op in CASES for m in pkgutil.iter_modules([str(KERNELS / op)])
                 if m.name.startswith("triton_"))

# Default-config launches known to spill: (module, case substring, kernels, targets); launches whose case contains the
# substring and whose kernel is listed. The Titans linear kernels at chunk 64 (full sweep only) hold several [64, 64]
# fp32 coefficient tiles per program (spill-free at the layer's chunk, 16).
# Strict: once none of an entry's launches spills on a target, the test fails until the entry is removed here.
_TITANS_KERNELS = ("_titans_linear_fwd_kernel", "_titans_linear_bwd_kernel", "_titans_linear_dgate_kernel")
KNOWN_SPILLS: list[tuple[str, str, tuple[str, ...], tuple[int, ...]]] = [
    ("titans.triton_chunk", "chunk64", _TITANS_KERNELS, ARCHS),
]


def _cases() -> list:
    return [pytest.param(module, arch, id=f"{module}-sm{arch}") for module in MODULES for arch in ARCHS]


def _compile_all(scope: str, out_dir: Path) -> dict:
    """Run the gate CLI, one subprocess per op (two at a time), and merge the reports."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    flags = ["--ci"] if scope == "ci" else ["--all-configs"]

    def one(op: str) -> dict:
        path = out_dir / f"{scope}-{op}.json"
        cmd = [sys.executable, "-m", "memzoo.kernels.aot", *flags, "--ops", op, "--json", str(path), "--no-md"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"launches": [], "results": [], "capture_errors": {op: proc.stderr[-4000:]}}
        return json.loads(path.read_text())

    # the slowest op first, so two workers finish together
    ops = sorted(CASES, key=lambda op: op != "titans")
    with ThreadPoolExecutor(2) as pool:
        parts = list(pool.map(one, ops))
    merged = {"launches": [], "results": [], "capture_errors": {}}
    for part in parts:
        merged["launches"] += part["launches"]
        merged["results"] += part["results"]
        merged["capture_errors"].update(part["capture_errors"])
    return merged


@pytest.fixture(scope="module", params=["ci", pytest.param("sweep", marks=pytest.mark.aot_sweep)])
def report(request, tmp_path_factory) -> dict:
    scope = request.param
    if scope == "sweep" and "aot_sweep" not in (request.config.option.markexpr or ""):
        pytest.skip("the full autotune sweep runs only when selected: pytest -m aot_sweep")
    # xdist workers share the parent of their base temp dirs: the first compiles, the others read its file
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    path = shared / f"gpu_compile_{scope}.json"
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            path.write_text(json.dumps(_compile_all(scope, shared)))
    data = json.loads(path.read_text())
    launches = {ln["id"]: ln for ln in data["launches"]}
    rows = []
    for r in data["results"]:
        ln = launches[r["id"]]
        rows.append({**ln, **r, "module": ln["kernel"].removeprefix("memzoo.kernels.").rsplit(".", 1)[0]})
    return {"rows": rows, "capture_errors": data["capture_errors"], "launches": data["launches"]}


def _rows(report: dict, module: str, arch: int) -> list[dict]:
    return [r for r in report["rows"] if r["module"] == module and r["arch"] == arch]


def _fmt(rows: list[dict], *keys: str) -> str:
    return "\n".join(f"  {r['id']} sm_{r['arch']}: " + ", ".join(f"{k}={r.get(k)}" for k in keys) for r in rows)


@pytest.mark.parametrize("op", list(CASES))
def test_every_op_and_module_is_captured(report, op):
    errors = {k: v for k, v in report["capture_errors"].items() if k.split(" ")[0] == op}
    assert not errors, f"capturing {op}'s launches failed:\n" + "\n".join(f"{k}: {v}" for k, v in errors.items())
    captured = {ln["kernel"].removeprefix("memzoo.kernels.").rsplit(".", 1)[0] for ln in report["launches"]}
    missing = [m for m in MODULES if m.startswith(op + ".") and m not in captured]
    assert not missing, f"no launch captured from {missing}: add a case for it in memzoo/kernels/aot.py"


@pytest.mark.parametrize("module,arch", _cases())
def test_every_config_compiles(report, module, arch):
    failed = [r for r in _rows(report, module, arch) if r["error"]]
    first = failed[0]["error"] if failed else ""
    assert not failed, f"{len(failed)} launches do not compile for sm_{arch}:\n{_fmt(failed)}\nfirst error:\n{first}"


@pytest.mark.parametrize("module,arch", _cases())
def test_shared_memory_fits(report, module, arch):
    over = [r for r in _rows(report, module, arch) if not r["error"] and r["shared"] > SMEM_LIMIT[arch]]
    assert not over, f"shared memory over the sm_{arch} limit of {SMEM_LIMIT[arch]} bytes:\n{_fmt(over, 'shared')}"


@pytest.mark.parametrize("module,arch", _cases())
def test_default_config_spills_nothing(report, module, arch):
    rows = [r for r in _rows(report, module, arch) if not r["error"] and r["default"]]
    entries = [(case, [r for r in rows if case in r["case"] and r["kernel"].rsplit(".", 1)[1] in kernels])
               for mod, case, kernels, archs in KNOWN_SPILLS if mod == module and arch in archs]
    known = [r for _, listed in entries for r in listed]
    spills = [r for r in rows if r["spill_bytes"] and r not in known]
    assert not spills, f"default configs that spill on sm_{arch}:\n{_fmt(spills, 'registers', 'spill_bytes')}"
    for case, listed in entries:
        assert not listed or any(r["spill_bytes"] for r in listed), (
            f"{module} {case} is listed in KNOWN_SPILLS but spill-free on sm_{arch}: remove the entry")


@pytest.mark.parametrize("module,arch", _cases())
def test_half_precision_dots_use_tensor_cores(report, module, arch):
    rows = [r for r in _rows(report, module, arch) if not r["error"] and r["half"] and r["dots"]]
    slow = [r for r in rows if r["tensor_core_dots"] < r["dots"]]
    assert not slow, (f"bf16/fp16 launches with dots on the FMA units (sm_{arch}; an fp32 'ieee' dot, or fp32 "
                      f"operands):\n{_fmt(slow, 'tensor_core_dots', 'dots')}")
