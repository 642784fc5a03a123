"""Training steps per second of every ``tiny-*`` memzoo-train preset on the CPU, as ratios to ``tiny-attention``.

One step = forward, backward and AdamW on one ``micro_bs x seq_len`` batch of random tokens (the presets' own
shapes), as memzoo-train runs it.  Wall time and CPU time (``time.process_time``, the time this process ran on
the cores) are both recorded: under load from other processes wall time grows and CPU time much less, so the
CPU-time ratios are the ones to compare across machines states.  Rounds alternate the presets so load changes
hit all of them alike.

    python benchmarks/tiny_presets.py --threads 2 --steps 5 [--presets tiny-attention,tiny-mom] [--save]
    python benchmarks/tiny_presets.py --profile tiny-mom      # top operators of one preset's step
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_result  # noqa: E402

from memzoo.models import build_model  # noqa: E402
from memzoo.train import resolve_config, train_presets  # noqa: E402


def tiny_presets() -> list[str]:
    return sorted(n for n in train_presets() if n.startswith("tiny-"))


def make_step(preset: str):
    """A closure running one training step of ``preset``, and the step's token count."""
    cfg = resolve_config(preset)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_bs, cfg.data.seq_len))

    def step() -> None:
        loss = model(batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, batch.numel()


def measure(presets: list[str], steps: int) -> list[dict]:
    runs = {}
    for name in presets:
        step, tokens = make_step(name)
        # The first step allocates and warms caches; it is not timed.
        step()
        runs[name] = {"step": step, "tokens": tokens, "wall": [], "cpu": []}
    for _ in range(steps):
        for r in runs.values():
            w, c = time.perf_counter(), time.process_time()
            r["step"]()
            r["wall"].append(time.perf_counter() - w)
            r["cpu"].append(time.process_time() - c)
    base = runs.get("tiny-attention")
    rows = []
    for name, r in runs.items():
        wall, cpu = sorted(r["wall"])[len(r["wall"]) // 2], sorted(r["cpu"])[len(r["cpu"]) // 2]
        row = {"preset": name, "wall_s_per_step": round(wall, 4), "cpu_s_per_step": round(cpu, 4),
               "steps_per_s": round(1 / wall, 3), "tokens_per_step": r["tokens"]}
        if base is not None:
            row["x_attention_wall"] = round(wall / sorted(base["wall"])[len(base["wall"]) // 2], 2)
            row["x_attention_cpu"] = round(cpu / sorted(base["cpu"])[len(base["cpu"]) // 2], 2)
        rows.append(row)
    return rows


def profile(preset: str, steps: int) -> None:
    step, _ = make_step(preset)
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per preset (median reported)")
    p.add_argument("--presets", help="comma-separated preset names (default: every tiny-* preset)")
    p.add_argument("--profile", metavar="PRESET", help="print the top operators of one preset's steps instead")
    p.add_argument("--save", action="store_true", help="write results/tiny-presets-<device>-<date>.json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.profile:
        profile(a.profile, a.steps)
        return
    presets = a.presets.split(",") if a.presets else tiny_presets()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = measure(presets, a.steps)
    print_table(rows, ["preset", "steps_per_s", "wall_s_per_step", "cpu_s_per_step", "x_attention_wall",
                       "x_attention_cpu"])
    if a.save:
        print(write_result("tiny-presets", {"threads": a.threads, "steps": a.steps, "load_avg_1min_before": load,
                                            "load_avg_1min_after": os.getloadavg()[0], "rows": rows}))


if __name__ == "__main__":
    main()
