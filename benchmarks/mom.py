"""Mixture-of-Memories layer: forward+backward and decode latency, with ratios against a peer from the same run.

GPU (default when CUDA is present), bf16, the paper's 340M layer (d_model 1024, 4 heads of 256, M=4, k=2,
shared memory, conv 4) at T=2048 and 8192: our varlen path vs fla's ``MomAttention`` when it imports.
    python benchmarks/mom.py
CPU (``--cpu``): our varlen path vs our dense-masked path at a small shape (fp32, the PyTorch references).
    python benchmarks/mom.py --cpu --cpu-shape 2,1024,256,4

Ratios are peer_ms / ours_ms (above 1.0: the varlen path is faster).  Results go to
``benchmarks/results/mom[-cpu]-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, time_ms, write_result  # noqa: E402
from roofline import vs_floor  # noqa: E402

from memzoo.models import MixtureOfMemories  # noqa: E402

PAPER = {"d_model": 1024, "n_heads": 4, "d_head": 256, "expand_v": 1.0, "num_memories": 4, "topk": 2}


def fwd_bwd(layer: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        y = y[0] if isinstance(y, tuple) else y
        y.float().square().mean().backward()

    return run


def decode(layer: MixtureOfMemories, x: torch.Tensor, steps: int) -> Callable[[], None]:
    state = layer.init_state(x.shape[0], device=x.device, dtype=x.dtype)

    @torch.no_grad()
    def run() -> None:
        s = state
        for t in range(steps):
            _, s = layer.step(x[:, t], s)

    return run


def fla_layer(device: str, dtype: torch.dtype) -> tuple[torch.nn.Module | None, str]:
    """fla's MomAttention at the paper's shape, or None and the reason it is unavailable."""
    try:
        from fla.layers import MomAttention

        layer = MomAttention(hidden_size=1024, head_dim=256, num_heads=4, expand_v=1, num_memories=4, topk=2,
                             shared_mem=True, use_short_conv=True, conv_size=4, mode="chunk")
        return layer.to(device, dtype), "ok"
    except Exception as e:  # an import error or a changed constructor both mean "no peer in this run"
        return None, f"{type(e).__name__}: {e}"


def gpu_rows(Ts: list[int], reps: int) -> tuple[list[dict], str]:
    device, dtype = "cuda", torch.bfloat16
    ours = MixtureOfMemories(**PAPER).to(device, dtype)
    peer, peer_status = fla_layer(device, dtype)
    rows = []
    for T in Ts:
        x = torch.randn(1, T, 1024, device=device, dtype=dtype, requires_grad=True)
        row = {"T": T, "ours_fwdbwd_ms": time_ms(fwd_bwd(ours, x), cuda=True),
               "ours_decode_ms_per_token": time_ms(decode(ours, x, 32), cuda=True) / 32}
        # measured / H100 roofline floor of the layer (benchmarks/roofline.py)
        row["ours/floor"] = vs_floor(row["ours_fwdbwd_ms"], "mom", B=1, T=T)
        if peer is not None:
            try:
                row["fla_fwdbwd_ms"] = time_ms(fwd_bwd(peer, x), cuda=True)
                row["fwdbwd_ratio"] = row["fla_fwdbwd_ms"] / row["ours_fwdbwd_ms"]
            except Exception as e:  # fla's MoM forward is known-broken at some commits (its own tests skip it)
                row["fla_error"] = f"{type(e).__name__}: {e}"[:200]
        rows.append(row)
    return rows, peer_status


def cpu_rows(B: int, T: int, D: int, H: int, reps: int) -> list[dict]:
    torch.manual_seed(0)
    rows = []
    for M, k in ((4, 2), (8, 2), (4, 4)):
        varlen = MixtureOfMemories(d_model=D, n_heads=H, num_memories=M, topk=k)
        dense = MixtureOfMemories(d_model=D, n_heads=H, num_memories=M, topk=k, path="dense")
        dense.load_state_dict(varlen.state_dict())
        x = torch.randn(B, T, D, requires_grad=True)
        row = {"M": M, "k": k, "shape": f"{B}x{T}x{D} H={H}"}
        for name, layer in (("varlen", varlen), ("dense", dense)):
            with torch.no_grad():
                row[f"{name}_fwd_ms"] = time_ms(lambda layer=layer, x=x: layer(x), cuda=False, reps=reps)
            row[f"{name}_fwdbwd_ms"] = time_ms(fwd_bwd(layer, x), cuda=False, reps=reps)
        row["fwd_ratio"] = row["dense_fwd_ms"] / row["varlen_fwd_ms"]
        row["fwdbwd_ratio"] = row["dense_fwdbwd_ms"] / row["varlen_fwdbwd_ms"]
        row["decode_ms_per_token"] = time_ms(decode(varlen, x.detach(), 16), cuda=False, reps=reps) / 16
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="varlen vs dense-masked path on the CPU")
    p.add_argument("--cpu-shape", default="2,1024,256,4", help="B,T,D,H for --cpu")
    p.add_argument("--T", default="2048,8192", help="sequence lengths on the GPU")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions on CPU")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the CI box is shared)")
    p.add_argument("--no-save", action="store_true", help="print only; write no result file")
    args = p.parse_args()
    cpu = args.cpu or not torch.cuda.is_available()
    if cpu:
        torch.set_num_threads(args.threads)
        B, T, D, H = (int(v) for v in args.cpu_shape.split(","))
        rows = cpu_rows(B, T, D, H, args.reps)
        print_table(rows, ["M", "k", "shape", "varlen_fwd_ms", "dense_fwd_ms", "fwd_ratio", "varlen_fwdbwd_ms",
                           "dense_fwdbwd_ms", "fwdbwd_ratio", "decode_ms_per_token"])
        payload = {"mode": "cpu", "peer": "dense-masked path (ratio = dense_ms / varlen_ms)", "rows": rows}
    else:
        rows, status = gpu_rows([int(t) for t in args.T.split(",")], args.reps)
        print(f"fla MomAttention: {status}")
        print_table(rows, ["T", "ours_fwdbwd_ms", "ours/floor", "fla_fwdbwd_ms", "fwdbwd_ratio",
                           "ours_decode_ms_per_token"])
        payload = {"mode": "gpu", "shape": PAPER, "peer": f"fla MomAttention ({status})", "rows": rows}
    if not args.no_save:
        print(f"wrote {write_result('mom-cpu' if cpu else 'mom', payload)}")


if __name__ == "__main__":
    main()
