"""``memzoo-bench`` / ``python -m memzoo.eval``: train small LMs on recall tasks and write results and plots.

    memzoo-bench mqar --preset ci
    memzoo-bench mqar --model attention,gated_delta --d-model 64,128 --seq-len 64,256 --kv 4,16 --lr-sweep 4 --seeds 3
    memzoo-bench niah --preset ci --seq-len 128,256,512
    memzoo-bench text_niah --checkpoint runs/train/my-run --lengths 1024,2048 --samples 50
    memzoo-bench memorize --preset ci        # few-shot memories in weights and in context (its own --help)
    memzoo-bench report --preset cpu         # the declared suite behind docs/results.md (its own --help)

Without ``--preset`` a task runs its published protocol (``mqar``: zoology Fig. 2); the grid
flags narrow or replace parts of it.  Outputs go to ``--out`` (default ``runs/bench/``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

from .config import BenchConfig, DataSpec, ModelSpec, log_lrs
from .presets import DEFAULT_PRESET, PRESETS, get_bench_preset, zoology_batch_size
from .tasks import TASKS

__all__ = ["main", "build_config", "run_and_save"]


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memzoo-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=sorted(TASKS),
                   help="which benchmark (also: memorize and report, with their own options)")
    p.add_argument("--preset", help="named configuration (see --list-presets); default: the task's paper protocol")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    p.add_argument("--config", type=Path, help="a BenchConfig JSON file (as written in results/<run>.json)")
    p.add_argument("--dump-config", action="store_true", help="print the resolved config as JSON and exit")
    g = p.add_argument_group("models")
    g.add_argument("--model", help="comma-separated mixer names or '+'-joined layer patterns, "
                                   "e.g. attention,gated_delta+attention; prefix a wrapper's name to wrap one: "
                                   "'hmt:' (HMT), 'longmem:' (a LongMem SideNet over it, frozen random backbone)")
    g.add_argument("--mixer-opts", type=json.loads, help='JSON {mixer: {option: value}}, e.g. \'{"attention": '
                                                          '{"n_heads": 1}}\'')
    g.add_argument("--n-layers", type=int)
    g.add_argument("--d-ff", type=int, help="MLP width (0 = no MLP)")
    g.add_argument("--d-model", type=_ints, help="comma-separated widths")
    g = p.add_argument_group("data")
    g.add_argument("--seq-len", type=_ints, help="sequence lengths (niah: test lengths)")
    g.add_argument("--kv", type=_ints, help="mqar: key-value pairs per example")
    g.add_argument("--zip", action="store_true", help="mqar: pair --seq-len and --kv element-wise instead of a product")
    g.add_argument("--train-len", type=int, help="niah: training length")
    g.add_argument("--train-examples", type=int)
    g.add_argument("--test-examples", type=int)
    g.add_argument("--vocab", type=int, help="vocabulary size of the task")
    g = p.add_argument_group("training")
    g.add_argument("--lr", type=_floats, help="explicit learning rates")
    g.add_argument("--lr-sweep", type=int, help="N log-spaced learning rates over the preset's range (or 1e-4..1e-2)")
    g.add_argument("--seeds", type=str, help="N (seeds 0..N-1) or a comma-separated list such as 0,1,7")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--max-steps", type=int)
    g.add_argument("--no-early-stop", action="store_true")
    g.add_argument("--precision", choices=("fp32", "bf16"), help="bf16 autocast on CUDA")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    g.add_argument("--yes", action="store_true", help="start even when the estimated time exceeds an hour")
    g.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: these small models gain little from a second thread, and threads "
                        "waiting for each other stall when other work shares the cores; 0 = one per core)")
    g = p.add_argument_group("text_niah")
    g.add_argument("--checkpoint", type=Path, help="memzoo-train run or checkpoint directory")
    g.add_argument("--lengths", type=_ints, help="context lengths in tokens, generation included")
    g.add_argument("--samples", type=int, help="samples per length (RULER: 500)")
    g.add_argument("--haystack", choices=("noise", "needle"), help="RULER noise (S-NIAH-1) or needle haystack (MK-2)")
    g.add_argument("--value-type", choices=("numbers", "uuids"))
    g.add_argument("--max-new-tokens", type=int)
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, default=Path("runs/bench"), help="output directory (default runs/bench/)")
    g.add_argument("--run-name", default="", help="extra label in the run id")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--no-cache", action="store_true", help="do not cache test sets under <out>/cache")
    return p


def _seeds(text: str) -> tuple[int, ...]:
    try:
        parts = _ints(text)
    except argparse.ArgumentTypeError:
        raise ValueError(f"--seeds must be N or a comma-separated list of integers, got {text!r}") from None
    if "," not in text and len(parts) == 1:
        if parts[0] < 1:
            raise ValueError(f"--seeds must be >= 1, got {parts[0]}")
        return tuple(range(parts[0]))
    return parts


def _replace_all(segments: tuple[Any, ...], **changes: Any) -> tuple[Any, ...]:
    return tuple(dataclasses.replace(c, **changes) for c in segments)


def build_config(args: argparse.Namespace) -> BenchConfig:
    """The preset (or ``--config`` file) with the command-line overrides applied."""
    from ..models.wrappers.base import WRAPPERS

    # A count of 0 is an error, not "use the preset's value" (the overrides below test truthiness).
    for flag in ("n_layers", "epochs", "batch_size", "max_steps", "train_len", "train_examples", "test_examples",
                 "vocab", "lr_sweep", "samples", "max_new_tokens"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.config is not None and not args.config.is_file():
        raise ValueError(f"--config {str(args.config)!r}: no such file")
    if args.config is not None:
        if args.preset:
            raise ValueError("--config and --preset are mutually exclusive")
        cfg = BenchConfig.from_dict(json.loads(args.config.read_text()))
        if cfg.task != args.task:
            raise ValueError(f"--config is for task {cfg.task!r}, not {args.task!r}")
    else:
        cfg = get_bench_preset(args.task, args.preset or DEFAULT_PRESET[args.task])

    if args.model or args.mixer_opts or args.n_layers or args.d_ff is not None:
        base = cfg.models[0]
        if args.mixer_opts is not None and not (
                isinstance(args.mixer_opts, dict) and all(isinstance(v, dict) for v in args.mixer_opts.values())):
            raise ValueError("--mixer-opts must be a JSON object {mixer: {option: value}}")
        opts = dict(args.mixer_opts or {})
        names = [m.strip() for m in args.model.split(",")] if args.model else ["+".join(base.pattern)]
        models = []
        for name in names:
            prefix, sep, rest = name.partition(":")
            pattern = tuple(p.strip() for p in (rest if sep and prefix in WRAPPERS else name).split("+"))
            mixers = {k: v for k, v in base.mixers.items() if k in pattern}
            mixers.update({k: v for k, v in opts.items() if k in pattern})
            models.append(ModelSpec.parse(name, mixers, n_layers=args.n_layers or base.n_layers,
                                          d_ff=base.d_ff if args.d_ff is None else args.d_ff))
        cfg = cfg.replace(models=tuple(models))
    if args.d_model:
        cfg = cfg.replace(d_models=args.d_model)
    cfg = _data_overrides(cfg, args)
    if args.lr:
        cfg = cfg.replace(lrs=args.lr)
    if args.lr_sweep:
        lo, hi = (min(cfg.lrs), max(cfg.lrs)) if len(cfg.lrs) > 1 else (1e-4, 1e-2)
        cfg = cfg.replace(lrs=log_lrs(lo, hi, args.lr_sweep))
    if args.seeds:
        cfg = cfg.replace(seeds=_seeds(args.seeds))
    train = {}
    if args.epochs:
        train["epochs"] = args.epochs
    if args.batch_size:
        train["batch_size"] = args.batch_size
        cfg = cfg.replace(data=tuple(dataclasses.replace(d, batch_size=None) for d in cfg.data))
    if args.max_steps:
        train["max_steps"] = args.max_steps
    if args.no_early_stop:
        train["early_stop"] = None
    if args.precision:
        train["precision"] = args.precision
    if train:
        cfg = cfg.replace(train=dataclasses.replace(cfg.train, **train))
    return cfg


def _data_overrides(cfg: BenchConfig, args: argparse.Namespace) -> BenchConfig:
    seg = {}
    if args.vocab:
        seg["vocab_size"] = args.vocab
    data = list(cfg.data)
    if cfg.task == "mqar" and (args.seq_len or args.kv):
        base_train, base_test = data[0].train[0], data[0].test[0]
        lengths = args.seq_len or (base_train.input_seq_len,)
        kvs = args.kv or (base_train.num_kv_pairs,)
        if args.zip:
            if len(lengths) != len(kvs):
                raise ValueError(f"--zip needs as many --seq-len as --kv values, got {len(lengths)} and {len(kvs)}")
            pairs = list(zip(lengths, kvs))
        else:
            pairs = [(T, kv) for T in lengths for kv in kvs]
        for T, kv in pairs:
            if 4 * kv > T:
                raise ValueError(f"--kv {kv} does not fit --seq-len {T} (mqar needs 4 * kv <= seq_len); "
                                 "use --zip to pair the lists")
        rebatch = cfg.name == "zoology-fig2"
        data = [DataSpec((dataclasses.replace(base_train, input_seq_len=T, num_kv_pairs=kv),),
                         (dataclasses.replace(base_test, input_seq_len=T, num_kv_pairs=kv),),
                         zoology_batch_size(T) if rebatch else data[0].batch_size) for T, kv in pairs]
    elif args.kv:
        raise ValueError("--kv applies to the mqar task only")
    elif cfg.task == "niah" and (args.seq_len or args.train_len):
        new = []
        for d in data:
            train = _replace_all(d.train, seq_len=args.train_len) if args.train_len else d.train
            test = d.test
            if args.seq_len:
                test = tuple(dataclasses.replace(d.test[0], seq_len=T) for T in args.seq_len)
            new.append(DataSpec(train, test, d.batch_size))
        data = new
    elif args.seq_len:
        if cfg.task not in ("selective_copy", "regbench"):
            raise ValueError(f"--seq-len does not apply to task {cfg.task!r}")
        if len(args.seq_len) != 1:
            raise ValueError(f"--seq-len takes one length for task {cfg.task!r}")
        seg["seq_len"] = args.seq_len[0]
    if args.train_len and cfg.task != "niah":
        raise ValueError("--train-len applies to the niah task only")
    if args.train_examples or args.test_examples or seg:
        data = [DataSpec(_replace_all(d.train, **seg, **({"num_examples": args.train_examples}
                                                          if args.train_examples else {})),
                         _replace_all(d.test, **seg, **({"num_examples": args.test_examples}
                                                        if args.test_examples else {})),
                         d.batch_size) for d in data]
    return cfg.replace(data=tuple(data))


def _device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a torch device: {e}") from None
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available")
    return name


def run_and_save(cfg: BenchConfig, out: str | Path, *, device: str = "cpu", run_name: str = "", plots: bool = True,
                 progress: bool = True, cache: bool = True, log: Any = print) -> dict[str, Any]:
    """Run ``cfg`` and write ``<out>/results/<run_id>.json``, append ``<out>/results.csv``, draw the plots.

    Returns:
        The JSON payload plus ``paths`` (json, csv, plots).
    """
    from .harness import run_bench
    from .results import append_csv, csv_rows, environment, new_run_id, summarize, write_json

    out = Path(out)
    run_id = new_run_id(cfg.task, run_name or cfg.name)
    created = dt.datetime.now().isoformat(timespec="seconds")
    t0 = time.perf_counter()

    def report(r: dict[str, Any]) -> None:
        m = r["metrics"]["all"]
        log(f"{r['model']:<24} d={r['d_model']:<4} lr={r['lr']:<8.3g} seed={r['seed']:<4} "
            f"{r['primary']}={m[r['primary']]:.4f} loss={m['loss']:.4f} steps={r['steps']} {r['wall_s']:.1f}s")

    records = run_bench(cfg, device=device, cache_dir=out / "cache" if cache else None, progress=progress,
                        on_record=report)
    summary = summarize(records)
    payload = {
        "run_id": run_id, "created": created, "task": cfg.task, "preset": cfg.name, "config": cfg.to_dict(),
        "seeds": list(cfg.seeds), "environment": environment(device), "wall_s": round(time.perf_counter() - t0, 3),
        "records": records, "summary": summary,
    }
    paths: dict[str, Any] = {"json": str(write_json(out, run_id, payload))}
    paths["csv"] = str(append_csv(out / "results.csv", csv_rows(run_id, created, cfg.task, cfg.name, records)))
    if plots:
        from .plots import make_plots

        paths["plots"] = [str(p) for p in make_plots(cfg.task, summary, out / "plots", run_id)]
    for row in summary:
        if row["slice"] == "all":
            log(f"best-of-sweep {row['model']} d={row['d_model']} data={row['data_index']}: {row['metric']} "
                f"{row['mean']:.4f} +- {row['std']:.4f} (best {row['best']:.4f}, {row['n_seeds']} seeds)")
    log(f"wrote {paths['json']}, {paths['csv']}" + (f", {len(paths['plots'])} plots" if plots else ""))
    return {**payload, "paths": paths}


def _confirm_size(cfg: BenchConfig, device: str, yes: bool) -> bool:
    """Print the run count and the ETA; False (with how to shrink the sweep) when it exceeds an hour without --yes."""
    from .estimate import HOUR, estimate_sweep, format_seconds

    est = estimate_sweep(cfg, device)
    grid = (f"{len(cfg.models)} models x {len(cfg.d_models)} widths x {len(cfg.data)} data x {len(cfg.lrs)} lrs x "
            f"{len(cfg.seeds)} seeds")
    print(f"memzoo-bench: {est['runs']} runs ({grid}), at most {est['steps']:,} training steps; estimated at most "
          f"{format_seconds(est['seconds'])} on {device} (early stopping often ends runs sooner)", flush=True)
    if est["seconds"] <= HOUR or yes:
        return True
    print(f"memzoo-bench: error: this sweep would take more than an hour on {device}; pass --yes to start it, or "
          "shrink it: fewer --model, --d-model, --seq-len/--kv, --lr/--lr-sweep or --seeds values, --max-steps N, "
          "or a small preset (--preset ci)", file=sys.stderr)
    return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["memorize"]:
        # Its own options (modes, exposures, distractors, checkpoints): memorize_cli.py.
        from .memorize_cli import main as memorize_main

        return memorize_main(argv[1:])
    if argv[:1] == ["report"]:
        # The declared suite behind docs/results.md, resumable: report.py.
        from .report import main as report_main

        return report_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.list_presets:
        for task, presets in sorted(PRESETS.items()):
            for name, fn in sorted(presets.items()):
                print(f"{task:<18} {name:<16} {(fn.__doc__ or '').strip().splitlines()[0]}")
        print("text_niah          (checkpoints; see --checkpoint, --lengths)")
        print("cil                ci, paper       class-incremental: DKV bottleneck vs linear probe vs MLP (cil.py)")
        return 0
    try:
        if args.task == "text_niah":
            from .text_niah import main_text_niah

            return main_text_niah(args)
        if args.task == "cil":
            from .cil import main_cil

            return main_cil(args)
        if args.threads < 0:
            raise ValueError(f"--threads must be >= 0 (0 = one per core), got {args.threads}")
        cfg = build_config(args)
        if args.dump_config:
            print(json.dumps(cfg.to_dict(), indent=1))
            return 0
        device = _device(args.device)
    except (ValueError, TypeError, OSError) as e:
        print(f"memzoo-bench: error: {e}", file=sys.stderr)
        return 2
    if device == "cpu" and args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not _confirm_size(cfg, device, args.yes):
        return 2
    run_and_save(cfg, args.out, device=device, run_name=args.run_name, plots=not args.no_plots,
                 progress=not args.no_progress, cache=not args.no_cache)
    return 0
