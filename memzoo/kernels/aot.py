"""Ahead-of-time GPU compile gate: every launch every Triton op makes, compiled for sm_80 and sm_90 on a CPU.

The interpreter (``TRITON_INTERPRET=1``, how CI runs the kernels) accepts code a real compile rejects and says
nothing about registers or shared memory.  Triton compiles for any target without a GPU, so this module:

    1. captures the real launches: it runs every op (forward and backward) on small CPU inputs with the launch
       intercepted before any driver call, so nothing executes; an autotuned kernel is recorded once per config of
       its full list (``autotune_or_fixed`` keeps it, and its default, on the tuner);
    2. binds each launch's arguments the way ``JITFunction.run`` does on a GPU (signature, constexprs, alignment
       attributes) and compiles it with ``triton.compile`` for ``GPUTarget("cuda", 80 | 90, 32)``;
    3. reads the results: the compiler's error, or registers and stack (spill) bytes from ``cuobjdump
       --dump-resource-usage``, shared memory from the metadata, how many ``tt.dot`` lower to tensor cores (the
       TTGIR encoding of each dot result, plus ``mma`` / ``wgmma`` in the PTX), and resident blocks per SM.

Shapes only matter through constexprs and argument specialisation: captures use a short sequence with the real
head dims (64 / 128), chunk 64 and a 65k-chunk bank for retrieval.  Compiling needs a Triton that is not in
interpreter mode (every ``@triton.jit`` in Triton's own library becomes an interpreted function there), so
``python -m memzoo.kernels.aot`` re-executes itself without ``TRITON_INTERPRET``.

``python -m memzoo.kernels.aot [--ci] [--all-configs] [--ops OP ...] [--json PATH] [--md PATH]`` writes the report
(default ``benchmarks/results/gpu_compile_report.{json,md}``): ``--ci`` keeps the cases CI compiles, ``--all-configs``
adds every autotune config to the defaults; ``--list`` prints the launches without compiling.
Uses two Triton internals, ``create_function_from_signature`` and ``JITFunction._pack_args`` (the binder a GPU
launch uses); ``tests/kernels/test_gpu_compile.py`` fails loudly if they change.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

__all__ = ["ARCHS", "SMEM_LIMIT", "Launch", "capture", "compile_launch", "report_markdown", "main"]

ARCHS = (80, 90)
# Shared memory per block (opt-in maximum) and per SM, bytes; 1 KB per resident block is reserved by the driver.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
_SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
_REGS_PER_SM, _THREADS_PER_SM, _BLOCKS_PER_SM = 65536, 2048, 32
REPORT_STEM = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "gpu_compile_report"


@dataclass
class Launch:
    """One kernel specialisation at one config: what a GPU would compile for one launch of an op."""

    op: str  # the op folder, e.g. "gla"
    case: str  # dtype and dims of the captured calls, e.g. "bf16 K128 V128"
    kernel: str  # "<module>.<kernel name>"
    config: str  # "BV=32 w4 s2"
    default: bool  # the config the op uses without tuning (the interpreter's, and the one CI must keep spill-free)
    half: bool  # the op's inputs are bf16/fp16 (its dots should lower to tensor cores)
    has_dot: bool  # the kernel source calls tl.dot
    signature: dict
    constexprs: dict  # argument name -> value
    options: dict  # num_warps, num_stages, ...
    fn: JITFunction | None = field(default=None, repr=False, compare=False)
    attrs: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def id(self) -> str:
        return f"{self.kernel.removeprefix('memzoo.kernels.')}[{self.case}|{self.config}]"

    def record(self) -> dict:
        """JSON-ready: everything but the kernel object and the alignment attributes."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("fn", "attrs")}
        d["constexprs"] = {k: v if isinstance(v, (bool, int, float, str, type(None))) else repr(v)
                           for k, v in self.constexprs.items()}
        d["id"] = self.id
        return d


# --------------------------------------------------------------------------------------------------------- capture

class _Recorder:
    """Replaces ``JITFunction.run`` and ``Autotuner.run`` while ops run: launches are recorded, never executed."""

    def __init__(self) -> None:
        self.calls: list[tuple[JITFunction, tuple, dict, bool]] = []
        self._default: bool | None = None

    def jit_run(self, fn: JITFunction, *args, grid, warmup, **kwargs):
        self.calls.append((fn, args, kwargs, True if self._default is None else self._default))

    def tune_run(self, tuner: Autotuner, *args, **kwargs):
        configs = getattr(tuner, "all_configs", tuner.configs)
        default = getattr(tuner, "default_config", configs[0])
        for cfg in configs:
            self._default = cfg.all_kwargs() == default.all_kwargs()
            try:
                tuner.fn.run(*args, **kwargs, **cfg.all_kwargs())
            finally:
                self._default = None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        rec = self
        saved = JITFunction.run, Autotuner.run
        JITFunction.run = lambda fn, *a, grid, warmup, **kw: rec.jit_run(fn, *a, grid=grid, warmup=warmup, **kw)
        Autotuner.run = lambda tuner, *a, **kw: rec.tune_run(tuner, *a, **kw)
        # the dispatchers send CPU tensors to Triton only in interpreter mode; kernels were already built for real
        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            yield
        finally:
            JITFunction.run, Autotuner.run = saved
            if old is None:
                os.environ.pop("TRITON_INTERPRET")
            else:
                os.environ["TRITON_INTERPRET"] = old


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _leaf(*shape, dtype, scale=1.0, neg=False):
    t = torch.rand(*shape) * scale
    return (-t if neg else t).to(dtype).requires_grad_()


def _backward(*outs) -> None:
    loss = sum(o.float().sum() for o in outs if o is not None and o.requires_grad)
    loss.backward()


def _in_ci(dtype: str, d: int) -> bool:
    # CI compiles bf16 at both head dims and fp32 at 128 (fp16 lowers like bf16); the sweep compiles all
    return dtype == "bf16" or (dtype == "fp32" and d == 128)


def _gla_cases() -> Iterator[tuple[str, str, Callable[[], None], bool]]:
    from .gla import chunk_gla, chunk_simple_gla, fused_recurrent_gla

    for name, dt in _DTYPES.items():
        for d in (64, 128):
            def run(dt=dt, d=d):
                q, k, v = (_leaf(1, 64, 2, d, dtype=dt) for _ in range(3))
                g = _leaf(1, 64, 2, d, dtype=dt, scale=0.1, neg=True)
                o, _ = chunk_gla(q, k, v, g, impl="triton")
                _backward(o)
                # carried state: the USE_H0 / STORE_HT / USE_DHT / USE_DH0 specialisations
                h0 = torch.zeros(1, 2, d, d, requires_grad=True)
                o, ht = chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True, impl="triton")
                _backward(o, ht)
                gs = _leaf(1, 64, 2, dtype=dt, scale=0.1, neg=True)
                _backward(chunk_simple_gla(q, k, v, gs, impl="triton")[0])
                with torch.no_grad():
                    fused_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True, impl="triton")
            yield "gla", f"{name} K{d} V{d}", run, _in_ci(name, d)


def _gated_delta_cases():
    from .gated_delta import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    for name, dt in _DTYPES.items():
        for d in (64, 128):
            def run(dt=dt, d=d):
                q, k, v = (_leaf(1, 64, 2, d, dtype=dt) for _ in range(3))
                g = _leaf(1, 64, 2, dtype=torch.float32, scale=0.1, neg=True)
                beta = _leaf(1, 64, 2, dtype=torch.float32)
                h0 = torch.zeros(1, 2, d, d, requires_grad=True)
                o, ht = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                               use_qk_l2norm=True, impl="triton")
                _backward(o, ht)
                with torch.no_grad():
                    fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                     use_qk_l2norm=True, impl="triton")
            yield "gated_delta", f"{name} K{d} V{d}", run, _in_ci(name, d)


def _titans_cases():
    from .titans import titans_linear

    for name, dt in _DTYPES.items():
        for d in (64, 128):
            for chunk in (16, 64):
                for channel in (False, True):
                    def run(dt=dt, d=d, chunk=chunk, channel=channel):
                        q, k, v = (_leaf(1, 64, 2, d, dtype=dt) for _ in range(3))
                        theta = _leaf(1, 64, 2, dtype=torch.float32, scale=0.1)
                        log_eta = _leaf(1, 64, 2, dtype=torch.float32, scale=0.1, neg=True)
                        # the decay per head, or per key channel (the layer's default for the linear memory)
                        log_gamma = _leaf(1, 64, 2, *((d,) if channel else ()), dtype=torch.float32, scale=0.1,
                                          neg=True)
                        state = tuple(torch.zeros(1, 2, d, d, requires_grad=True) for _ in range(3))
                        y, st = titans_linear(q, k, v, theta, log_eta, log_gamma, state,
                                              torch.zeros(1, dtype=torch.long), chunk, impl="triton")
                        _backward(y, *st)
                    # CI: the layer's default chunk at the cases of the other ops
                    yield ("titans", f"{name} K{d} V{d} chunk{chunk}{' channel' if channel else ''}", run,
                           _in_ci(name, d) and chunk == 16)
    for name, dt in _DTYPES.items():
        for d in (64, 128):
            for train in (True, False):
                # CI: the training launches (forward storing states, the backward's reverse walk) at the CI cases; the
                # sweep adds inference and the lq retention's specialisations
                case = f"{name} mlp D{d} E{4 * d} chunk16 {'train' if train else 'infer'}"
                yield "titans", case, partial(_titans_mlp_case, dt, d, train), _in_ci(name, d) and train
            lq = partial(_titans_mlp_case, dt, d, True, True)
            yield "titans", f"{name} mlp D{d} E{4 * d} chunk16 train lq", lq, False


def _titans_mlp_case(dt: torch.dtype, d: int, train: bool, lq: bool = False) -> None:
    from .titans import Miras, titans_mlp

    T, H, E = 64, 2, 4 * d
    q, k, v = (_leaf(1, T, H, d, dtype=dt) for _ in range(3))
    th1, th2 = (_leaf(1, T, H, dtype=torch.float32, scale=0.1) for _ in range(2))
    log_eta, log_gamma = (_leaf(1, T, H, dtype=torch.float32, scale=0.1, neg=True) for _ in "eg")
    state = tuple(torch.zeros(1, H, *shape, requires_grad=True) for shape in [(E, d)] * 3 + [(d, E)] * 3)
    # inference (no grad): the kernel keeps two alternating state slots instead of every chunk's
    with torch.set_grad_enabled(train):
        y, st = titans_mlp(q, k, v, th1, th2, log_eta, log_gamma, state, torch.zeros(1, dtype=torch.long), 16,
                           impl="triton", miras=Miras(retention="lq" if lq else "l2"))
    if train:
        _backward(y, *st)


def _ssm_cases():
    from .ssm import vandermonde, vandermonde_transpose

    for n in (32, 64):
        def run(n=n):
            z_re, z_im = _leaf(4, n, dtype=torch.float32, neg=True), _leaf(4, n, dtype=torch.float32)
            w_re, w_im = _leaf(8, n, dtype=torch.float32), _leaf(8, n, dtype=torch.float32)
            _backward(vandermonde(z_re, z_im, w_re, w_im, 1024, impl="triton"))
            _backward(*vandermonde_transpose(z_re, z_im, _leaf(8, 1024, dtype=torch.float32), impl="triton"))
        yield "ssm", f"fp32 N{n}", run, n == 64


def _retrieval_cases():
    from .retrieval import chunk_topk

    for name, dt in _DTYPES.items():
        for d in (64, 128):
            def run(dt=dt, d=d):
                q = torch.randn(1, 2, 64, d, dtype=dt)
                keys = torch.randn(1, 2, 65536, d, dtype=dt)
                chunk_topk(q, keys, 16, impl="triton")
            yield "retrieval", f"{name} D{d} bank65536 k16", run, _in_ci(name, d)


CASES = {"gla": _gla_cases, "gated_delta": _gated_delta_cases, "titans": _titans_cases, "ssm": _ssm_cases,
         "retrieval": _retrieval_cases}


def _config_label(constexprs: dict, options: dict, tuned: set[str]) -> str:
    # switched-on flags (USE_H0, ...) tell apart the specialisations of one kernel within a case
    parts = [k for k in sorted(constexprs) if constexprs[k] is True]
    parts += [f"{k}={constexprs[k]}" for k in sorted(tuned) if k in constexprs]
    parts.append(f"w{options.get('num_warps', 4)}")
    parts.append(f"s{options.get('num_stages', 3)}")
    return " ".join(parts)


def _bind(fn: JITFunction, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs by name, attrs, option kwargs) exactly as ``JITFunction.run`` computes them."""
    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    names = fn.arg_names
    by_name = {names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
    option_kwargs = {k: v for k, v in kwargs.items() if k not in names and k != "debug"}
    return signature, by_name, attrs, option_kwargs


def capture(ops: list[str] | None = None, ci_only: bool = False) -> tuple[list[Launch], dict[str, str]]:
    """Every distinct launch of the named ops (all by default), forward and backward, at every autotune config;
    ``ci_only`` keeps the cases CI compiles (each op's case generator marks them).

    Returns the launches and, per op case that raised while being captured, its error.
    """
    if triton.knobs.runtime.interpret:
        raise RuntimeError("capture() needs Triton outside interpreter mode: unset TRITON_INTERPRET before the first "
                           "triton import (python -m memzoo.kernels.aot does)")
    rec = _Recorder()
    errors: dict[str, str] = {}
    labelled: list[tuple[str, str, bool, int]] = []
    for op in ops or list(CASES):
        try:
            # the dispatchers import their Triton modules lazily: import them now, while @triton.jit builds real
            # kernels (the recorder turns the interpreter flag on for the dispatchers)
            for mod in pkgutil.iter_modules([str(Path(__file__).parent / op)]):
                if mod.name.startswith("triton_"):
                    importlib.import_module(f"{__package__}.{op}.{mod.name}")
            cases = list(CASES[op]())
        except Exception as e:  # an op module that does not import is a gate failure, reported per op
            errors[op] = f"{type(e).__name__}: {e}"
            continue
        for op_name, case, run, in_ci in cases:
            if ci_only and not in_ci:
                continue
            start = len(rec.calls)
            torch.manual_seed(0)
            try:
                with rec.active():
                    run()
            except Exception as e:
                errors[f"{op_name} {case}"] = f"{type(e).__name__}: {e}"
            labelled += [(op_name, case, case.startswith(("bf16", "fp16")), i) for i in range(start, len(rec.calls))]
    launches: dict[tuple, Launch] = {}
    for op_name, case, half, i in labelled:
        fn, args, kwargs, default = rec.calls[i]
        signature, constexprs, attrs, options = _bind(fn, args, kwargs)
        tuned = {k for k in kwargs if k in fn.arg_names}
        tuner_keys = tuned & {"BV", "BK", "BT", "BL", "BN", "BLOCK_T", "BLOCK_N", "BC", "BE"}
        launch = Launch(
            op=op_name, case=case, kernel=f"{fn.fn.__module__}.{fn.fn.__name__}",
            config=_config_label(constexprs, options, tuner_keys), default=default, half=half,
            has_dot="tl.dot(" in fn.src, signature=dict(signature), constexprs=constexprs, options=options,
            fn=fn, attrs=attrs,
        )
        key = (launch.kernel, json.dumps(launch.signature, sort_keys=True), repr(sorted(constexprs.items())),
               repr(sorted(attrs.items())), repr(sorted(options.items())))
        if key in launches:
            # the same compile reached from another op or case (chunk_simple_gla, the backward's recompute):
            # the default flag is the OR (a config that is anyone's default must not spill)
            launches[key].default |= default
            continue
        launches[key] = launch
    return list(launches.values()), errors


# --------------------------------------------------------------------------------------------------------- compile

def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    usage: dict[str, int] = {}
    for line in out.splitlines():
        if "REG:" in line:
            usage = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", line)}
    return usage


_DOT = re.compile(r"= (tt\.dot|ttng\.warp_group_dot) [^\n]*->\s*tensor<[^,>]*,\s*(#[\w.]+)")
_MMA_ALIAS = re.compile(r"^(#\w+) = #ttg\.nvidia_mma<", re.M)


def _dots(ttgir: str) -> tuple[int, int]:
    """(number of dots, number lowered to tensor cores): a dot whose result has an ``nvidia_mma`` layout (or a
    Hopper ``warp_group_dot``) runs on tensor cores; a ``blocked`` result is an FMA loop."""
    mma = set(_MMA_ALIAS.findall(ttgir))
    n = tc = 0
    for m in _DOT.finditer(ttgir):
        n += 1
        tc += m.group(1) == "ttng.warp_group_dot" or m.group(2) in mma
    return n, tc


def _blocks_per_sm(arch: int, regs: int, shared: int, warps: int) -> int:
    by_threads = _THREADS_PER_SM // (32 * warps)
    # registers are allocated per warp in units of 256
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = (_REGS_PER_SM // regs_per_warp) // warps
    by_smem = _SMEM_PER_SM[arch] // (shared + 1024)
    return min(by_threads, by_regs, by_smem, _BLOCKS_PER_SM)


def compile_launch(launch: Launch, arch: int) -> dict:
    """Compile one launch for ``sm_{arch}``; the record's ``error`` is the compiler's message, or None."""
    out = {"id": launch.id, "arch": arch, "error": None}
    start = time.perf_counter()
    try:
        src = ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
        usage = _resource_usage(kernel.asm["cubin"])
        ptx = kernel.asm["ptx"]
        n_dots, tc_dots = _dots(kernel.asm["ttgir"])
        warps = kernel.metadata.num_warps
        out.update(
            registers=usage.get("reg", 0), spill_bytes=usage.get("stack", 0) + usage.get("local", 0),
            shared=kernel.metadata.shared, dots=n_dots, tensor_core_dots=tc_dots,
            mma="mma.sync" in ptx or "wgmma" in ptx, wgmma="wgmma" in ptx, num_warps=warps,
            blocks_per_sm=_blocks_per_sm(arch, usage.get("reg", 0), kernel.metadata.shared, warps),
        )
    except Exception as e:  # the compiler's rejection is the result
        msg = str(e).strip()
        out["error"] = f"{type(e).__name__}: {msg}"[:4000]
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


# ---------------------------------------------------------------------------------------------------------- report

def report_markdown(launches: list[dict], results: list[dict], errors: dict[str, str]) -> str:
    by_id = {(r["id"], r["arch"]): r for r in results}
    lines = [
        "# GPU compile report (ahead of time, no GPU)",
        "",
        "`python -m memzoo.kernels.aot` compiles every launch of every Triton op for sm_80 and sm_90. "
        "regs: registers per thread; spill: stack bytes per thread (spills); smem: shared memory per block, KB; "
        "tc: dots on tensor cores / dots (mma on sm_80, wgmma or mma on sm_90); occ: resident blocks per SM. "
        "`*` marks the op's default config.",
        "",
        "| op | kernel | case | config | sm_80 regs | spill | smem | tc | occ | sm_90 regs | spill | smem | tc | occ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ln in launches:
        cells = []
        for arch in ARCHS:
            r = by_id.get((ln["id"], arch))
            if r is None:
                cells += ["-"] * 5
            elif r["error"]:
                cells += ["**error**", "", "", "", ""]
            else:
                mark = "" if not r["dots"] else f"{r['tensor_core_dots']}/{r['dots']}"
                cells += [str(r["registers"]), str(r["spill_bytes"]), f"{r['shared'] / 1024:.1f}", mark,
                          str(r["blocks_per_sm"])]
        star = "*" if ln["default"] else ""
        lines.append(f"| {ln['op']} | {ln['kernel'].rsplit('.', 1)[-1]} | {ln['case']} | {ln['config']}{star} | "
                     + " | ".join(cells) + " |")
    failed = [r for r in results if r["error"]]
    if failed or errors:
        lines += ["", "## Errors", ""]
        for where, msg in errors.items():
            lines += [f"- capture `{where}`: {msg.splitlines()[0] if msg else ''}"]
        for r in failed:
            first = next((x for x in r["error"].splitlines() if x.strip()), "")
            lines += [f"- `{r['id']}` sm_{r['arch']}: {first}"]
    return "\n".join(lines) + "\n"


def _reexec_without_interpreter(argv: list[str]) -> None:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET")
    os.execve(sys.executable, [sys.executable, "-m", "memzoo.kernels.aot", *argv], env)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if triton.knobs.runtime.interpret:
        _reexec_without_interpreter(argv)
    p = argparse.ArgumentParser(prog="python -m memzoo.kernels.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", nargs="*", choices=list(CASES), help="ops to capture (default: all)")
    p.add_argument("--all-configs", action="store_true", help="compile every autotune config, not only defaults")
    p.add_argument("--ci", action="store_true", help="only the cases CI compiles (bf16 K64/K128, fp32 K128, ...)")
    p.add_argument("--archs", nargs="*", type=int, default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--list", action="store_true", help="print the captured launches as JSON and exit")
    p.add_argument("--json", type=Path, default=REPORT_STEM.with_suffix(".json"))
    p.add_argument("--md", type=Path, default=REPORT_STEM.with_suffix(".md"))
    p.add_argument("--no-md", action="store_true", help="write the JSON only")
    args = p.parse_args(argv)

    launches, errors = capture(args.ops, ci_only=args.ci)
    records = [ln.record() for ln in launches]
    if args.list:
        json.dump({"launches": records, "capture_errors": errors}, sys.stdout, indent=1)
        print()
        return 0
    todo = [ln for ln in launches if args.all_configs or ln.default]
    results = []
    start = time.perf_counter()
    for i, ln in enumerate(todo):
        for arch in args.archs:
            r = compile_launch(ln, arch)
            results.append(r)
            status = "ERROR" if r["error"] else f"regs {r['registers']} spill {r['spill_bytes']} smem {r['shared']}"
            print(f"[{i + 1}/{len(todo)}] sm_{arch} {ln.id}: {status} ({r['seconds']}s)", file=sys.stderr)
    kept = [rec for rec, ln in zip(records, launches) if args.all_configs or ln.default]
    report = {"triton": triton.__version__, "all_configs": args.all_configs, "ci": args.ci, "archs": args.archs,
              "seconds": round(time.perf_counter() - start, 1), "launches": kept, "results": results,
              "capture_errors": errors}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    if not args.no_md:
        args.md.write_text(report_markdown(kept, results, errors))
    n_err = sum(r["error"] is not None for r in results)
    print(f"{len(results)} compiles, {n_err} errors, {len(errors)} capture errors -> {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
