"""Chunked-recurrence kernels against their peers: forward and forward+backward times and ratios.

GPU (default when CUDA is present), bf16, at the issue's shapes:
    python benchmarks/kernels.py                       # ours (Triton) vs fla vs SDPA attention
CPU (``--cpu``): our chunked PyTorch reference vs our step reference and fla's naive references:
    python benchmarks/kernels.py --cpu --cpu-shape 2,2048,4,64

Ratios are peer_ms / ours_ms: above 1.0 means memzoo is faster.  Results go to
``benchmarks/results/kernels-<device>-<date>.json`` with device, date, commit and versions.  On the GPU, ``x/floor``
is the measured fwd+bwd time over the H100 roofline floor of ``benchmarks/roofline.py``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, time_ms, write_result  # noqa: E402
from roofline import vs_floor  # noqa: E402

GPU_SHAPES = [(4, 2048, 16, 128), (4, 4096, 16, 128), (1, 16384, 16, 128), (8, 2048, 32, 64)]
OPS = ("gated_delta", "gla")


def make_inputs(op: str, B: int, T: int, H: int, D: int, device: str, dtype: torch.dtype) -> dict:
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device=device, generator=g)

    q, k, v = rnd(B, T, H, D), rnd(B, T, H, D), rnd(B, T, H, D)
    if op == "gated_delta":
        inputs = {"q": q, "k": F.normalize(k, dim=-1), "v": v, "g": F.logsigmoid(rnd(B, T, H)),
                  "beta": torch.sigmoid(rnd(B, T, H))}
    else:
        inputs = {"q": q, "k": k, "v": v, "g": F.logsigmoid(rnd(B, T, H, D)) / 16}
    # Gates stay fp32, as the layers compute them.
    return {n: t.to(dtype) if n in ("q", "k", "v") else t for n, t in inputs.items()}


def memzoo_fns(op: str) -> dict[str, Callable]:
    """name -> fn(**inputs) returning the output tensor."""
    if op == "gated_delta":
        from memzoo.kernels.gated_delta import chunk_gated_delta_rule
        from memzoo.kernels.gated_delta.reference import gated_delta_rule_step_ref

        return {
            "chunk_triton": lambda **x: chunk_gated_delta_rule(**x, impl="triton")[0],
            "chunk_ref": lambda **x: chunk_gated_delta_rule(**x, impl="ref")[0],
            "step_ref": lambda **x: gated_delta_rule_step_ref(**x)[0],
        }
    from memzoo.kernels.gla import chunk_gla
    from memzoo.kernels.gla.reference import gla_step_ref

    return {
        "chunk_triton": lambda **x: chunk_gla(**x, impl="triton")[0],
        "chunk_ref": lambda **x: chunk_gla(**x, impl="ref")[0],
        "step_ref": lambda **x: gla_step_ref(**x)[0],
    }


def fla_fns(op: str, cpu: bool) -> dict[str, Callable]:
    """fla's ops when it imports: the Triton chunk op on GPU, its naive references on CPU."""
    try:
        if op == "gated_delta":
            if cpu:
                from fla.ops.gated_delta_rule.naive import (
                    naive_chunk_gated_delta_rule,
                    naive_recurrent_gated_delta_rule,
                )

                return {
                    "fla_naive_chunk": lambda q, k, v, g, beta: naive_chunk_gated_delta_rule(q, k, v, g, beta)[0],
                    "fla_naive_recurrent": lambda q, k, v, g, beta: naive_recurrent_gated_delta_rule(
                        q, k, v, beta, g)[0],
                }
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule

            return {"fla_chunk": lambda q, k, v, g, beta: chunk_gated_delta_rule(q, k, v, g, beta)[0]}
        if cpu:
            from fla.ops.gla.naive import naive_recurrent_gla

            return {"fla_naive_recurrent": lambda q, k, v, g: naive_recurrent_gla(q, k, v, g)[0]}
        from fla.ops.gla import chunk_gla

        return {"fla_chunk": lambda q, k, v, g: chunk_gla(q, k, v, g)[0]}
    except Exception as e:  # fla is an optional peer; its absence is reported, not fatal
        print(f"  (fla unavailable for {op}: {type(e).__name__}: {e})", flush=True)
        return {}


def attention_fn() -> Callable:
    def sdpa(q, k, v, **_):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True).transpose(1, 2)
    return sdpa


def measure(fn: Callable, inputs: dict, *, cuda: bool, reps: int) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of ``fn`` on ``inputs``."""
    with torch.no_grad():
        fwd = time_ms(lambda: fn(**inputs), cuda=cuda, reps=reps)
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    do = torch.randn_like(fn(**leaves).float())

    def fwd_bwd():
        for t in leaves.values():
            t.grad = None
        (fn(**leaves).float() * do).sum().backward()

    return fwd, time_ms(fwd_bwd, cuda=cuda, reps=reps)


def run_gpu(ops: list[str], shapes: list[tuple[int, ...]]) -> list[dict]:
    rows = []
    for op in ops:
        peers = {**fla_fns(op, cpu=False), "sdpa": attention_fn()}
        ours = memzoo_fns(op)["chunk_triton"]
        for B, T, H, D in shapes:
            x = make_inputs(op, B, T, H, D, "cuda", torch.bfloat16)
            row = {"op": op, "shape": f"{B},{T},{H},{D}"}
            row["ours_fwd"], row["ours_fwdbwd"] = measure(ours, x, cuda=True, reps=1)
            # measured / H100 roofline floor (benchmarks/roofline.py), fwd+bwd
            row["ours/floor"] = vs_floor(row["ours_fwdbwd"], op, B=B, T=T, H=H, D=D)
            for name, fn in peers.items():
                row[f"{name}_fwd"], row[f"{name}_fwdbwd"] = measure(fn, x, cuda=True, reps=1)
                row[f"{name}/ours"] = row[f"{name}_fwdbwd"] / row["ours_fwdbwd"]
            row["sdpa/floor"] = vs_floor(row["sdpa_fwdbwd"], "attention", B=B, T=T, H=H, D=D)
            print(f"  {op} {row['shape']}: ours fwd+bwd {row['ours_fwdbwd']:.3f} ms", flush=True)
            rows.append(row)
    return rows


def run_cpu(ops: list[str], shape: tuple[int, ...], reps: int) -> list[dict]:
    B, T, H, D = shape
    rows = []
    for op in ops:
        x = make_inputs(op, B, T, H, D, "cpu", torch.float32)
        fns = {k: v for k, v in memzoo_fns(op).items() if k != "chunk_triton"}
        fns.update(fla_fns(op, cpu=True))
        times = {}
        for name, fn in fns.items():
            # The step loops take minutes at T=2048: one repetition is enough to read a 10x ratio.
            n = 1 if ("step" in name or "recurrent" in name) else reps
            times[name] = measure(fn, x, cuda=False, reps=n)
            print(f"  {op} {name}: fwd {times[name][0]:.1f} ms, fwd+bwd {times[name][1]:.1f} ms", flush=True)
        ours = times["chunk_ref"][1]
        for name, (fwd, fwdbwd) in times.items():
            rows.append({"op": op, "shape": f"{B},{T},{H},{D}", "impl": name, "fwd_ms": fwd, "fwdbwd_ms": fwdbwd,
                         "fwdbwd_vs_chunk_ref": fwdbwd / ours})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="compare the PyTorch references on the CPU")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    p.add_argument("--cpu-shape", default="2,2048,4,64", help="B,T,H,D for --cpu")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of the chunked paths on CPU")
    p.add_argument("--no-save", action="store_true", help="print only; write no result file")
    args = p.parse_args()
    ops = [o for o in args.ops.split(",") if o]
    if bad := set(ops) - set(OPS):
        p.error(f"--ops: unknown {sorted(bad)}; choose from {OPS}")
    cpu = args.cpu or not torch.cuda.is_available()
    if cpu:
        torch.manual_seed(0)
        shape = tuple(int(s) for s in args.cpu_shape.split(","))
        if len(shape) != 4:
            p.error("--cpu-shape must be B,T,H,D")
        print(f"CPU references at (B,T,H,D)={shape}, {torch.get_num_threads()} threads", flush=True)
        rows = run_cpu(ops, shape, args.reps)
        print_table(rows, ["op", "shape", "impl", "fwd_ms", "fwdbwd_ms", "fwdbwd_vs_chunk_ref"])
        payload = {"mode": "cpu", "dtype": "float32", "rows": rows,
                   "note": "fwdbwd_vs_chunk_ref = impl time / our chunked reference time (>1: ours faster)"}
    else:
        print(f"GPU {torch.cuda.get_device_name()}, bf16", flush=True)
        rows = run_gpu(ops, GPU_SHAPES)
        cols = sorted({c for r in rows for c in r}, key=lambda c: (c not in ("op", "shape"), "/" in c, c))
        print_table(rows, cols)
        payload = {"mode": "gpu", "dtype": "bfloat16", "rows": rows,
                   "note": "peer/ours = peer fwd+bwd ms / our fwd+bwd ms (>1: ours faster)"}
    if not args.no_save:
        print(f"wrote {write_result('kernels-cpu' if cpu else 'kernels', payload)}")


if __name__ == "__main__":
    main()
