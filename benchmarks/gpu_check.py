"""Every Triton op against its PyTorch reference on fresh random inputs, for a GPU session (``gpu_session.sh``).

For each op, dtype (bf16, fp32 with the default TF32 dots) and head size (64, 128): the reference runs in float64
(fp32 for the top-k search, whose reference takes no float64), the Triton path runs twice on the same inputs with every
tensor the kernels allocate poisoned with NaN first.  Reported per case: the worst relative RMS error over the outputs,
final states and all input gradients (random cotangents), the non-finite values, and whether the two Triton runs
differ at all (the kernels use no atomics, so any difference is a race or a read of unwritten memory).

    python benchmarks/gpu_check.py [--dims 64,128] [--dtypes bf16,fp32] [--ops a,b] [--json FILE]

On a CPU it runs under ``TRITON_INTERPRET=1`` (set here when no CUDA device is present) at ``--tiny`` shapes, which
checks this script's own logic.  Exit status 1 when any case fails or errors.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any memzoo kernel module is imported

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from memzoo.kernels.gated_delta import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule  # noqa: E402
from memzoo.kernels.gla import chunk_gla, chunk_simple_gla, fused_recurrent_gla  # noqa: E402
from memzoo.kernels.retrieval import chunk_topk  # noqa: E402
from memzoo.kernels.ssm import vandermonde, vandermonde_transpose  # noqa: E402
from memzoo.kernels.titans import titans_linear, titans_mlp  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Bounds on the relative RMS error against float64 (fp32 runs with TF32 dots), as in the kernel tests, with a margin
# for the longer sequences and larger heads here.
TOL = {"bf16": 3e-2, "fp32": 1e-2}


@dataclass
class Shape:
    B: int
    T: int
    H: int
    chunk: int


GPU_SHAPE = Shape(B=2, T=600, H=4, chunk=64)   # T not a multiple of the chunk: the tail chunk is masked
TINY_SHAPE = Shape(B=1, T=20, H=2, chunk=16)


@dataclass
class Case:
    """``run(impl, *inputs)`` returns the op's tensors; ``inputs`` are float64 masters (CPU); the first ``n_low`` are
    cast to the dtype under test, the other floating ones to fp32 (gates, states)."""

    op: str
    variant: str
    run: Callable[..., tuple[Tensor, ...]]
    inputs: list[Tensor]
    n_low: int = 3
    backward: bool = True
    ref_dtype: torch.dtype = torch.float64
    compare: str = "rel"   # "topk": compare the chosen chunks' exact scores
    dtypes: tuple[str, ...] = tuple(DTYPES)   # the Vandermonde kernels take fp32 only
    keep32: tuple[int, ...] = ()   # inputs the reference also takes in fp32 only (the fla-style initial states)


@dataclass
class Result:
    op: str
    variant: str
    dtype: str
    D: int
    status: str = "ERROR"
    err: float | None = None
    worst: str = ""
    tol: float | None = None
    nonfinite: int = 0
    run_diff: float | None = None
    seconds: float = 0.0
    errors: dict = field(default_factory=dict)
    message: str = ""


# ----------------------------------------------------------------------------------------------------------- inputs


def _qkv(g, s: Shape, D: int) -> list[Tensor]:
    q, k = (F.normalize(torch.randn(s.B, s.T, s.H, D, generator=g, dtype=torch.float64), dim=-1) for _ in "qk")
    return [q, k, torch.randn(s.B, s.T, s.H, D, generator=g, dtype=torch.float64)]


def _rand(g, *shape, lo=0.0, hi=1.0) -> Tensor:
    return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)


def _randn(g, *shape, scale=1.0) -> Tensor:
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


def _pair(out) -> tuple[Tensor, ...]:
    o, state = out
    return (o, *(state if isinstance(state, tuple) else (state,)))


def cases(s: Shape, D: int, g: torch.Generator) -> Iterator[Case]:
    B, T, H, C = s.B, s.T, s.H, s.chunk

    def delta(op):
        def run(impl, q, k, v, gate, beta, h0):
            return _pair(op(q, k, v, gate, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=True,
                            chunk_size=C, impl=impl))
        return run

    def delta_inputs():
        return [*_qkv(g, s, D), _rand(g, B, T, H, lo=-0.3, hi=0.0), _rand(g, B, T, H), _randn(g, B, H, D, D, scale=0.1)]

    yield Case("gated_delta", "chunk", delta(chunk_gated_delta_rule), delta_inputs(), keep32=(5,))
    yield Case("gated_delta", "recurrent", delta(fused_recurrent_gated_delta_rule), delta_inputs(), backward=False,
               keep32=(5,))

    def gla(op):
        def run(impl, q, k, v, gate, h0):
            return _pair(op(q, k, v, gate, initial_state=h0, output_final_state=True, chunk_size=C, impl=impl))
        return run

    def gla_inputs(per_key=True):
        gate = _rand(g, B, T, H, *((D,) if per_key else ()), lo=-0.2, hi=0.0)
        return [*_qkv(g, s, D), gate, _randn(g, B, H, D, D, scale=0.1)]

    yield Case("gla", "chunk", gla(chunk_gla), gla_inputs(), keep32=(4,))
    yield Case("gla", "chunk_simple", gla(chunk_simple_gla), gla_inputs(per_key=False), keep32=(4,))
    yield Case("gla", "recurrent", gla(fused_recurrent_gla), gla_inputs(), backward=False, keep32=(4,))

    start = torch.tensor([0, 5][:B] + [0] * max(0, B - 2))

    def titans_lin(impl, q, k, v, theta, log_eta, log_gamma, *state):
        return _pair(titans_linear(q, k, v, theta, log_eta, log_gamma, state, start.to(q.device), 16, impl=impl))

    for channel in (False, True):
        ins = [*_qkv(g, s, D), _rand(g, B, T, H, hi=0.5), _rand(g, B, T, H, lo=0.05).log(),
               _rand(g, B, T, H, *((D,) if channel else ()), lo=0.5).log(),
               *(_randn(g, B, H, D, D, scale=0.3) for _ in range(3))]
        yield Case("titans_linear", "channel" if channel else "head", titans_lin, ins)

    E = 4 * D

    def titans_m(impl, q, k, v, th1, th2, log_eta, log_gamma, *state):
        return _pair(titans_mlp(q, k, v, th1, th2, log_eta, log_gamma, state, start.to(q.device), 16, impl=impl))

    for train in (True, False):
        a1, a2 = _randn(g, B, H, E, D, scale=E ** -0.5), _randn(g, B, H, D, E, scale=D ** -0.5)
        gates = [_rand(g, B, T, H, hi=0.5), _rand(g, B, T, H, hi=0.5), _rand(g, B, T, H, lo=0.05).log(),
                 _rand(g, B, T, H, lo=0.5).log()]
        # (A1_base, A1, S1, A2_base, A2, S2): a gradient base other than the weights, as mid-chunk
        state = [a1 + _randn(g, *a1.shape, scale=0.05), a1, _randn(g, *a1.shape, scale=0.1),
                 a2 + _randn(g, *a2.shape, scale=0.05), a2, _randn(g, *a2.shape, scale=0.1)]
        ins = [*_qkv(g, s, D), *gates, *state]
        # inference (no grad) runs the kernel's two-slot state path, training stores every chunk's state
        yield Case("titans_mlp", "train" if train else "infer", titans_m, ins, backward=train)

    # S4D: D is the state size N; rows R = 2 * RZ channels; length T * 4 (convolution kernels are long)
    L, RZ = 4 * T, 2 * H

    def vand(impl, z_re, z_im, w_re, w_im):
        return (vandermonde(z_re, z_im, w_re, w_im, L, 1, impl=impl),)

    z = [_rand(g, RZ, D, lo=-0.2, hi=-1e-3), _randn(g, RZ, D)]
    yield Case("ssm", "vandermonde", vand, [*z, _randn(g, 2 * RZ, D), _randn(g, 2 * RZ, D)], n_low=0,
               dtypes=("fp32",))

    def vand_t(impl, z_re, z_im, u):
        return vandermonde_transpose(z_re, z_im, u, impl=impl)

    z = [_rand(g, RZ, D, lo=-0.2, hi=-1e-3), _randn(g, RZ, D)]
    yield Case("ssm", "vandermonde_T", vand_t, [*z, _randn(g, 2 * RZ, L)], n_low=0, dtypes=("fp32",))

    # exact top-k over N chunk keys (a quarter of them invalid), k = 16
    N = 8 * T

    def topk(impl, q, keys, valid):
        return chunk_topk(q, keys, 16 if N >= 16 else 3, valid=valid > 0, impl=impl)

    valid = (torch.rand(B, N, generator=g) > 0.25).double()
    yield Case("retrieval", "topk", topk, [_randn(g, B, H, T, D), _randn(g, B, H, N, D), valid], n_low=2,
               backward=False, ref_dtype=torch.float32, compare="topk")


# ---------------------------------------------------------------------------------------------------------- running


@contextlib.contextmanager
def nan_poisoned_allocations(package: str = "memzoo.kernels") -> Iterator[None]:
    """Tensors that modules of ``package`` allocate with ``empty``/``empty_like``/``new_empty`` start as NaN."""
    saved = {(torch, "empty"): torch.empty, (torch, "empty_like"): torch.empty_like,
             (torch.Tensor, "new_empty"): torch.Tensor.new_empty}

    def wrap(fn):
        def poisoned(*args, **kwargs):
            t = fn(*args, **kwargs)
            if sys._getframe(1).f_globals.get("__name__", "").startswith(package) and t.is_floating_point():
                t.fill_(float("nan"))
            return t
        return poisoned

    for (owner, name), fn in saved.items():
        setattr(owner, name, wrap(fn))
    try:
        yield
    finally:
        for (owner, name), fn in saved.items():
            setattr(owner, name, fn)


def _forward_backward(case: Case, impl: str, xs: list[Tensor], cot_seed: int) -> list[tuple[str, Tensor]]:
    """The op's tensors, then (with ``case.backward``) the gradients of sum(out * random cotangent) for every
    floating input."""
    leaves = [x.clone().requires_grad_(case.backward and x.is_floating_point()) for x in xs]
    with torch.set_grad_enabled(case.backward):
        outs = case.run(impl, *leaves)
    named = [(f"out{i}", o) for i, o in enumerate(outs) if o is not None]
    if case.backward:
        g = torch.Generator().manual_seed(cot_seed)
        cots = [torch.randn(o.shape, generator=g, dtype=torch.float64) for _, o in named]
        loss = sum((o.double() * c.to(o.device)).sum() for (_, o), c in zip(named, cots))
        want = [x for x in leaves if x.requires_grad]
        grads = torch.autograd.grad(loss, want, allow_unused=True)
        names = [f"d_in{i}" for i, x in enumerate(leaves) if x.requires_grad]
        named += [(n, gr) for n, gr in zip(names, grads) if gr is not None]
    return [(n, t.detach()) for n, t in named]


def _topk_errors(q: Tensor, keys: Tensor, valid: Tensor, tri: list, ref: list) -> dict[str, float]:
    """Both searches must pick chunks of equal exact score (ties may pick different chunks) and the same scores."""
    exact = torch.einsum("bhtd,bhnd->bhtn", q.double(), keys.double())
    exact = exact.masked_fill(~(valid > 0)[:, None, None, :], float("-inf"))
    picked = [exact.gather(-1, idx[1].clamp_min(0)).masked_fill(idx[1] < 0, float("-inf")) for idx in (tri[1], ref[1])]
    finite = torch.isfinite(picked[1])
    scale = exact[torch.isfinite(exact)].abs().max().clamp_min(1e-12)
    pick_err = float(((picked[0] - picked[1]).abs().masked_fill(~finite, 0)).max() / scale)
    same_inf = bool((torch.isfinite(picked[0]) == finite).all())
    from memzoo.testing import rel_rms

    score_err = rel_rms(tri[0][1].masked_fill(~finite, 0), ref[0][1].masked_fill(~finite, 0))
    return {"picked_score": pick_err if same_inf else float("inf"), "scores": score_err}


def _run_diff(a: Tensor, b: Tensor) -> float:
    """Largest difference between two runs' tensors; NaN or inf where only one run has it counts as inf."""
    if not a.numel():
        return 0.0
    a, b = a.double(), b.double()
    same = (a == b) | (a.isnan() & b.isnan())
    return 0.0 if bool(same.all()) else float((a - b).abs().masked_fill(same, 0).nan_to_num(float("inf")).max())


def check(case: Case, dtype_name: str, D: int, device: str, seed: int) -> Result:
    from memzoo.testing import rel_rms

    res = Result(case.op, case.variant, dtype_name, D, tol=TOL[dtype_name])
    t0 = time.perf_counter()
    try:
        dtype = DTYPES[dtype_name]
        low = [x.to(device=device, dtype=dtype if i < case.n_low else torch.float32) if x.is_floating_point() else
               x.to(device) for i, x in enumerate(case.inputs)]
        # the reference sees the inputs the kernel sees (rounded to dtype), in float64 (or ref_dtype)
        ref_in = [x.to(case.ref_dtype) if x.is_floating_point() and i not in case.keep32 else x
                  for i, x in enumerate(low)]
        ref = _forward_backward(case, "ref", ref_in, seed)
        with nan_poisoned_allocations():
            runs = [_forward_backward(case, "triton", low, seed) for _ in range(2)]
        if device == "cuda":
            torch.cuda.synchronize()
        tri = runs[0]
        if [n for n, _ in tri] != [n for n, _ in ref]:
            raise AssertionError(f"tensors differ: triton {[n for n, _ in tri]} vs ref {[n for n, _ in ref]}")
        res.nonfinite = sum(int((~torch.isfinite(t)).sum()) for n, t in tri if t.is_floating_point()
                            and not (case.compare == "topk" and n == "out0"))
        res.run_diff = max(_run_diff(a, b) for (_, a), (_, b) in zip(runs[0], runs[1]))
        if case.compare == "topk":
            res.errors = _topk_errors(low[0], low[1], low[2], tri, ref)
        else:
            res.errors = {n: rel_rms(a, b) if torch.isfinite(a).all() else float("inf")
                          for (n, a), (_, b) in zip(tri, ref)}
        res.worst, res.err = max(res.errors.items(), key=lambda kv: kv[1])
        ok = res.err <= res.tol and res.nonfinite == 0 and res.run_diff == 0.0
        res.status = "PASS" if ok else "FAIL"
        if res.run_diff:
            res.message = "the two runs on the same inputs differ: race or unwritten memory"
    except Exception as e:  # one broken case must not hide the others
        res.status, res.message = "ERROR", f"{type(e).__name__}: {e}"[:500]
        traceback.print_exc()
    res.seconds = round(time.perf_counter() - t0, 2)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", default="64,128", help="head sizes K = V = D (the S4D state size N for ssm)")
    p.add_argument("--dtypes", default="bf16,fp32", help=f"subset of {list(DTYPES)}")
    p.add_argument("--ops", default="", help="comma-separated subset of gated_delta,gla,titans_linear,titans_mlp,"
                   "ssm,retrieval (default all)")
    p.add_argument("--tiny", action="store_true", help=f"shape {TINY_SHAPE} (the default on a CPU)")
    p.add_argument("--seed", type=int, default=None, help="input seed (default: fresh, from the clock)")
    p.add_argument("--json", default=None, help="write every case's numbers here")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--jobs", type=int, default=1, help=f"run the op groups {OP_GROUPS} in up to this many processes "
                   "(Triton compiles on one core per process); their --json parts are merged")
    p.add_argument("--merge", action="store_true", help="only merge the parts of --json that --jobs left")
    a = p.parse_args(argv)
    if a.merge:
        return merge(a.json)
    if a.jobs > 1 and not a.list:
        return run_jobs(a)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = TINY_SHAPE if a.tiny or device == "cpu" else GPU_SHAPE
    seed = a.seed if a.seed is not None else time.time_ns() % 2**31
    dims = [int(d) for d in a.dims.split(",")]
    dtypes = a.dtypes.split(",")
    ops = set(filter(None, a.ops.split(",")))
    for name in dtypes:
        if name not in DTYPES:
            p.error(f"--dtypes: {name!r} is not one of {list(DTYPES)}")
    # benchmarks/ on the path here, not at import: its kernels.py would shadow the `kernels` package for importers
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import environment

    env = environment() if a.json else {}
    print(f"device={device} shape={shape} seed={seed}", flush=True)
    results = []
    for D in dims:
        for dtype_name in dtypes:
            g = torch.Generator().manual_seed(seed + D)   # fresh inputs per head size; the same for both dtypes
            for case in cases(shape, D, g):
                if (ops and case.op not in ops) or dtype_name not in case.dtypes:
                    continue
                if a.list:
                    print(f"{case.op:14s} {case.variant:14s} {dtype_name} D={D} backward={case.backward}")
                    continue
                r = check(case, dtype_name, D, device, seed)
                results.append(r)
                print(f"{r.status:5s} {r.op:14s} {r.variant:14s} {r.dtype:4s} D={r.D:<4d} err={_f(r.err)} "
                      f"({r.worst}) nonfinite={r.nonfinite} run_diff={_f(r.run_diff)} {r.seconds}s {r.message}",
                      flush=True)
                if a.json:   # after every case: a run stopped by its timeout keeps what it measured
                    payload = {**env, "seed": seed, "shape": vars(shape), "tol": TOL,
                               "results": [vars(r) for r in results]}
                    with open(a.json, "w") as f:
                        json.dump(payload, f, indent=1, default=str)
    if a.list:
        return 0
    bad = [r for r in results if r.status != "PASS"]
    print(f"gpu_check: {len(results) - len(bad)}/{len(results)} cases pass", flush=True)
    return 1 if bad else 0


OP_GROUPS = ["gated_delta", "gla", "titans_linear", "titans_mlp", "ssm,retrieval"]


def run_jobs(a) -> int:
    """One process per op group (at most ``--jobs`` at once); the same seed everywhere; the JSON parts merged."""
    seed = a.seed if a.seed is not None else time.time_ns() % 2**31
    wanted = set(filter(None, a.ops.split(",")))
    groups = [grp for grp in OP_GROUPS if not wanted or set(grp.split(",")) & wanted]
    base = [sys.executable, str(Path(__file__).resolve()), "--dims", a.dims, "--dtypes", a.dtypes, "--seed", str(seed)]
    base += ["--tiny"] if a.tiny else []
    for stale in Path(a.json).parent.glob(Path(a.json).name + ".part*") if a.json else []:
        stale.unlink()
    pending, running, rc = list(enumerate(groups)), [], 0
    while pending or running:
        while pending and len(running) < a.jobs:
            i, grp = pending.pop(0)
            ops = ",".join(sorted(set(grp.split(",")) & wanted)) if wanted else grp
            out = ["--json", f"{a.json}.part{i}"] if a.json else []
            running.append(subprocess.Popen(base + ["--ops", ops] + out))
        time.sleep(0.5)
        for proc in [q for q in running if q.poll() is not None]:
            running.remove(proc)
            rc = max(rc, proc.returncode)
    return max(rc, merge(a.json)) if a.json else rc


def merge(path: str | None) -> int:
    """Merge ``path.part*`` into ``path``; print the pass count; 1 when a case did not pass (or none ran)."""
    if not path:
        raise SystemExit("--merge needs --json FILE")
    parts = sorted(Path(path).parent.glob(Path(path).name + ".part*"))
    loaded = [json.loads(q.read_text()) for q in parts]
    if not loaded:
        print(f"gpu_check: no parts {path}.part* to merge")
        return 1
    results = [r for part in loaded for r in part["results"]]
    Path(path).write_text(json.dumps({**loaded[0], "results": results}, indent=1, default=str))
    bad = [r for r in results if r["status"] != "PASS"]
    print(f"gpu_check: {len(results) - len(bad)}/{len(results)} cases pass (merged {len(parts)} parts)")
    return 1 if bad or not results else 0


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


if __name__ == "__main__":
    sys.exit(main())
