"""A results-page needle run retrained under another budget (training examples, epochs, learning rate, clipping).

The cpu preset's needle study trains every model on the same 2,000 passkey examples for 10 epochs at 3e-3 (cosine
per epoch, early stop at 0.99, gradient norm clipped at 1).  This reruns one of its runs (same model, width, test
sets and seed) with only the training set's size, the epochs, the rate or the clipping changed, and prints exact
match per test length next to the suite's stored run.  Each run is written to
``benchmarks/results/niah-budget/<key>-n<examples>-e<epochs>-lr<lr>[-clip<c>].json`` (config, seed, commit, machine,
record) and reused when that file holds the same run (a file with other settings is an error, never reused).

    python benchmarks/niah_budget.py --key niah-attention-d64-s0 --examples 8000 --epochs 30 --lr 3e-3
    (attention: about 20 CPU s per 10 epochs of 2,000 examples, one thread; the files trained under the suite's
    former recipe, unclipped, are reproduced by the same commands with --grad-clip none)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, trained_once  # noqa: E402

from memzoo.eval.report import ROOT, load_result  # noqa: E402
from memzoo.eval.report_suite import build_suite  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "niah-budget"
SUITE = ROOT / "benchmarks" / "results" / "report" / "cpu"


def exact_match(record: dict) -> dict[str, float]:
    """Exact match per test length (``seq_len=<T>``) and over all of them, from a harness record."""
    return {k: round(v["exact_match"], 3) for k, v in record["metrics"].items() if "/" not in k}


def _clip(text: str) -> float | None:
    """``--grad-clip``: a positive norm, or ``none`` (no clipping)."""
    if text == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'none', got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'none', got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--key", required=True,
                   help="a cpu-preset needle or MAC-study run, e.g. niah-attention-d64-s0, mac-paper-s0")
    p.add_argument("--examples", type=int, help="training examples (default: the suite's)")
    p.add_argument("--epochs", type=int, help="epochs (default: the suite's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the suite's)")
    # No default: an absent --grad-clip leaves the attribute unset, and the run keeps the suite's setting.
    p.add_argument("--grad-clip", type=_clip, default=argparse.SUPPRESS,
                   help="clip the gradient's norm to this, or 'none' (default: the suite's, 1 in the cpu preset)")
    return p


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(1)
    suite = {r.key: r for r in build_suite("cpu")}
    base = suite.get(args.key)
    if base is None or base.study not in ("niah", "mac") or base.lr is None:
        raise SystemExit(f"--key {args.key!r} is not a run of the cpu preset's needle or MAC study (see report --list)")
    for name in ("examples", "epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.lr is not None and not args.lr > 0:
        raise SystemExit(f"--lr must be positive, got {args.lr}")
    n = args.examples or base.data.train[0].num_examples
    epochs = args.epochs or base.train.epochs
    lr = args.lr or base.lr
    data = dataclasses.replace(base.data, train=(dataclasses.replace(base.data.train[0], num_examples=n),))
    train = dataclasses.replace(base.train, epochs=epochs, grad_clip=getattr(args, "grad_clip", base.train.grad_clip))
    clip = f"-clip{train.grad_clip:g}" if train.grad_clip is not None else ""
    path = OUT / f"{base.key}-n{n}-e{epochs}-lr{lr:g}{clip}.json"
    run = dataclasses.replace(base, key=path.stem, data=data, lr=lr, train=train)
    rec = trained_once(path, {"base": base.key, "train_examples": n, "epochs": epochs, "lr": lr, "seed": base.seed},
                       run)
    stored = load_result(SUITE, base, suite)
    rows = [{"budget": "suite", "examples": base.data.train[0].num_examples, "epochs": base.train.epochs,
             "lr": f"{base.lr:g}", "grad clip": base.train.grad_clip,
             **(exact_match(stored["record"]) if stored else {}),
             "epochs run": stored["record"]["epochs_run"] if stored else "not run"},
            {"budget": "this run", "examples": n, "epochs": epochs, "lr": f"{lr:g}", "grad clip": train.grad_clip,
             **exact_match(rec),
             "epochs run": rec["epochs_run"]}]
    print(f"{base.key}: exact match per test length ({path.name})")
    print_table(rows, list(dict.fromkeys(k for r in rows for k in r)))


if __name__ == "__main__":
    main()
