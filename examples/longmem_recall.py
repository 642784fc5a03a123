"""LongMem on CPU in a few minutes: recall a fact placed several segments back through the memory bank.

    python examples/longmem_recall.py                    # prints both runs' query accuracy and loss
    python examples/longmem_recall.py --out results.json

A command line over ``memzoo.eval.longmem_recall`` (the experiment, its steps and its defaults): pretrain a tiny
attention backbone on in-segment key-value recall, freeze it, and train LongMem's SideNet with the memory and
with the memory gate forced to 0 on streams whose facts lie ``--gap`` segments before their queries.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memzoo.eval.longmem_recall import LongMemRecallConfig, run_longmem_recall  # noqa: E402

HELP = {"gap": "filler segments between the facts and the queries",
        "eval_streams": "held-out streams scored per run"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(LongMemRecallConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                       help=HELP.get(f.name))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = {f.name for f in dataclasses.fields(LongMemRecallConfig)}
    try:
        cfg = LongMemRecallConfig(**{k: v for k, v in vars(args).items() if k in names})
    except (TypeError, ValueError) as e:
        p.error(str(e))
    rec = run_longmem_recall(cfg, args.seed)
    bb = rec["backbone"]
    print(f"backbone: in-segment query acc {bb['in_segment_acc']:.3f} (loss {bb['in_segment_loss']:.3f}); "
          f"on the streams, segment by segment: acc {bb['stream_acc_local']:.3f}")
    for use_memory in (True, False):
        r = rec["memory" if use_memory else "no_memory"]
        label = "with memory   " if use_memory else "without memory"
        gate = [round(x, 3) for x in r["gate_sigmoid"]] if use_memory else "forced to 0"
        print(f"SideNet {label}: query acc {r['query_acc']:.3f}, loss {r['query_loss']:.3f}, "
              f"sigma(gate) {gate}, memory mass {r['memory_mass']:.3f}")
    print(f"chance {rec['chance']:.3f}; {rec['seconds']} s")
    if args.out is not None:
        results = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   **{k: rec[k] for k in ("backbone", "memory", "no_memory", "chance", "seconds")}}
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
