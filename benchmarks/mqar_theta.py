"""Titans on the cpu preset's MQAR with a smaller bound on the inner learning rate, against the stored suite runs.

The memory's inner step is theta_t = theta_max * sigmoid(.), 0.12 theta_max at initialisation; the suite runs at
the default theta_max 1.  This reruns suite runs (same key: model, width, data, learning rate; same seeds) with
only ``theta_max`` changed, for the MLP memory (``titans``) or the memory inside MAG / MAL / MAC, and prints each
next to the suite's stored run.  Each run is written to
``benchmarks/results/mqar-theta/<key>-theta<t>-e<epochs>-s<seed>.json`` (config, seed, commit, machine, record)
and reused when that file holds the same run (a file with other settings is an error, never reused).

    python benchmarks/mqar_theta.py --key mqar-titans_mlp-d64-T64-kv4-lr1e-3-s0 --theta-max 0.25 --seeds 0,1,2
    (about 4 CPU minutes per run at d 64, one thread)
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

from memzoo.eval.report import ROOT, load_result, run_path  # noqa: E402
from memzoo.eval.report_suite import build_suite  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "mqar-theta"
SUITE = ROOT / "benchmarks" / "results" / "report" / "cpu"


def with_theta_max(spec, theta_max: float):
    """``spec`` with the memory's ``theta_max`` set: the ``titans`` mixer's own option, or MAG / MAL / MAC's
    ``memory`` overrides."""
    mixer = spec.pattern[0]
    opts = dict(spec.mixers.get(mixer, {}))
    if mixer == "titans":
        opts = {**opts, "theta_max": theta_max}
    elif mixer in ("titans_mag", "titans_mal", "titans_mac"):
        opts = {**opts, "memory": {**opts.get("memory", {}), "theta_max": theta_max}}
    else:
        raise ValueError(f"--key must name a Titans run (titans, titans_mag, titans_mal, titans_mac), got {mixer!r}")
    return dataclasses.replace(spec, mixers={mixer: opts}, name=f"{spec.name}-theta{theta_max:g}")


def stored_accuracy(base, seed: int, suite: dict) -> float | None:
    """The suite's accuracy for the sweep run ``base`` at ``seed``: ``base`` itself at its seed, or the seed's rerun
    of the sweep's best rate (a run whose ``lr_from`` names ``base``) when that rate is ``base``'s; None when it
    has not run (``load_result``: also when the stored run no longer matches the suite)."""
    run = base if seed == base.seed else next(
        (r for r in suite.values() if r.seed == seed and base.key in r.lr_from), None)
    payload = None if run is None else load_result(SUITE, run, suite)
    if payload is None or payload["config"]["lr"] != base.lr:
        return None  # not run, or that seed reran another rate
    return payload["record"]["metrics"]["all"]["accuracy"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--key", required=True,
                   help="a cpu-preset MQAR sweep run, e.g. mqar-titans_mlp-d64-T64-kv4-lr1e-3-s0")
    p.add_argument("--theta-max", type=float, required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, help="epochs (default: the suite's; the files cited in docs/titans.md "
                                              "were trained under the suite's former 8)")
    args = p.parse_args()
    torch.set_num_threads(1)
    suite = {r.key: r for r in build_suite("cpu")}
    base = suite.get(args.key)
    if base is None or base.study != "mqar" or base.lr is None:
        raise SystemExit(f"--key {args.key!r} is not a sweep run of the cpu preset's MQAR study (see report --list)")
    try:
        spec = with_theta_max(base.spec, args.theta_max)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if args.epochs is not None and args.epochs < 1:
        raise SystemExit(f"--epochs must be a positive integer, got {args.epochs}")
    epochs = args.epochs or base.train.epochs
    train = dataclasses.replace(base.train, epochs=epochs)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        path = OUT / f"{base.key.rsplit('-s', 1)[0]}-theta{args.theta_max:g}-e{epochs}-s{seed}.json"
        run = dataclasses.replace(base, key=path.stem, spec=spec, seed=seed, train=train)
        rec = trained_once(path, {"base": base.key, "theta_max": args.theta_max, "seed": seed}, run)
        rows.append({"seed": seed, "theta_max": args.theta_max, "epochs": epochs,
                     "accuracy": rec["metrics"]["all"]["accuracy"],
                     f"suite (theta_max 1, {base.train.epochs} epochs)": stored_accuracy(base, seed, suite),
                     "curve": " ".join(f"{c['accuracy']:.2f}" for c in rec["curve"])})
    print(f"{base.key} (suite file {run_path(SUITE, base).name}) with theta_max {args.theta_max:g}:")
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
