"""LongMem chunk retrieval: exact top-k chunks per query over a full memory bank, time and peak memory.

Paths, measured in the same run:
- ``full-topk``: the whole [B, H, T, N] fp32 score matrix, masked, then ``torch.topk``. This is the straightforward
  baseline that ratios are taken against; it has no tie rule.
- ``tiled``: ``chunk_topk(impl="ref")``, tiles of ``block_n`` chunk keys and a running top-k.
- ``triton``: ``chunk_topk(impl="triton")``, the fused streaming kernel (CUDA only).

The default shape is a full 65,536-token bank (chunk 4 -> 16,384 chunks), 1,024 queries, 16 heads of d 64, top 16
chunks and B=1. A sweep over bank sizes (16k, 65k and 262k tokens) shows how peak memory grows with the bank.
Queries are fp32 (LongMem scores in fp32). Chunk keys use the bank dtype: bf16 on CUDA, fp32 on CPU.

    python benchmarks/longmem.py            # GPU if present, else CPU
    python benchmarks/longmem.py --quick    # CPU-sized sweep: 256 queries in the sweep rows

Peak memory is measured above the inputs:
- CUDA: ``torch.cuda.max_memory_allocated`` minus what was allocated before the call.
- CPU: the peak resident set size of the process (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the
  resident size before the call. glibc is set to mmap every block >= 1 MiB, so freed tensors leave the resident set
  at once; the figure still counts small-block slack and thread stacks, so read it to about +-5 MiB.

Results go to ``benchmarks/results/longmem[-cpu]-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, time_ms, write_result  # noqa: E402
from roofline import vs_floor  # noqa: E402

from memzoo.kernels.retrieval import chunk_topk  # noqa: E402


def full_topk(q, keys, k, valid):
    s = torch.matmul(q.float(), keys.float().transpose(-1, -2))  # [B, H, T, N]
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    top = torch.topk(s, k, dim=-1)
    return top.values, top.indices


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def _mmap_large_blocks() -> None:
    """Let glibc serve every block >= 1 MiB with its own mmap (M_MMAP_THRESHOLD = -3), so a freed tensor leaves the
    resident set at once and the peak RSS tracks the live tensors instead of heap fragmentation."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)
    except (OSError, AttributeError):
        pass


def peak_mib(fn, cuda: bool) -> float | None:
    """Peak memory of one call of ``fn`` above the memory in use before it."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        # Hand freed heap pages back first, so that reusing them does not hide the call's own peak.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS")
        fn()
        return (_status_kib("VmHWM") - base) / 2**10
    except (OSError, AttributeError):
        return None


def make_bank(B, H, n_chunks, d, T, device, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, H, T, d, device=device, generator=g)
    keys = torch.randn(B, H, n_chunks, d, device=device, generator=g).to(dtype)
    valid = torch.ones(B, n_chunks, dtype=torch.bool, device=device)
    # A ring buffer that has wrapped: the stamps rise from the write pointer on.
    stamp = (torch.arange(n_chunks, device=device) - n_chunks // 3) % n_chunks
    return q, keys, valid, stamp.expand(B, n_chunks).contiguous()


def time_shape(tokens, T, args, cuda, device, dtype, reps) -> list[tuple[dict, Callable[[], object]]]:
    """One row per path for one bank size: agreement with full-topk and time; the call is kept for ``peak_mib``."""
    B, H, d, csz, k = 1, args.heads, args.d_head, args.chunk_size, args.top_chunks
    n_chunks = tokens // csz
    q, keys, valid, stamp = make_bank(B, H, n_chunks, d, T, device, dtype)
    paths = {
        "full-topk": lambda: full_topk(q, keys, k, valid),
        "tiled": lambda: chunk_topk(q, keys, k, valid=valid, stamp=stamp, impl="ref", block_n=args.block_n),
    }
    if cuda:
        paths["triton"] = lambda: chunk_topk(q, keys, k, valid=valid, stamp=stamp, impl="triton")
    rows, want = [], None
    for name, fn in paths.items():
        row = {"path": name, "bank_tokens": tokens, "chunks": n_chunks, "queries": T}
        try:
            out = fn()
            if want is None:
                want = out
            # Each path sums q . k in its own order: scores agree to fp32 rounding, and indices wherever two scores
            # are not within rounding of each other (or exactly tied, where full-topk has no tie rule).
            row["idx_match"] = (out[1] == want[1]).float().mean().item()
            row["max_score_diff"] = (out[0] - want[0]).abs().max().item()
            row["ms"] = time_ms(fn, cuda=cuda, warmup=0 if not cuda else 1, reps=reps)
            row["ms_per_1k_queries"] = row["ms"] * 1024 / T
            if cuda:
                # measured / H100 roofline floor of the exact search (benchmarks/roofline.py)
                row["vs_floor"] = vs_floor(row["ms"], "retrieval", "fwd", B=B, T=T, H=H, D=d, n_chunks=n_chunks, k=k)
        except torch.OutOfMemoryError:
            row["error"] = "out of memory"
            torch.cuda.empty_cache()
        rows.append((row, fn))
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Ratios against the first row of each bank size (full-topk, measured in the same run)."""
    base = None
    for r in rows:
        if r["path"] == "full-topk":
            base = r
        if base.get("ms") and r.get("ms"):
            r["time_vs_full_topk"] = r["ms"] / base["ms"]
        if base.get("peak_mib") and r.get("peak_mib") is not None:
            r["mem_vs_full_topk"] = r["peak_mib"] / base["peak_mib"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if CUDA is present")
    p.add_argument("--quick", action="store_true", help="CPU-sized sweep: --sweep-queries 256")
    p.add_argument("--tokens", type=int, default=65536, help="bank size of the main row, in tokens")
    p.add_argument("--queries", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--d-head", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=4)
    p.add_argument("--top-chunks", type=int, default=16)
    p.add_argument("--block-n", type=int, default=None, help="tiled path: chunk keys per tile (default 4096)")
    p.add_argument("--sweep", default="16384,65536,262144", help="bank sizes in tokens, comma-separated")
    p.add_argument("--sweep-queries", type=int, default=None, help="queries in the sweep rows (default --queries)")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    p.add_argument("--no-write", action="store_true", help="print only, write no result file")
    args = p.parse_args()
    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    sweep_t = args.sweep_queries or (256 if args.quick else args.queries)
    reps = 5 if cuda else 3
    torch.manual_seed(0)
    main_entries = time_shape(args.tokens, args.queries, args, cuda, device, dtype, reps)
    sweep_entries = []
    for tokens in (int(x) for x in args.sweep.split(",") if x):
        sweep_entries += time_shape(tokens, sweep_t, args, cuda, device, dtype, 1 if not cuda else reps)
    # Memory after all timings: the CPU measurement changes how glibc allocates, which would slow the timed calls.
    if not cuda:
        _mmap_large_blocks()
    for row, fn in main_entries + sweep_entries:
        if "error" not in row:
            try:
                row["peak_mib"] = peak_mib(fn, cuda)
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
                torch.cuda.empty_cache()
    main_rows, sweep_rows = [r for r, _ in main_entries], [r for r, _ in sweep_entries]
    add_ratios(main_rows)
    add_ratios(sweep_rows)
    cols = ["path", "bank_tokens", "chunks", "queries", "ms", "ms_per_1k_queries", "vs_floor", "peak_mib",
            "time_vs_full_topk",
            "mem_vs_full_topk", "idx_match", "max_score_diff", "error"]
    print(f"main: B=1 H={args.heads} d={args.d_head} chunk={args.chunk_size} top={args.top_chunks} chunks, "
          f"q fp32, keys {str(dtype).removeprefix('torch.')}")
    print_table(main_rows, cols)
    print("\nsweep over bank sizes:")
    print_table(sweep_rows, cols)
    payload = {
        "benchmark": "longmem exact chunk top-k retrieval",
        "shape": {"B": 1, "H": args.heads, "d_head": args.d_head, "chunk_size": args.chunk_size,
                  "top_chunks": args.top_chunks, "q_dtype": "float32", "keys_dtype": str(dtype),
                  "block_n": args.block_n, "threads": torch.get_num_threads()},
        "memory": "CUDA max_memory_allocated above the inputs" if cuda
        else "peak RSS (VmHWM after /proc/self/clear_refs) above the RSS before the call, glibc mmap threshold 1 MiB",
        "main": main_rows,
        "sweep": sweep_rows,
    }
    if not args.no_write:
        print(f"wrote {write_result('longmem' if cuda else 'longmem-cpu', payload)}")


if __name__ == "__main__":
    main()
