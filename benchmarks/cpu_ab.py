"""Two revisions of memzoo's CPU paths, interleaved A/B: forward and forward+backward time of the public ops.

    python benchmarks/cpu_ab.py c3804ee^ main                       # the defaults below
    python benchmarks/cpu_ab.py A B --ops gla --shapes 2,2048,4,64 --rounds 7 --reps 3

Each revision's ``memzoo/`` is exported (``git archive``) to a temporary folder.  First both revisions run every op
once on a small input (``--check-shape``) and must agree on outputs, final states and every input gradient to
``--tol``; then, for each round and each (op, shape), one subprocess per revision imports that revision's ``memzoo``,
calls the public op as a CPU user does (``impl="auto"``, fp32, one thread, ``OMP_NUM_THREADS=1``) and reports the
median of ``--reps`` calls after one warm-up, in process CPU time (``time.process_time``, the main number) and wall
time.  Rounds alternate the order (A B, B A, A B, ...), so slow drifts of a shared machine's load hit both sides
alike; the table gives the median over rounds of each side and the median over rounds of the paired ratio B / A
(above 1: B is slower) with its range.  Results: ``benchmarks/results/cpu-ab[-pinned-malloc]-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import clock_ms, print_table, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# op name -> (the public function as (module, name), per-channel log-decay)
OPS = {
    "gated_delta": ("memzoo.kernels.gated_delta", "chunk_gated_delta_rule"),
    "gla": ("memzoo.kernels.gla", "chunk_gla"),
    "titans_linear_head": ("memzoo.kernels.titans", "titans_linear"),
    "titans_linear_channel": ("memzoo.kernels.titans", "titans_linear"),
}
DEFAULT_SHAPES = ("2,2048,4,64", "2,256,4,64")
# What each worker reads around the same calls: process CPU time (user + system: the main number), wall time, user
# time alone, and minor page faults.  The system share is mostly page faults of fresh allocations, which depend on
# the heap's history (glibc's adaptive mmap threshold: what the process imported and freed before), not on the op.
# Faults are read as thousands so that clock_ms's seconds-to-ms factor gives a count.
CLOCKS = {
    "cpu_ms": time.process_time,
    "wall_ms": time.perf_counter,
    "user_ms": lambda: resource.getrusage(resource.RUSAGE_SELF).ru_utime,
    "faults": lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt / 1e3,
}
RATIOS = ("cpu_ms", "wall_ms", "user_ms")
# glibc's mmap and trim thresholds fixed (--pin-malloc): large buffers stay in the heap and are reused, so the
# page-fault share no longer depends on what each revision imports.
PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2 ** 30), "MALLOC_TRIM_THRESHOLD_": str(2 ** 32)}


# ---------------------------------------------------------------- worker side (runs in a revision's subprocess)

def make_inputs(op: str, B: int, T: int, H: int, D: int) -> tuple[dict, tuple]:
    """Deterministic fp32 inputs of ``op``: (differentiable tensors by name, fixed extra positional args)."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    q, k, v = rnd(B, T, H, D), F.normalize(rnd(B, T, H, D), dim=-1), rnd(B, T, H, D)
    if op == "gated_delta":
        return {"q": q, "k": k, "v": v, "g": F.logsigmoid(rnd(B, T, H)), "beta": torch.sigmoid(rnd(B, T, H))}, ()
    if op == "gla":
        return {"q": q, "k": k, "v": v, "g": F.logsigmoid(rnd(B, T, H, D)) / 16}, ()
    # Titans linear memory, as the layer calls it: normalised q, k; per-head (or per-key-channel) decay.
    gamma_shape = (B, T, H, D) if op == "titans_linear_channel" else (B, T, H)
    x = {"q": F.normalize(q, dim=-1), "k": k, "v": v, "theta": 0.1 * torch.sigmoid(rnd(B, T, H)),
         "log_eta": F.logsigmoid(rnd(B, T, H) + 2), "log_gamma": F.logsigmoid(rnd(*gamma_shape) + 4)}
    state = tuple(0.01 * rnd(B, H, D, D) for _ in range(3))
    return x, (state, torch.zeros(B, dtype=torch.int64), 16)


def op_call(op: str, B: int, T: int, H: int, D: int):
    """(fn(leaves) -> list of result tensors, input tensors) for the ``memzoo`` on ``sys.path``."""
    import importlib

    module, name = OPS[op]
    fn = getattr(importlib.import_module(module), name)
    x, extra = make_inputs(op, B, T, H, D)
    if op.startswith("titans"):
        def run(t):
            y, state = fn(*t.values(), *extra)
            return [y, *state]
    else:
        def run(t):
            y, state = fn(*t.values(), output_final_state=True)
            return [y, state]
    return run, x


def worker(args: argparse.Namespace) -> None:
    tree = Path(args.tree).resolve()
    sys.path.insert(0, str(tree))
    import memzoo

    if Path(memzoo.__file__).resolve().parents[1] != tree:
        raise RuntimeError(f"imported memzoo from {memzoo.__file__}, expected the tree {tree}")
    torch.set_num_threads(1)
    B, T, H, D = args.shape
    run, x = op_call(args.op, B, T, H, D)
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    outs = run(leaves)
    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(outs)]

    def fwd_bwd():
        for t in leaves.values():
            t.grad = None
        sum((o.float() * w).sum() for o, w in zip(run(leaves), weights)).backward()

    if args.check:
        fwd_bwd()
        torch.save({"outputs": [o.detach() for o in run(leaves)],
                    "grads": {n: t.grad for n, t in leaves.items()}}, args.check)
        return
    clocks = tuple(CLOCKS.values())
    with torch.no_grad():
        fwd = clock_ms(lambda: run(x), clocks, reps=args.reps)
    fwdbwd = clock_ms(fwd_bwd, clocks, reps=args.reps)
    result = {f"{stage}_{name}": t for stage, ts in (("fwd", fwd), ("fwdbwd", fwdbwd)) for name, t in zip(CLOCKS, ts)}
    print(json.dumps({**result, "threads": torch.get_num_threads()}))


# ---------------------------------------------------------------- driver side

def resolve(rev: str) -> str:
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"revision {rev!r} is not a commit of {REPO}")
    return out.stdout.strip()


def export(sha: str, root: Path) -> Path:
    """The revision's ``memzoo/`` package, extracted under ``root/<sha>``."""
    tar = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", sha, "memzoo"], capture_output=True,
                         check=True).stdout
    dest = root / sha
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(dest, filter="data")
    return dest


def spawn(tree: Path, op: str, shape: tuple[int, ...], reps: int, check: Path | None = None,
          pin_malloc: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MEMZOO_KERNEL_IMPL", "TRITON_INTERPRET", "PYTHONPATH")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    if pin_malloc:
        env.update(PINNED_MALLOC)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--tree", str(tree), "--op", op,
           "--shape", ",".join(map(str, shape)), "--reps", str(reps)]
    if check is not None:
        cmd += ["--check", str(check)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
    if out.returncode:
        raise RuntimeError(f"{op} {shape} in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]) if check is None else {}


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(1, max |b|)."""
    return float((a.double() - b.double()).abs().max() / max(1.0, float(b.double().abs().max())))


def check_agree(trees: list[Path], ops: list[str], shape: tuple[int, ...], tol: float, tmp: Path) -> dict:
    """Max relative error between the revisions on every output and input gradient, per op; raise above ``tol``."""
    errs = {}
    for op in ops:
        files = [tmp / f"{op}-{i}.pt" for i in range(2)]
        for tree, f in zip(trees, files):
            spawn(tree, op, shape, 1, check=f)
        a, b = (torch.load(f) for f in files)
        pairs = list(zip(a["outputs"], b["outputs"])) + [(a["grads"][n], b["grads"][n]) for n in b["grads"]]
        if len(a["outputs"]) != len(b["outputs"]) or a["grads"].keys() != b["grads"].keys():
            raise SystemExit(f"{op}: the revisions return different results (count or names)")
        errs[op] = max(max_rel_err(x, y) for x, y in pairs)
        print(f"  check {op} at {shape}: max rel err {errs[op]:.2e}", flush=True)
        if not errs[op] <= tol:
            raise SystemExit(f"{op}: the revisions disagree (max rel err {errs[op]:.2e} > --tol {tol:g})")
    return errs


def summarise(samples: dict) -> list[dict]:
    rows = []
    for (op, shape), (a, b) in samples.items():
        row = {"op": op, "shape": ",".join(map(str, shape))}
        for metric in (f"{stage}_{name}" for stage in ("fwd", "fwdbwd") for name in CLOCKS):
            row[f"A_{metric}"] = statistics.median(s[metric] for s in a)
            row[f"B_{metric}"] = statistics.median(s[metric] for s in b)
        for metric in (f"{stage}_{name}" for stage in ("fwd", "fwdbwd") for name in RATIOS):
            ratios = [y[metric] / x[metric] for x, y in zip(a, b)]
            stem = metric[:-3]
            row[f"B/A_{stem}"] = statistics.median(ratios)
            row[f"B/A_{stem}_range"] = [min(ratios), max(ratios)]
        rows.append(row)
    return rows


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"a shape is B,T,H,D of positive ints, got {text!r}")
    return shape


def positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("revisions", nargs="*", metavar="REV", help="two git revisions, A (before) and B (after)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {tuple(OPS)}")
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in DEFAULT_SHAPES],
                   metavar="B,T,H,D", help=f"timed shapes (default {' '.join(DEFAULT_SHAPES)})")
    p.add_argument("--check-shape", type=parse_shape, default=parse_shape("1,100,2,32"), metavar="B,T,H,D",
                   help="the shape of the agreement check (default 1,100,2,32)")
    p.add_argument("--tol", type=float, default=1e-5, help="max relative disagreement of the revisions")
    p.add_argument("--rounds", type=positive, default=5, help="A/B rounds (one subprocess per revision each)")
    p.add_argument("--reps", type=positive, default=3, help="timed calls per subprocess (median), after 1 warm-up")
    p.add_argument("--pin-malloc", action="store_true",
                   help="fix glibc's mmap/trim thresholds in the workers (page faults independent of the imports)")
    p.add_argument("--note", default="", help="free text stored in the result (e.g. the machine's load)")
    p.add_argument("--no-save", action="store_true", help="print only; write no result file")
    # worker mode (internal): time one op of one tree
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tree", help=argparse.SUPPRESS)
    p.add_argument("--op", help=argparse.SUPPRESS)
    p.add_argument("--shape", type=parse_shape, help=argparse.SUPPRESS)
    p.add_argument("--check", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        if not (args.tree and args.op in OPS and args.shape):
            p.error("--worker needs --tree, --op and --shape")
        return args
    if len(args.revisions) != 2:
        p.error(f"give exactly two revisions (A B), got {len(args.revisions)}")
    args.ops = [o for o in args.ops.split(",") if o]
    if not args.ops or (bad := [o for o in args.ops if o not in OPS]):
        p.error(f"--ops: unknown {bad if args.ops else 'empty list'}; choose from {tuple(OPS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    torch.set_num_threads(1)
    shas = [resolve(r) for r in args.revisions]
    load_before = os.getloadavg()
    samples: dict = {}
    with tempfile.TemporaryDirectory(prefix="memzoo-cpu-ab-") as tmp:
        tmp = Path(tmp)
        trees = [export(s, tmp / str(i)) for i, s in enumerate(shas)]
        print(f"A = {args.revisions[0]} ({shas[0][:10]}), B = {args.revisions[1]} ({shas[1][:10]}); "
              f"1 thread, {args.rounds} rounds x {args.reps} reps", flush=True)
        errs = check_agree(trees, args.ops, args.check_shape, args.tol, tmp)
        for r in range(args.rounds):
            order = (0, 1) if r % 2 == 0 else (1, 0)
            for shape in args.shapes:
                for op in args.ops:
                    pair = samples.setdefault((op, shape), ([], []))
                    for i in order:
                        pair[i].append(spawn(trees[i], op, shape, args.reps, pin_malloc=args.pin_malloc))
                    a, b = pair[0][-1], pair[1][-1]
                    print(f"  round {r + 1}/{args.rounds} {op} {shape}: fwd+bwd cpu A {a['fwdbwd_cpu_ms']:.1f} ms, "
                          f"B {b['fwdbwd_cpu_ms']:.1f} ms", flush=True)
    rows = summarise(samples)
    print_table(rows, ["op", "shape", "A_fwd_cpu_ms", "B_fwd_cpu_ms", "B/A_fwd_cpu", "A_fwdbwd_cpu_ms",
                       "B_fwdbwd_cpu_ms", "B/A_fwdbwd_cpu", "B/A_fwd_wall", "B/A_fwdbwd_wall", "B/A_fwd_user",
                       "B/A_fwdbwd_user", "A_fwd_faults", "B_fwd_faults"])
    payload = {
        "mode": "cpu-ab", "dtype": "float32", "threads": 1,
        "A": {"rev": args.revisions[0], "commit": shas[0]}, "B": {"rev": args.revisions[1], "commit": shas[1]},
        "rounds": args.rounds, "reps": args.reps, "malloc": PINNED_MALLOC if args.pin_malloc else "default",
        "check_shape": list(args.check_shape),
        "check_max_rel_err": errs, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "rows": rows,
        "samples": [{"op": op, "shape": list(shape), "A": a, "B": b} for (op, shape), (a, b) in samples.items()],
        "note": ("B/A = median over rounds of the paired ratio B time / A time (>1: B slower), range = min..max "
                 "over rounds; *_cpu_ms = process CPU time (user + system), *_wall_ms = wall time, "
                 "*_user_ms = user CPU time, *_faults = minor page faults per call; medians over rounds. "
                 + args.note).strip(),
    }
    if not args.no_save:
        print(f"wrote {write_result('cpu-ab-pinned-malloc' if args.pin_malloc else 'cpu-ab', payload)}")


if __name__ == "__main__":
    main()
