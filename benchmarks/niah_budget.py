"""A results-page needle, MAC or MQAR run retrained under another budget (training examples, epochs, learning rate,
clipping).

The cpu preset's needle study trains every model on the same 2,000 passkey examples for 10 epochs at 3e-3 (cosine
per epoch, early stop at 0.99, gradient norm clipped at 1); its MQAR grid follows zoology (no clipping, the rate
from a sweep at the first seed).  This reruns one of the suite's runs (same model, width, test sets and seed; an
MQAR rerun of the sweep's best rate at that rate) with only the training set's size, the epochs, the rate or the
clipping changed, and prints its scores per test slice next to the suite's stored run: exact match for the needle
and MAC runs, accuracy for MQAR.  Each run is written to
``benchmarks/results/{niah,mqar}-budget/<key>-n<examples>-e<epochs>-lr<lr>[-clip<c>].json`` (config, seed, commit,
machine, record) and reused when that file holds the same run (a file with other settings is an error, never
reused).

    python benchmarks/niah_budget.py --key niah-attention-d64-s0 --examples 8000 --epochs 30 --lr 3e-3
    (attention: about 20 CPU s per 10 epochs of 2,000 examples, one thread; the files trained under the suite's
    former recipe, unclipped, are reproduced by the same commands with --grad-clip none)
    python benchmarks/niah_budget.py --key mqar-titans_mag-d64-T64-kv4-best-s1 --grad-clip 1
    (about 600 CPU s)
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
from memzoo.eval.tasks import TASKS  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "niah-budget"
MQAR_OUT = ROOT / "benchmarks" / "results" / "mqar-budget"
SUITE = ROOT / "benchmarks" / "results" / "report" / "cpu"
STUDIES = ("niah", "mac", "mqar")


def scores(record: dict, metric: str) -> dict[str, float]:
    """``metric`` per test slice of a harness record (its top-level slices, ``all`` among them)."""
    return {k: round(v[metric], 3) for k, v in record["metrics"].items() if "/" not in k}


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
                   help="a cpu-preset needle, MAC-study or MQAR run, e.g. niah-attention-d64-s0, mac-paper-s0, "
                        "mqar-titans_mag-d64-T64-kv4-best-s1")
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
    if base is None or base.study not in STUDIES:
        raise SystemExit(f"--key {args.key!r} is not a run of the cpu preset's needle, MAC or MQAR study (see report "
                         "--list)")
    resolved = base.resolve(SUITE, suite)  # an MQAR rerun of its sweep's best rate gets that rate
    if resolved is None:
        raise SystemExit(f"--key {args.key!r} reruns the best rate of a sweep that has not finished; run the sweep "
                         "first (report --only mqar) or give the run of one rate")
    base = resolved
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
    metric = TASKS[base.task].primary  # exact match for the needle and MAC runs, accuracy for MQAR
    path = (MQAR_OUT if base.study == "mqar" else OUT) / f"{base.key}-n{n}-e{epochs}-lr{lr:g}{clip}.json"
    run = dataclasses.replace(base, key=path.stem, data=data, lr=lr, train=train)
    rec = trained_once(path, {"base": base.key, "train_examples": n, "epochs": epochs, "lr": lr, "seed": base.seed},
                       run)
    stored = load_result(SUITE, base, suite)
    rows = [{"budget": "suite", "examples": base.data.train[0].num_examples, "epochs": base.train.epochs,
             "lr": f"{base.lr:g}", "grad clip": base.train.grad_clip,
             **(scores(stored["record"], metric) if stored else {}),
             "epochs run": stored["record"]["epochs_run"] if stored else "not run"},
            {"budget": "this run", "examples": n, "epochs": epochs, "lr": f"{lr:g}", "grad clip": train.grad_clip,
             **scores(rec, metric),
             "epochs run": rec["epochs_run"]}]
    print(f"{base.key}: {metric.replace('_', ' ')} per test slice ({path.name})")
    print_table(rows, list(dict.fromkeys(k for r in rows for k in r)))


if __name__ == "__main__":
    main()
