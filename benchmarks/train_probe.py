"""A results-page run's first training steps, instrumented: loss, activation sizes and gradient norms per step.

For a run whose training loss sits at chance, this shows where it goes wrong: whether an activation grows, which
parameters get the gradient.  It retrains a cpu-preset run through the harness's own ``train_one`` (same model,
seed, training data, batch order, optimizer, schedule and per-epoch evaluation, so its first steps are the run's own
first steps) for ``--steps`` optimizer steps, optionally with another rate or a larger training set, and every
``--every`` steps (and at the last step) records

- the loss of that step and its learning rate;
- the RMS of the output of each block's mixer and of the mixer's parts (its direct submodules; for a part that is
  never called as a module, e.g. an attention whose projections are called one by one, its output projection);
- the gradient norm of each block's mixer parts, of the embedding and of the output head (before clipping).

The rows and the per-epoch curve are written to
``benchmarks/results/train-probe/<key>-n<examples>-lr<lr>-<steps>steps.json`` (config, commit, machine) and a few
columns are printed.

    python benchmarks/train_probe.py --key niah-titans_mal-d64-s0 --lr 3e-3 --examples 8000 --steps 600
    (MAL at d 64: about 0.3 CPU s per step, one thread)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402

from memzoo.eval.harness import train_one  # noqa: E402
from memzoo.eval.report import ROOT  # noqa: E402
from memzoo.eval.report_suite import build_suite  # noqa: E402
from memzoo.eval.results import environment as run_environment  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "train-probe"


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().float().pow(2).mean().sqrt())


def probed_parts(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``L<i>`` (block i's mixer) and ``L<i>.<part>`` for its direct submodules; a part never called as a module
    is stood for by its ``o_proj`` / ``out_proj`` when it has one (found by a first call, see ``probe``)."""
    parts = {}
    for i, block in enumerate(model.blocks):
        parts[f"L{i}"] = block.mixer
        for name, child in block.mixer.named_children():
            parts[f"L{i}.{name}"] = child
            for proj in ("o_proj", "out_proj"):
                if isinstance(getattr(child, proj, None), torch.nn.Module):
                    parts[f"L{i}.{name}.{proj}"] = getattr(child, proj)
    return parts


def grad_groups(model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """Trainable parameters by ``embed``, ``head`` (final norm and output head), ``L<i>.<mixer part>``,
    ``L<i>.mixer`` (the mixer's own parameters) and ``L<i>.rest`` (the block's norms and feed-forward)."""
    groups: dict[str, list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        bits = name.split(".")
        if bits[0] == "blocks":
            key = f"L{bits[1]}." + ((bits[3] if len(bits) > 4 else "mixer") if bits[2] == "mixer" else "rest")
        else:
            key = "embed" if bits[0] == "embed" else "head"
        groups.setdefault(key, []).append(p)
    return groups


class ActivationRecorder:
    """The RMS of each part's output, from forward hooks, over the training forward passes since the last
    ``take`` (an evaluation pass runs in eval mode and is not recorded)."""

    def __init__(self, parts: dict[str, torch.nn.Module]):
        self.seen: dict[str, float] = {}
        for name, module in parts.items():
            module.register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def record(module, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            if module.training and torch.is_tensor(out) and out.is_floating_point():
                self.seen[name] = _rms(out)

        return record

    def take(self) -> dict[str, float]:
        """The values since the last call, then forgets them: a part not called in the next step has no value
        there rather than this step's."""
        out, self.seen = self.seen, {}
        return out


class _Probe:
    """``train_one``'s hooks: a row of loss, rate, activations and gradient norms every ``every`` steps, and the
    last step's row (the run may end at ``--steps``, at its last epoch or by an early stop)."""

    def __init__(self, every: int):
        self.every, self.rows, self.last = every, [], None

    def on_build(self, model: torch.nn.Module) -> None:
        self.acts, self.groups = ActivationRecorder(probed_parts(model)), grad_groups(model)

    def on_step(self, info: dict) -> None:
        # The gradients of this step are still in .grad (train_step zeroes them before its backward).
        grads = {f"grad {k}": float(torch.nn.utils.get_total_norm([p.grad for p in ps if p.grad is not None]))
                 for k, ps in self.groups.items() if any(p.grad is not None for p in ps)}
        self.last = {"step": info["step"], "epoch": info["epoch"], "lr": info["lr"], "loss": info["loss"],
                     **{f"rms {k}": v for k, v in self.acts.take().items()}, **grads}
        if self.last["step"] % self.every == 0:
            self.rows.append(self.last)


def probe(run, *, steps: int, every: int, progress: bool = True) -> tuple[list[dict], dict]:
    """Train ``run`` (a harness run of the suite) with ``train_one`` itself for at most ``steps`` steps, recording
    a row every ``every`` steps (and the last); returns the rows and ``train_one``'s record (its per-epoch curve)."""
    hooks = _Probe(every)
    train = dataclasses.replace(run.train, max_steps=min(steps, run.train.max_steps or steps))
    rec = train_one(run.spec, run.d_model, run.data, run.lr, run.seed, train, task=run.task, progress=progress,
                    on_build=hooks.on_build, on_step=hooks.on_step)
    if hooks.rows[-1] is not hooks.last:
        hooks.rows.append(hooks.last)
    return hooks.rows, rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--key", required=True, help="a cpu-preset harness run, e.g. niah-titans_mal-d64-s0")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the run's)")
    p.add_argument("--examples", type=int, help="training examples (default: the run's)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    suite = {r.key: r for r in build_suite("cpu")}
    base = suite.get(args.key)
    if base is None or base.spec is None or base.lr is None or len(base.data.train) != 1:
        raise SystemExit(f"--key {args.key!r} is not a cpu-preset harness run with a fixed rate and one training "
                         f"segment (see memzoo-bench report --list)")
    for name in ("steps", "every", "examples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.lr is not None and not args.lr > 0:
        raise SystemExit(f"--lr must be positive, got {args.lr}")
    n = args.examples or base.data.train[0].num_examples
    lr = args.lr or base.lr
    data = dataclasses.replace(base.data, train=(dataclasses.replace(base.data.train[0], num_examples=n),))
    run = dataclasses.replace(base, key=f"{base.key}-n{n}-lr{lr:g}", data=data, lr=lr)
    env = run_environment("cpu")  # read before the run: the tree may move on while it trains
    c0 = time.process_time()
    rows, rec = probe(run, steps=args.steps, every=args.every, progress=not args.no_progress)
    path = OUT / f"{run.key}-{args.steps}steps.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"base": base.key, "examples": n, "lr": lr, "steps": args.steps,
                                "config": run.config(), "environment": env,
                                "cpu_s": round(time.process_time() - c0, 1), "curve": rec["curve"], "rows": rows},
                               indent=1) + "\n")
    # Activations: each mixer and its parts; an output projection only where its part itself was not called.
    called = [k[4:] for k in rows[0] if k.startswith("rms ")]
    shown = ["step", "lr", "loss"]
    shown += [f"rms {k}" for k in called if k.count(".") < 2 or k.rsplit(".", 1)[0] not in called]
    shown += [k for k in rows[0] if k.startswith("grad ")]
    print(f"{run.key}: every {args.every} steps ({path.relative_to(ROOT)})")
    print_table([{k: r.get(k) for k in shown} for r in rows], shown)


if __name__ == "__main__":
    main()
