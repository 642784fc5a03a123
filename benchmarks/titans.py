"""Titans memory ops against their peers: forward and forward+backward times, ratios and peak memory.

GPU (default when CUDA is present), bf16 inputs, T in {2048, 8192}, 16 heads of 64 (d_model 1024):
    python benchmarks/titans.py
  ours: Triton linear memory, chunked MLP memory; peers: our gated-delta Triton kernel at the same shape,
  fla's naive Titans reference and titans-pytorch's NeuralMemory (each only if installed).
CPU (``--cpu``): our chunked references vs our token-loop specification and fla's naive chunked reference:
    python benchmarks/titans.py --cpu --cpu-shape 2,512,4,64
Layers (``--layers``, CPU or GPU): one default ``titans`` layer (MLP memory) forward+backward against a
``gated_delta`` layer of the same d_model and heads, both in this run, median of ``--reps``:
    python benchmarks/titans.py --layers --T 4096 --reps 5

Ratios are peer_ms / ours_ms (above 1.0: memzoo is faster).  Results go to
``benchmarks/results/titans-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, time_ms, write_result  # noqa: E402
from roofline import vs_floor  # noqa: E402

from memzoo.kernels.gated_delta import chunk_gated_delta_rule  # noqa: E402
from memzoo.kernels.titans import (  # noqa: E402
    titans_linear,
    titans_linear_step_ref,
    titans_mlp,
)


def inputs(B, T, H, D, device, dtype, channel=False, expansion=4):
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device=device, generator=g)

    q, k = F.normalize(rnd(B, T, H, D), dim=-1).to(dtype), F.normalize(rnd(B, T, H, D), dim=-1).to(dtype)
    v = rnd(B, T, H, D).to(dtype)
    theta = 0.1 * torch.sigmoid(rnd(B, T, H))
    log_eta = F.logsigmoid(rnd(B, T, H) + 2)
    log_gamma = F.logsigmoid(rnd(B, T, H, D) + 4 if channel else rnd(B, T, H) + 4)
    lin = tuple(torch.zeros(B, H, D, D, device=device) for _ in range(3))
    a1, a2 = 0.1 * rnd(B, H, expansion * D, D), 0.1 * rnd(B, H, D, expansion * D)
    mlp = (a1, a1.clone(), torch.zeros_like(a1), a2, a2.clone(), torch.zeros_like(a2))
    return [q, k, v, theta, log_eta, log_gamma], lin, mlp


def run(fn, xs, states, backward):
    leaves = [x.detach().requires_grad_() for x in xs] if backward else xs
    y, st = fn(leaves, states)
    if backward:
        (y.float().square().sum() + sum(s.sum() for s in st)).backward()


def peak_mb(fn, cuda):
    if not cuda:
        return None
    torch.cuda.reset_peak_memory_stats()
    fn()
    return torch.cuda.max_memory_allocated() / 2 ** 20


def bench_case(name, fn, xs, states, cuda, reps, with_bwd=True):
    row = {"op": name, "fwd_ms": time_ms(lambda: run(fn, xs, states, False), cuda=cuda, reps=reps)}
    if with_bwd:
        row["fwdbwd_ms"] = time_ms(lambda: run(fn, xs, states, True), cuda=cuda, reps=reps)
        row["peak_mb"] = peak_mb(lambda: run(fn, xs, states, True), cuda)
    return row


def fla_naive(B, T, H, D, device):
    """fla's naive chunked Titans (it adds an LN + residual inside the memory); None if fla is missing."""
    try:
        from fla.ops.titans.naive import chunk_titans_linear_ref
    except Exception:  # an optional peer that fails to import is simply absent from the record
        return None
    w, b = torch.ones(H, D, device=device), torch.zeros(H, D, device=device)

    def fn(xs, _):
        q, k, v, theta, log_eta, log_gamma = xs
        gates = [x.float()[..., None] for x in (theta, 1 - log_gamma.exp(), log_eta.exp())]
        o, st = chunk_titans_linear_ref(q.float(), k.float(), v.float(), w, b, *gates, chunk_size=16,
                                        output_final_state=True)
        return o, (st,)

    return fn


def cpu(shape, reps):
    B, T, H, D = shape
    torch.set_num_threads(1)
    xs, lin, mlp = inputs(B, T, H, D, "cpu", torch.float32)
    xs_c, _, _ = inputs(B, T, H, D, "cpu", torch.float32, channel=True)
    sp = torch.zeros(B, dtype=torch.int64)

    def ours(xs_, st):
        return titans_linear(*xs_, st, sp, 16)

    def ours_mlp(xs_, st):
        q, k, v, theta, log_eta, log_gamma = xs_
        return titans_mlp(q, k, v, theta, theta, log_eta, log_gamma, st, sp, 16)

    def step(xs_, st):
        return titans_linear_step_ref(*xs_, st, sp, 16)

    rows = [bench_case("linear chunked (head alpha)", ours, xs, lin, False, reps),
            bench_case("linear chunked (channel alpha)", ours, xs_c, lin, False, reps),
            bench_case("mlp chunked (depth 2, E=4D)", ours_mlp, xs, mlp, False, reps)]
    step_row = bench_case("linear token loop (spec)", step, xs, lin, False, 1, with_bwd=False)
    rows.append(step_row)
    naive = fla_naive(B, T, H, D, "cpu")
    if naive is not None:
        try:
            rows.append(bench_case("fla naive chunk_titans_linear_ref", naive, xs, lin, False, reps))
        except Exception as e:  # record why a peer could not run rather than abort the benchmark
            rows.append({"op": "fla naive chunk_titans_linear_ref", "error": repr(e)[:200]})
    rows[0]["speedup_vs_token_loop_fwd"] = step_row["fwd_ms"] / rows[0]["fwd_ms"]
    if "fwd_ms" in rows[-1] and naive is not None:
        rows[0]["speedup_vs_fla_naive_fwd"] = rows[-1]["fwd_ms"] / rows[0]["fwd_ms"]
    return {"mode": "cpu", "shape_BTHD": list(shape), "chunk_size": 16, "rows": rows}


def layers(T, d_model, n_heads, reps, cuda):
    """Forward+backward of one default ``titans`` layer vs one ``gated_delta`` layer, ratio titans / gated_delta."""
    from memzoo.models import build_mixer

    device = "cuda" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(1, T, d_model, device=device)
    rows = []
    for name in ("titans", "gated_delta"):
        layer = build_mixer(name, d_model, {"n_heads": n_heads}).to(device)

        def fwd_bwd(layer=layer):
            y, _ = layer(x.detach().requires_grad_())
            y.square().sum().backward()

        row = {"op": f"{name} layer (d_model {d_model}, {n_heads} heads)", "T": T,
               "fwdbwd_ms": time_ms(fwd_bwd, cuda=cuda, reps=reps)}
        if not cuda:
            # CPU time of this process as well: on a shared machine it moves less with the other load than wall time.
            row["fwdbwd_cpu_ms"] = time_ms(fwd_bwd, cuda=False, reps=reps, clock=time.process_time)
        row["peak_mb"] = peak_mb(fwd_bwd, cuda)
        rows.append(row)
    rows[0]["ratio_vs_gated_delta"] = rows[0]["fwdbwd_ms"] / rows[1]["fwdbwd_ms"]
    if not cuda:
        rows[0]["cpu_ratio_vs_gated_delta"] = rows[0]["fwdbwd_cpu_ms"] / rows[1]["fwdbwd_cpu_ms"]
    return {"mode": "layers-" + device, "reps": reps, "threads": torch.get_num_threads(), "rows": rows}


def gpu(reps):
    rows = []
    for T in (2048, 8192):
        B, H, D = 1, 16, 64
        xs, lin, mlp = inputs(B, T, H, D, "cuda", torch.bfloat16)
        sp = torch.zeros(B, dtype=torch.int64, device="cuda")

        def ours(xs_, st, sp=sp):
            return titans_linear(*xs_, st, sp, 16)

        def ours_mlp(xs_, st, sp=sp):
            q, k, v, theta, log_eta, log_gamma = xs_
            return titans_mlp(q, k, v, theta, theta, log_eta, log_gamma, st, sp, 16)

        def gdn(xs_, _):
            q, k, v, theta, log_eta, log_gamma = xs_
            o, h = chunk_gated_delta_rule(q, k, v, log_gamma, theta, output_final_state=True)
            return o, (h,)

        for name, fn, st, op in (("titans linear (triton)", ours, lin, "titans_linear"),
                                 ("titans mlp (chunked torch)", ours_mlp, mlp, "titans_mlp"),
                                 ("gated delta (triton)", gdn, lin, "gated_delta")):
            row = bench_case(name, fn, xs, st, True, reps)
            row["T"] = T
            # measured / H100 roofline floor (benchmarks/roofline.py), fwd+bwd
            row["vs_floor"] = vs_floor(row["fwdbwd_ms"], op, B=B, T=T, H=H, D=D)
            rows.append(row)
        naive = fla_naive(B, T, H, D, "cuda")
        if naive is not None:
            row = bench_case("fla naive chunk_titans_linear_ref", naive, xs, lin, True, reps)
            row["T"] = T
            rows.append(row)
    return {"mode": "gpu", "note": "titans-pytorch is measured only when installed (not in this environment)",
            "rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="CPU mode (default without CUDA)")
    p.add_argument("--cpu-shape", default="2,512,4,64", help="B,T,H,D for the CPU mode")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--layers", action="store_true", help="titans layer vs gated_delta layer, forward+backward")
    p.add_argument("--T", type=int, default=4096, help="sequence length for --layers")
    p.add_argument("--d-model", type=int, default=256, help="d_model for --layers (heads: --heads)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--note", default=None, help="free text stored in the result (load, baseline numbers)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    if args.layers:
        cuda = torch.cuda.is_available() and not args.cpu
        result = layers(args.T, args.d_model, args.heads, args.reps, cuda)
    elif args.cpu or not torch.cuda.is_available():
        result = cpu(tuple(int(x) for x in args.cpu_shape.split(",")), args.reps)
    else:
        result = gpu(args.reps)
    if args.note:
        result["note"] = args.note
    print_table(result["rows"], ["op", "T", "fwd_ms", "fwdbwd_ms", "vs_floor", "peak_mb", "ratio_vs_gated_delta",
                                 "fwdbwd_cpu_ms", "cpu_ratio_vs_gated_delta", "speedup_vs_token_loop_fwd",
                                 "speedup_vs_fla_naive_fwd", "error"])
    if not args.no_save:
        print(write_result("titans-" + result["mode"], result))


if __name__ == "__main__":
    main()
