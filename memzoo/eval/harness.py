"""Train-from-scratch harness: a small LM per (model, width, data, learning rate, seed), scored per slice.

The protocol follows zoology ("Zoology: Measuring and Improving Recall in Efficient Language
Models", arXiv 2312.04927): AdamW with weight decay 0.1, a cosine schedule stepped once per epoch
(``CosineAnnealingLR(T_max=epochs)``), evaluation after every epoch, early stopping once the test
accuracy passes 0.99, and the best run of a learning-rate sweep as the reported number.

Seeds.  Train segments get seeds in ``[0, 2^31)`` and test segments in ``[2^31, 2^32)`` (zoology's
split), so no train set can equal a test set.  The test sets depend only on the data config, not
on the run seed: every learning rate and seed is scored on the same examples.  The run seed sets
the model's initialization, the train examples and their order.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import BenchConfig, BenchTrainConfig, DataSpec, ModelSpec
from .tasks import IGNORE, TASKS, TaskData, higher_is_better, make_task, sweep_score

__all__ = ["segment_seed", "load_segment", "evaluate", "slice_metrics", "train_step", "train_one", "run_bench",
           "mark_best", "steps_per_epoch"]

_HALF = 2**31


def segment_seed(cfg: Any, split: str, index: int, seed: int) -> int:
    """The seed of one data segment: a hash of its config, split, position and run seed.

    Train seeds fall in ``[0, 2^31)``, test seeds in ``[2^31, 2^32)``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    key = json.dumps([type(cfg).__name__, asdict(cfg), split, index, seed], sort_keys=True)
    h = int(hashlib.md5(key.encode()).hexdigest()[:8], 16) % _HALF
    return h if split == "train" else _HALF + h


def test_segment_seeds(data: DataSpec) -> list[int]:
    """The seeds of ``data``'s test segments: the same for every run seed (each drawn at run seed 0), so that seeds
    and models are scored on one test set."""
    return [segment_seed(c, "test", i, 0) for i, c in enumerate(data.test)]


def load_segment(cfg: Any, seed: int, cache_dir: str | Path | None = None) -> TaskData:
    """``make_task(cfg, seed)``, read from / written to ``cache_dir`` (keyed by md5 of config and seed)."""
    if cache_dir is None:
        return make_task(cfg, seed)
    key = hashlib.md5(json.dumps([type(cfg).__name__, asdict(cfg), seed], sort_keys=True).encode()).hexdigest()
    path = Path(cache_dir) / f"{type(cfg).__name__}-{key}.pt"
    if path.exists():
        return TaskData(*torch.load(path, weights_only=True))
    data = make_task(cfg, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(tuple(data), tmp)
    tmp.replace(path)
    return data


def _loss(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)


def _autocast(device: torch.device, precision: str):
    enabled = precision == "bf16" and device.type == "cuda"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TaskData, batch_size: int = 256, device: str | torch.device = "cpu",
             precision: str = "fp32") -> dict[str, Tensor]:
    """Per-example scores of ``model`` on ``data``.

    The prediction at position t is ``argmax logits[:, t]`` and is compared with ``labels[:, t]``
    (or looked up in ``data.accept``).

    Returns:
        ``accuracy`` (mean over scored tokens), ``exact_match`` (all scored tokens right) and
        ``loss`` (mean cross-entropy over scored tokens), each a float ``[N]`` tensor.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    acc, em, loss = [], [], []
    try:
        for i in range(0, data.inputs.shape[0], batch_size):
            x = data.inputs[i : i + batch_size].to(device)
            y = data.labels[i : i + batch_size].to(device)
            with _autocast(device, precision):
                logits = model(x).logits.float()
            mask = y != IGNORE
            n = mask.sum(1).clamp(min=1)
            pred = logits.argmax(-1)
            if data.accept is not None:
                ok = data.accept[i : i + batch_size].to(device).gather(2, pred[..., None])[..., 0]
            else:
                ok = pred == y
            ok = ok & mask
            ce = F.cross_entropy(logits.transpose(1, 2), y.clamp(min=0), reduction="none") * mask
            acc.append((ok.sum(1) / n).cpu())
            em.append((ok.sum(1) == mask.sum(1)).float().cpu())
            loss.append((ce.sum(1) / n).cpu())
    finally:
        model.train(was_training)
    return {"accuracy": torch.cat(acc), "exact_match": torch.cat(em), "loss": torch.cat(loss)}


def slice_metrics(scores: list[dict[str, Tensor]], sets: list[TaskData]) -> dict[str, dict[str, float]]:
    """Metrics per slice over several test segments.

    Slice names: ``all``; ``seq_len=<T>`` (every segment of length T); ``seq_len=<T>/<slice>`` for
    the segments' own slices (``num_kv_pairs=8``, ``depth=50``).  Each value is the mean over the
    examples of the slice, so segments of different sizes are weighted by their examples.
    """
    groups: dict[str, list[dict[str, Tensor]]] = {}

    def add(name: str, s: dict[str, Tensor], mask: Tensor | None = None) -> None:
        groups.setdefault(name, []).append(s if mask is None else {k: v[mask] for k, v in s.items()})

    for s, data in zip(scores, sets):
        T = data.inputs.shape[1]
        add("all", s)
        add(f"seq_len={T}", s)
        for name, mask in data.slices.items():
            add(f"seq_len={T}/{name}", s, mask)
    out = {}
    for name, parts in groups.items():
        merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        n = merged["accuracy"].numel()
        out[name] = {k: (float(v.mean()) if n else float("nan")) for k, v in merged.items()}
        out[name]["n"] = n
    return out


def _state_floats(model: Any, seq_len: int) -> int | None:
    try:
        return int(model.state_size(seq_len))
    except (NotImplementedError, ValueError, TypeError):
        return None


def _epoch_batches(sizes: list[int], batch_size: int, gen: torch.Generator) -> list[tuple[int, Tensor]]:
    # Segments never share a batch (they may differ in length); the batch order mixes segments.
    batches = []
    for seg, n in enumerate(sizes):
        perm = torch.randperm(n, generator=gen)
        batches += [(seg, perm[i : i + batch_size]) for i in range(0, n, batch_size)]
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in order]


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, params: list[Tensor], x: Tensor, y: Tensor,
               train: BenchTrainConfig, device: torch.device) -> float:
    """One optimizer step on the batch ``x`` -> ``y`` (``[B, T]`` token ids); returns the loss."""
    with _autocast(device, train.precision):
        out = model(x)
    loss = _loss(out.logits, y)
    if out.aux_losses:
        loss = loss + sum(out.aux_losses.values())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if train.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
    opt.step()
    return loss.item()


def step_lr(lr: float, train: BenchTrainConfig, epoch: int, step: int | None = None) -> float:
    """The learning rate of optimizer step ``step`` (0-based, over the run) in ``epoch``: zoology's
    CosineAnnealingLR(T_max=epochs) from peak ``lr``, stepped once per epoch, times the linear warmup over the first
    ``train.warmup_steps`` steps; ``step=None``: the epoch's rate without warmup."""
    rate = lr * 0.5 * (1 + math.cos(math.pi * epoch / train.epochs))
    if step is not None and train.warmup_steps:
        rate *= min(1.0, (step + 1) / train.warmup_steps)
    return rate


def trainable(model: torch.nn.Module) -> list[Tensor]:
    """The parameters the optimizer updates: a wrapper over a frozen backbone (LongMem) trains only its own."""
    return list(model.trainable_parameters() if hasattr(model, "trainable_parameters") else model.parameters())


def steps_per_epoch(data: DataSpec, train: BenchTrainConfig) -> int:
    """Optimizer steps in one epoch over ``data`` (segments never share a batch)."""
    batch_size = data.batch_size or train.batch_size
    return sum(math.ceil(c.num_examples / batch_size) for c in data.train)


def train_one(spec: ModelSpec, d_model: int, data: DataSpec, lr: float, seed: int, train: BenchTrainConfig, *,
              task: str, device: str | torch.device = "cpu", cache_dir: str | Path | None = None,
              progress: bool = True, desc: str = "", compile: bool = False,
              on_build: Callable[[torch.nn.Module], None] | None = None,
              on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train one model from scratch and score it on the test segments.

    ``compile``: take the training steps through ``torch.compile(model)`` (an execution choice, not part of the
    run's config: the same model and data, fused kernels; evaluation runs the module itself).  On the CPU it cut
    a step of gated delta or GLA by 1.6-1.8x for about a minute of compiling per run.

    ``on_build(model)``: called once with the built model before the first step (e.g. to register forward hooks).
    ``on_step(info)``: called after every optimizer step with ``model``, ``step`` (0-based), ``epoch``, ``lr`` and
    ``loss``; the step's gradients are still in ``.grad``.  Neither may change the training: a probe observes.

    Returns:
        A JSON-ready record: the model and data identity, ``params`` (all, a frozen backbone included),
        ``trainable_params`` (what the optimizer updated), ``state_floats`` per test
        length, per-slice ``metrics`` (after the last epoch run), the ``curve`` (one point per
        epoch), ``steps``, ``epochs_run``, ``stopped_early`` and ``wall_s``.
    """
    device = torch.device(device)
    primary = TASKS[task].primary
    t0 = time.perf_counter()
    train_seeds = [segment_seed(c, "train", i, seed) for i, c in enumerate(data.train)]
    test_seeds = test_segment_seeds(data)
    train_sets = [load_segment(c, s, None) for c, s in zip(data.train, train_seeds)]
    test_sets = [load_segment(c, s, cache_dir) for c, s in zip(data.test, test_seeds)]

    torch.manual_seed(seed)
    model = spec.build(data.vocab_size, d_model).to(device)
    params = trainable(model)
    if on_build is not None:
        on_build(model)
    step_model = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=train.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    sizes = [d.inputs.shape[0] for d in train_sets]
    batch_size = data.batch_size or train.batch_size
    total = steps_per_epoch(data, train) * train.epochs
    if train.max_steps is not None:
        total = min(total, train.max_steps)

    curve: list[dict[str, Any]] = []
    step, stopped_early, epoch = 0, False, 0
    metrics: dict[str, dict[str, float]] = {}
    bar = _progress(total, desc, progress)
    try:
        for epoch in range(train.epochs):
            epoch_lr = step_lr(lr, train, epoch)
            model.train()
            losses = []
            for seg, idx in _epoch_batches(sizes, batch_size, gen):
                rate = step_lr(lr, train, epoch, step)
                for group in opt.param_groups:
                    group["lr"] = rate
                x = train_sets[seg].inputs[idx].to(device)
                y = train_sets[seg].labels[idx].to(device)
                losses.append(train_step(step_model, opt, params, x, y, train, device))
                if on_step is not None:
                    on_step({"model": model, "step": step, "epoch": epoch, "lr": rate, "loss": losses[-1]})
                step += 1
                bar.update(1)
                if step >= total:
                    break
            scores = [evaluate(model, d, train.eval_batch_size, device, train.precision) for d in test_sets]
            metrics = slice_metrics(scores, test_sets)
            value = metrics["all"][primary]
            curve.append({"epoch": epoch + 1, "step": step, "lr": epoch_lr,
                          "train_loss": sum(losses) / max(len(losses), 1), "valid_loss": metrics["all"]["loss"],
                          primary: value, "wall_s": round(time.perf_counter() - t0, 3)})
            bar.set_postfix(loss=f"{curve[-1]['train_loss']:.3f}", **{primary[:3]: f"{value:.3f}"})
            # A threshold on accuracy: a loss never stops a run early.
            if train.early_stop is not None and higher_is_better(primary) and value > train.early_stop:
                stopped_early = True
                break
            if step >= total:
                break
    finally:
        bar.close()

    return {
        "model": spec.name, "pattern": list(spec.pattern), "mixers": spec.mixers, "n_layers": spec.n_layers,
        "wrapper": spec.wrapper,
        "d_ff": spec.d_ff, "d_model": d_model, "lr": lr, "seed": seed, "batch_size": batch_size,
        "train_segments": [asdict(c) for c in data.train], "test_segments": [asdict(c) for c in data.test],
        "train_seeds": train_seeds, "test_seeds": test_seeds,
        "params": model.num_parameters(), "trainable_params": sum(p.numel() for p in params),
        "state_floats": {str(T): _state_floats(model, T) for T in sorted({d.inputs.shape[1] for d in test_sets})},
        "metrics": metrics, "primary": primary, "curve": curve, "steps": step, "epochs_run": epoch + 1,
        "stopped_early": stopped_early, "wall_s": round(time.perf_counter() - t0, 3), "compiled": compile,
    }


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def mark_best(records: list[dict[str, Any]]) -> None:
    """Set ``best_lr`` on each record: True for the learning rate with the best ``all`` primary metric (the
    highest; the lowest for a loss) among the runs that share model, width, data and seed (ties go to the smaller
    learning rate)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["model"], r["d_model"], r["data_index"], r["seed"]), []).append(r)
    for runs in groups.values():
        best = max(runs, key=lambda r: (sweep_score(r["primary"], r["metrics"]["all"][r["primary"]]), -r["lr"]))
        for r in runs:
            r["best_lr"] = r is best


def run_bench(cfg: BenchConfig, *, device: str | torch.device = "cpu", cache_dir: str | Path | None = None,
              progress: bool = True, on_record: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Every (data, model, d_model, seed, lr) combination of ``cfg``, trained and scored.

    ``on_record`` sees each record as soon as its run ends (the CLI prints a line).
    """
    records = []
    combos = [(di, data, spec, d, seed, lr) for di, data in enumerate(cfg.data) for spec in cfg.models
              for d in cfg.d_models for seed in cfg.seeds for lr in cfg.lrs]
    for n, (di, data, spec, d, seed, lr) in enumerate(combos, 1):
        desc = f"[{n}/{len(combos)}] {spec.name} d={d} lr={lr:g} seed={seed}"
        rec = train_one(spec, d, data, lr, seed, cfg.train, task=cfg.task, device=device, cache_dir=cache_dir,
                        progress=progress, desc=desc)
        rec["data_index"] = di
        records.append(rec)
        if on_record is not None:
            on_record(rec)
    mark_best(records)
    return records
