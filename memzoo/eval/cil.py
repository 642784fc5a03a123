"""``memzoo-bench cil``: class-incremental learning with a Discrete Key-Value Bottleneck, a linear probe and an MLP.

"Discrete Key-Value Bottleneck" (arXiv 2207.11240), Sec. 5: a frozen encoder, classes arriving in stages, one pass
over each stage's data, no task ids and no replay.  Every model reads the same frozen features, sees the same batches
in the same order with the same optimizer, and predicts over all classes.  Data sets:

- ``toy``: the paper's 2-D toy: Gaussian classes on a circle, two new classes per stage; the encoder is the identity
  and the bottleneck's keys are fitted (k-means) on unlabelled points spread uniformly over the plane.
- ``digits``: scikit-learn's 8x8 digits (shipped with scikit-learn), two classes per stage; the frozen encoder is a
  fixed random ReLU feature map, and the keys are fitted on the unlabelled training features.

After every stage each model is scored on the test examples of all classes seen so far; ``forgetting`` after stage l
is the mean over earlier stages j of (best accuracy on j's classes after any stage before l) - (accuracy on them now).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CILDataset", "CILConfig", "CIL_PRESETS", "make_dataset", "run_cil", "main_cil", "CSV_FIELDS"]

MODELS = ("dkvb", "linear", "mlp")


@dataclass(frozen=True)
class CILDataset:
    # "toy" (2-D Gaussians) or "digits" (scikit-learn).
    name: str
    stages: int = 4
    classes_per_stage: int = 2
    # toy: examples per class, and the std of each class around its centre on the unit circle.
    train_per_class: int = 300
    test_per_class: int = 100
    toy_std: float = 0.12
    # digits: held-out fraction per class, and the width of the random ReLU feature encoder.
    test_fraction: float = 0.3
    features: int = 256
    # The bottleneck on this data set: C codebooks of N keys of d_key; keys fitted by kmeans_iters Lloyd steps.
    n_codebooks: int = 16
    n_keys: int = 64
    d_key: int = 2
    top_k: int = 1
    kmeans_iters: int = 20
    # Unlabelled points for the key init (toy: uniform over [-1.5, 1.5]^2; digits: the training features).
    key_init_points: int = 4000

    def __post_init__(self) -> None:
        if self.name not in ("toy", "digits"):
            raise ValueError(f"dataset name must be 'toy' or 'digits', got {self.name!r}")
        for f in ("stages", "classes_per_stage", "train_per_class", "test_per_class", "features", "n_codebooks",
                  "n_keys", "d_key", "top_k", "key_init_points"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{f} must be an int >= 1, got {v!r}")
        if self.name == "digits" and self.stages * self.classes_per_stage > 10:
            raise ValueError(f"digits has 10 classes, got stages * classes_per_stage = "
                             f"{self.stages * self.classes_per_stage}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")

    @property
    def n_classes(self) -> int:
        return self.stages * self.classes_per_stage


@dataclass(frozen=True)
class CILConfig:
    name: str
    datasets: tuple[CILDataset, ...]
    models: tuple[str, ...] = MODELS
    seeds: tuple[int, ...] = (0,)
    # One pass over each stage, in batches of batch_size, Adam at each of lrs; per (data set, model) the learning
    # rate with the best final accuracy (mean over seeds) is reported, so the baselines get their best showing.
    batch_size: int = 8
    lrs: tuple[float, ...] = (1e-3, 1e-2)
    # Hidden width of the two-hidden-layer ReLU MLP.
    mlp_hidden: int = 128

    def __post_init__(self) -> None:
        unknown = set(self.models) - set(MODELS)
        if unknown or not self.models:
            raise ValueError(f"models must be a non-empty subset of {MODELS}, got {self.models}")
        if not self.datasets or not self.seeds:
            raise ValueError("datasets and seeds must not be empty")
        if self.batch_size < 1 or self.mlp_hidden < 1 or not self.lrs or not all(lr > 0 for lr in self.lrs):
            raise ValueError("batch_size and mlp_hidden must be >= 1 and lrs a non-empty tuple of rates > 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _ci() -> CILConfig:
    """Toy (4 stages x 2 classes) and digits (5 x 2), one seed, lr 1e-3 and 1e-2: ~10 s of CPU on one thread."""
    return CILConfig(name="ci", datasets=(
        CILDataset("toy"),
        CILDataset("digits", stages=5, n_codebooks=16, n_keys=64, d_key=8)), seeds=(0,))


def _paper() -> CILConfig:
    """The same protocol with 3x the toy data, 5 seeds and 4 learning rates (~10 min on a busy 2-core CPU)."""
    return dataclasses.replace(_ci(), name="paper", seeds=(0, 1, 2, 3, 4), lrs=(3e-4, 1e-3, 3e-3, 1e-2), datasets=(
        CILDataset("toy", train_per_class=1000, test_per_class=300),
        CILDataset("digits", stages=5, n_codebooks=16, n_keys=64, d_key=8)))


CIL_PRESETS = {"ci": _ci, "paper": _paper}


@dataclass
class StagedData:
    """Frozen features, already encoded: x ``[n, d]`` fp32, y int64 ``[n]``; ``key_init`` unlabelled ``[m, d]``."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    key_init: Tensor
    stage_classes: list[list[int]] = field(default_factory=list)


def make_dataset(ds: CILDataset, seed: int) -> StagedData:
    """The features and splits of ``ds`` for ``seed`` (the encoder, the sampling and the split depend on it)."""
    g = torch.Generator().manual_seed(10_007 * seed + 17)
    stage_classes = [list(range(s * ds.classes_per_stage, (s + 1) * ds.classes_per_stage)) for s in range(ds.stages)]
    if ds.name == "toy":
        n = ds.n_classes
        # Neighbouring stages sit next to each other on the circle: class c at angle 2 pi c / n.
        angle = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
        centres = torch.stack([angle.cos(), angle.sin()], 1).float()

        def sample(per: int) -> tuple[Tensor, Tensor]:
            y = torch.arange(n).repeat_interleave(per)
            return centres[y] + ds.toy_std * torch.randn(len(y), 2, generator=g), y

        train_x, train_y = sample(ds.train_per_class)
        test_x, test_y = sample(ds.test_per_class)
        key_init = 3.0 * torch.rand(ds.key_init_points, 2, generator=g) - 1.5
        return StagedData(train_x, train_y, test_x, test_y, key_init, stage_classes)
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    keep = y < ds.n_classes
    x, y = x[keep], y[keep]
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(ds.n_classes):
        rows = (y == c).nonzero().flatten()
        rows = rows[torch.randperm(len(rows), generator=g)]
        test[rows[:round(ds.test_fraction * len(rows))]] = True
    # The frozen encoder: a fixed random ReLU layer on the centred pixels, features standardised on the train split.
    w = torch.randn(x.shape[1], ds.features, generator=g) / math.sqrt(x.shape[1])
    b = 0.5 * torch.randn(ds.features, generator=g)
    feats = torch.relu((x - x[~test].mean(0)) @ w + b)
    mu, sd = feats[~test].mean(0), feats[~test].std(0).clamp_min(1e-3)
    feats = (feats - mu) / sd
    train_x = feats[~test]
    pick = torch.randperm(len(train_x), generator=g)[:ds.key_init_points]
    return StagedData(train_x, y[~test], feats[test], y[test], train_x[pick], stage_classes)


def build_model(kind: str, ds: CILDataset, d_in: int, mlp_hidden: int, key_init: Tensor, seed: int) -> nn.Module:
    """A classifier over ``ds.n_classes``; the bottleneck's keys are fitted on ``key_init`` and frozen."""
    from ..models.wrappers.dkvb import DiscreteKVBottleneck, DKVBConfig

    torch.manual_seed(seed)
    n = ds.n_classes
    if kind == "linear":
        return nn.Linear(d_in, n)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(d_in, mlp_hidden), nn.ReLU(), nn.Linear(mlp_hidden, mlp_hidden), nn.ReLU(),
                             nn.Linear(mlp_hidden, n))
    # The non-parametric decoder: values of dim n_classes, averaged over codebooks = the logits; zero-initialised
    # so a value no input has selected yet votes for no class.
    cfg = DKVBConfig(d_in=d_in, n_codebooks=ds.n_codebooks, n_keys=ds.n_keys, d_key=ds.d_key, d_value=n,
                     top_k=ds.top_k, decoder="mean", value_std=0.0)
    model = DiscreteKVBottleneck(cfg)
    model.fit_keys(key_init, iters=ds.kmeans_iters, generator=torch.Generator().manual_seed(seed))
    return model


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor, classes: list[int]) -> float:
    rows = torch.isin(y, torch.tensor(classes))
    if not bool(rows.any()):
        return float("nan")
    pred = model(x[rows]).argmax(-1)
    return float((pred == y[rows]).float().mean())


def train_stages(model: nn.Module, data: StagedData, cfg: CILConfig, seed: int, lr: float) -> dict[str, Any]:
    """One pass per stage (the stage's examples shuffled by ``seed``), scored after each stage.

    Returns:
        ``stage_acc[l][j]``: accuracy on stage j's classes after stage l (j <= l); ``accuracy[l]``: on all classes
        seen after stage l; ``forgetting[l]``: mean over j < l of max_{l' in [j, l)} stage_acc[l'][j] -
        stage_acc[l][j] (0 after the first stage).
    """
    params = model.trainable_parameters() if hasattr(model, "trainable_parameters") else list(model.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    stage_acc, accuracy, forgetting = [], [], []
    for stage, classes in enumerate(data.stage_classes):
        model.train()
        rows = torch.isin(data.train_y, torch.tensor(classes)).nonzero().flatten()
        rows = rows[torch.randperm(len(rows), generator=g)]
        for batch in rows.split(cfg.batch_size):
            loss = F.cross_entropy(model(data.train_x[batch]), data.train_y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        stage_acc.append([_accuracy(model, data.test_x, data.test_y, cj) for cj in data.stage_classes[:stage + 1]])
        seen = [c for cj in data.stage_classes[:stage + 1] for c in cj]
        accuracy.append(_accuracy(model, data.test_x, data.test_y, seen))
        drops = [max(stage_acc[i][j] for i in range(j, stage)) - stage_acc[stage][j] for j in range(stage)]
        forgetting.append(sum(drops) / len(drops) if drops else 0.0)
    return {"stage_acc": stage_acc, "accuracy": accuracy, "forgetting": forgetting}


def run_cil(cfg: CILConfig, *, progress: bool = True, log: Any = print) -> list[dict[str, Any]]:
    """Every (data set, seed, model) of ``cfg``: one record each with the per-stage curves."""
    # Tiny models and batches of 8: intra-op threads only add overhead (7 s on one thread, 40+ s on a busy 2-core
    # machine with the default threads), so the run uses one thread and restores the setting after.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_cil(cfg, progress, log)
    finally:
        torch.set_num_threads(threads)


def _run_cil(cfg: CILConfig, progress: bool, log: Any) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    combos = [(ds, seed, kind, lr) for ds in cfg.datasets for seed in cfg.seeds for kind in cfg.models
              for lr in cfg.lrs]
    records = []
    cache: dict[tuple[str, int], StagedData] = {}
    bar = tqdm(combos, desc="cil", disable=not progress, leave=False, dynamic_ncols=True)
    for ds, seed, kind, lr in bar:
        bar.set_postfix(data=ds.name, seed=seed, model=kind, lr=lr)
        t0 = time.perf_counter()
        if (ds.name, seed) not in cache:
            cache = {(ds.name, seed): make_dataset(ds, seed)}
        data = cache[(ds.name, seed)]
        model = build_model(kind, ds, data.train_x.shape[1], cfg.mlp_hidden, data.key_init, seed)
        curves = train_stages(model, data, cfg, seed, lr)
        params = model.trainable_parameters() if hasattr(model, "trainable_parameters") else list(model.parameters())
        rec = {"dataset": ds.name, "model": kind, "seed": seed, "lr": lr, **curves,
               "trainable_params": sum(p.numel() for p in params),
               "train_examples": len(data.train_y), "test_examples": len(data.test_y),
               "wall_s": round(time.perf_counter() - t0, 3)}
        records.append(rec)
        curve = " ".join(f"{a:.3f}" for a in rec["accuracy"])
        log(f"{ds.name:<7} {kind:<7} seed={seed:<3} lr={lr:<7.2g} acc/stage {curve}"
            f"  forgetting {rec['forgetting'][-1]:.3f}  {rec['wall_s']:.1f}s")
    mark_best(records)
    return records


def mark_best(records: list[dict[str, Any]]) -> None:
    """``best_lr`` on every record: True for the learning rate whose final accuracy, averaged over seeds, is the best
    of its (data set, model) (ties to the smaller rate)."""
    finals: dict[tuple[str, str], dict[float, list[float]]] = {}
    for r in records:
        finals.setdefault((r["dataset"], r["model"]), {}).setdefault(r["lr"], []).append(r["accuracy"][-1])
    best = {key: max(by_lr, key=lambda lr: (sum(by_lr[lr]) / len(by_lr[lr]), -lr)) for key, by_lr in finals.items()}
    for r in records:
        r["best_lr"] = r["lr"] == best[(r["dataset"], r["model"])]


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds per (data set, model, stage), at each model's best learning rate."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        if r.get("best_lr", True):
            groups.setdefault((r["dataset"], r["model"]), []).append(r)
    out = []
    for (name, kind), runs in groups.items():
        for s in range(len(runs[0]["accuracy"])):
            row = {"dataset": name, "model": kind, "lr": runs[0]["lr"], "stage": s + 1, "n_seeds": len(runs)}
            for metric in ("accuracy", "forgetting"):
                vals = [r[metric][s] for r in runs]
                mean = sum(vals) / len(vals)
                std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
                row[metric], row[f"{metric}_std"] = mean, std
            out.append(row)
    return out


CSV_FIELDS = ("run_id", "created", "preset", "dataset", "model", "seed", "lr", "best_lr", "stage", "classes_seen",
              "accuracy", "accuracy_new", "forgetting", "trainable_params", "wall_s")


def _csv_rows(run_id: str, created: str, cfg: CILConfig, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    per_stage = {ds.name: ds.classes_per_stage for ds in cfg.datasets}
    return [{"run_id": run_id, "created": created, "preset": cfg.name, "dataset": r["dataset"], "model": r["model"],
             "seed": r["seed"], "lr": r["lr"], "best_lr": r["best_lr"], "stage": s + 1,
             "classes_seen": (s + 1) * per_stage[r["dataset"]],
             "accuracy": r["accuracy"][s], "accuracy_new": r["stage_acc"][s][s], "forgetting": r["forgetting"][s],
             "trainable_params": r["trainable_params"], "wall_s": r["wall_s"]} for r in records
            for s in range(len(r["accuracy"]))]


def plot_cil(summary: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Accuracy on all seen classes (top) and forgetting (bottom) vs stage; one panel per data set, a line per model."""
    from .plots import _pyplot, _save

    plt = _pyplot()
    names = list(dict.fromkeys(r["dataset"] for r in summary))
    fig, axes = plt.subplots(2, len(names), figsize=(3.6 * len(names) + 0.6, 5.4), squeeze=False, sharex="col")
    for col, name in enumerate(names):
        for kind in dict.fromkeys(r["model"] for r in summary):
            pts = [r for r in summary if r["dataset"] == name and r["model"] == kind]
            x = [p["stage"] for p in pts]
            label = f"{kind} (lr {pts[0]['lr']:g})"
            for row, metric in enumerate(("accuracy", "forgetting")):
                axes[row][col].errorbar(x, [p[metric] for p in pts], yerr=[p[f"{metric}_std"] for p in pts],
                                        marker="o", capsize=3, label=label)
        axes[0][col].set_title(name)
        axes[0][col].legend(fontsize=7)
        axes[1][col].set_xlabel("stage")
        for row in range(2):
            axes[row][col].set_ylim(-0.02, 1.02)
            axes[row][col].grid(alpha=0.3)
            axes[row][col].set_xticks(sorted({r["stage"] for r in summary if r["dataset"] == name}))
    axes[0][0].set_ylabel("accuracy, all seen classes")
    axes[1][0].set_ylabel("forgetting")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path, plt)


def run_and_save_cil(cfg: CILConfig, out: str | Path, *, run_name: str = "", plots: bool = True,
                     progress: bool = True, log: Any = print) -> dict[str, Any]:
    """Run ``cfg``; write ``<out>/results/<run_id>.json``, append ``<out>/cil.csv``, draw
    ``<out>/plots/<run_id>.png``."""
    from .results import append_csv, environment, new_run_id, write_json

    out = Path(out)
    run_id = new_run_id("cil", run_name or cfg.name)
    created = dt.datetime.now().isoformat(timespec="seconds")
    t0 = time.perf_counter()
    records = run_cil(cfg, progress=progress, log=log)
    summary = summarize(records)
    payload = {"run_id": run_id, "created": created, "task": "cil", "preset": cfg.name, "config": cfg.to_dict(),
               "seeds": list(cfg.seeds), "environment": environment("cpu"),
               "wall_s": round(time.perf_counter() - t0, 3), "records": records, "summary": summary}
    paths: dict[str, Any] = {"json": str(write_json(out, run_id, payload))}
    csv_path = append_csv(out / "cil.csv", _csv_rows(run_id, created, cfg, records), CSV_FIELDS)
    paths["csv"] = str(csv_path)
    if plots:
        paths["plots"] = [str(plot_cil(summary, out / "plots" / f"{run_id}.png",
                                       f"class-incremental, one pass, no task ids ({cfg.name}, "
                                       f"{len(cfg.seeds)} seed{'s' if len(cfg.seeds) > 1 else ''})"))]
    for r in summary:
        if r["stage"] == max(s["stage"] for s in summary if s["dataset"] == r["dataset"]):
            log(f"final {r['dataset']:<7} {r['model']:<7} lr={r['lr']:<7.2g} "
                f"accuracy {r['accuracy']:.3f} +- {r['accuracy_std']:.3f}  "
                f"forgetting {r['forgetting']:.3f} +- {r['forgetting_std']:.3f}")
    log(f"wrote {paths['json']}, {paths['csv']}" + (f", {paths['plots'][0]}" if plots else ""))
    return {**payload, "paths": paths}


# Shared memzoo-bench options that mean nothing for cil: refused rather than silently ignored.
_NOT_FOR_CIL = ("config", "model", "mixer_opts", "n_layers", "d_ff", "d_model", "seq_len", "kv", "train_len",
                "train_examples", "test_examples", "vocab", "lr_sweep", "epochs", "max_steps", "precision",
                "checkpoint", "lengths", "samples", "haystack", "value_type", "max_new_tokens")


def main_cil(args: argparse.Namespace) -> int:
    """The ``cil`` subcommand: ``--preset`` (ci | paper), ``--seeds``, ``--lr``, ``--batch-size``, ``--out``."""
    from .cli import _seeds

    used = [f"--{name.replace('_', '-')}" for name in _NOT_FOR_CIL
            if getattr(args, name, None) not in (None, False)]
    if used or getattr(args, "zip", False) or getattr(args, "no_early_stop", False):
        raise ValueError(f"{', '.join(used) or '--zip/--no-early-stop'} does not apply to the cil task "
                         f"(options: --preset {'|'.join(CIL_PRESETS)}, --seeds, --lr, --batch-size, --out)")
    name = args.preset or "paper"
    if name not in CIL_PRESETS:
        raise ValueError(f"unknown cil preset {name!r}; known: {sorted(CIL_PRESETS)}")
    cfg = CIL_PRESETS[name]()
    if args.seeds:
        cfg = dataclasses.replace(cfg, seeds=_seeds(args.seeds))
    if args.lr:
        cfg = dataclasses.replace(cfg, lrs=tuple(args.lr))
    if args.batch_size:
        cfg = dataclasses.replace(cfg, batch_size=args.batch_size)
    if args.dump_config:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    if args.device not in (None, "cpu"):
        raise ValueError(f"--device {args.device}: the cil task runs on the CPU (tiny models, one pass)")
    run_and_save_cil(cfg, args.out, run_name=args.run_name, plots=not args.no_plots, progress=not args.no_progress)
    return 0
