"""S4D layer forward+backward: fused Triton kernel generation vs the plain PyTorch Vandermonde.

GPU (default when CUDA is present), fp32 SSM math, at the issue's shapes H=1024, N=64, L in {4096, 16384}:
    python benchmarks/ssm.py
CPU (``--cpu``): the reference paths at small sizes: S4D convolution (PyTorch Vandermonde + FFT), the S4D
recurrent step loop, and LSSL's dense Krylov kernel:
    python benchmarks/ssm.py --cpu

Reported per row: forward+backward milliseconds, peak memory (CUDA allocator on GPU; on CPU the bytes autograd
saves for backward, counted with saved-tensor hooks) and the ratio against the first row of the same shape.
Results go to ``benchmarks/results/ssm-<device>-<date>.json``.
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

from memzoo.models.layers.lssl import LSSL  # noqa: E402
from memzoo.models.layers.s4d import S4D  # noqa: E402

GPU_SHAPES = [(1, 4096, 1024, 64), (1, 16384, 1024, 64)]
CPU_SHAPES = [(2, 1024, 64, 64), (2, 4096, 64, 64)]


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for backward during ``fn()`` (shared storages counted once)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def fwd_bwd(layer: torch.nn.Module, x: torch.Tensor, step: bool = False) -> Callable[[], None]:
    def run():
        layer.zero_grad(set_to_none=True)
        if step:
            state, ys = layer.init_state(x.shape[0], device=x.device), []
            for t in range(x.shape[1]):
                y_t, state = layer.step(x[:, t], state)
                ys.append(y_t)
            y = torch.stack(ys, 1)
        else:
            y, _ = layer(x)
        y.square().mean().backward()

    return run


def measure(name: str, layer: torch.nn.Module, x: torch.Tensor, *, cuda: bool, step: bool = False) -> dict:
    run = fwd_bwd(layer, x, step)
    row = {"path": name, "shape": "x".join(map(str, (*x.shape, layer.config.d_state)))}
    try:
        if cuda:
            run()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run()
            torch.cuda.synchronize()
            row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            row["saved_mib"] = saved_bytes(lambda: fwd_bwd(layer, x, step)()) / 2**20
        row["fwdbwd_ms"] = time_ms(run, cuda=cuda, warmup=1, reps=3)
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
        torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="reference paths at small sizes on the CPU")
    p.add_argument("--no-write", action="store_true", help="print only, write no result file")
    args = p.parse_args()
    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    if not cuda:
        # One intra-op thread: small matmuls on a shared 2-core machine only contend with more.
        torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    for B, L, H, N in GPU_SHAPES if cuda else CPU_SHAPES:
        x = torch.randn(B, L, H, device=device)
        if cuda:
            paths = [("s4d-torch-vandermonde", S4D(d_model=H, d_state=N, impl="ref"), False),
                     ("s4d-triton-vandermonde", S4D(d_model=H, d_state=N, impl="triton"), False)]
        else:
            paths = [("s4d-conv-ref", S4D(d_model=H, d_state=N, impl="ref"), False),
                     ("lssl-krylov-N16", LSSL(d_model=H, d_state=16), False)]
            if L <= 1024:
                paths.append(("s4d-step-loop", S4D(d_model=H, d_state=N, impl="ref"), True))
        group = []
        for name, layer, step in paths:
            group.append(measure(name, layer.to(device), x, cuda=cuda, step=step))
        base = group[0].get("fwdbwd_ms")
        for r in group:
            if base and r.get("fwdbwd_ms"):
                r["time_vs_first"] = r["fwdbwd_ms"] / base
            if cuda:
                # measured / H100 roofline floor of the layer (benchmarks/roofline.py)
                r["vs_floor"] = vs_floor(r.get("fwdbwd_ms"), "s4d", B=B, L=L, H=H, N=N)
        rows += group
    mem = "peak_mib" if cuda else "saved_mib"
    print_table(rows, ["path", "shape", "fwdbwd_ms", mem, "time_vs_first", "vs_floor", "error"])
    payload = {"benchmark": "s4d layer forward+backward", "shape_order": "B x L x H x N",
               "memory": "CUDA peak above the inputs" if cuda else "bytes saved for backward", "rows": rows}
    if not args.no_write:
        print(f"wrote {write_result('ssm-cpu' if not cuda else 'ssm', payload)}")


if __name__ == "__main__":
    main()
