"""``memzoo-bench memorize``: recognition, recall and retention of few-shot memories (memorize.py).

    memzoo-bench memorize --preset ci                                   # CPU, about a minute
    memzoo-bench memorize --mode weights --model attention,gated_delta --pretrain-steps 2000 --exposures 1,3,10
    memzoo-bench memorize --mode context --checkpoint runs/tiny-attention/final --distractors 0,128,512
    memzoo-bench memorize --mode context --hf path/to/local/hf_model

Models: memzoo mixer patterns (``gated_delta``, ``gated_delta+attention``; a fresh model of
``--d-model`` x ``--n-layers``), memzoo model presets (``attention-tiny``), a memzoo-train export
(``--checkpoint``), or a local transformers causal LM with its tokenizer (``--hf``).  Writes
``<out>/results/<run_id>.json``, appends ``<out>/memorize.csv`` and draws ``<out>/plots/<run_id>-*.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .cli import _ints
from .memorize import MemorizeConfig, summary_lines

__all__ = ["PRESETS", "main", "CSV_FIELDS"]

PRESETS: dict[str, dict[str, Any]] = {
    # CI scale: one tiny attention model pretrained briefly on the corpus, both materials, every probe.
    "ci": dict(models=("attention",), d_model=64, n_layers=2, cfg=dict(
        n_items=16, item_len=32, exposures=(1, 3, 10), retention_updates=60, probe_every=20, pretrain_steps=100,
        batch_size=8, lr=3e-3, distractors=(0, 64, 256))),
    # The CPU study of docs/memorize.md: attention and gated delta, pretrained longer.
    "small": dict(models=("attention", "gated_delta"), d_model=128, n_layers=4, cfg=dict(
        n_items=32, item_len=32, exposures=(1, 3, 10), retention_updates=300, probe_every=20,
        pretrain_steps=1500, batch_size=16, lr=1e-3, distractors=(0, 64, 256, 1024))),
}
CSV_FIELDS = ("run_id", "created", "mode", "model", "material", "exposures", "phase", "update", "distractor",
              "recognition", "recall_exact", "recall_token_acc", "loss_studied", "loss_novel")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memzoo-bench memorize", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="ci")
    p.add_argument("--mode", choices=("weights", "context"), help="default: weights")
    g = p.add_argument_group("models (one of)")
    g.add_argument("--model", help="comma-separated mixer patterns or memzoo model presets")
    g.add_argument("--checkpoint", type=Path, help="a memzoo-train export (final/) with its tokenizer")
    g.add_argument("--hf", type=Path, help="a local transformers causal-LM folder with its tokenizer")
    g.add_argument("--d-model", type=int)
    g.add_argument("--n-layers", type=int)
    g = p.add_argument_group("protocol")
    g.add_argument("--materials", help="comma-separated: sentences,random")
    g.add_argument("--exposures", type=_ints)
    g.add_argument("--n-items", type=int)
    g.add_argument("--item-len", type=int)
    g.add_argument("--retention-updates", type=int)
    g.add_argument("--probe-every", type=int)
    g.add_argument("--pretrain-steps", type=int)
    g.add_argument("--distractors", type=_ints)
    g.add_argument("--items-per-trial", type=int)
    g.add_argument("--cue-fraction", type=float)
    g.add_argument("--lr", type=float)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, default=Path("runs/bench"))
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--no-progress", action="store_true")
    return p


def build_config(args: argparse.Namespace) -> tuple[MemorizeConfig, dict[str, Any]]:
    preset = PRESETS[args.preset]
    fields = dict(preset["cfg"])
    for name in ("mode", "exposures", "n_items", "item_len", "retention_updates", "probe_every", "pretrain_steps",
                 "distractors", "items_per_trial", "cue_fraction", "lr", "batch_size", "seed"):
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    if args.materials:
        fields["materials"] = tuple(m.strip() for m in args.materials.split(",") if m.strip())
    cfg = MemorizeConfig(**fields)
    chosen = [x for x in (args.model, args.checkpoint, args.hf) if x]
    if len(chosen) > 1:
        raise ValueError("--model, --checkpoint and --hf are mutually exclusive")
    for name in ("d_model", "n_layers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    models = {"patterns": tuple(m.strip() for m in (args.model or "").split(",") if m.strip()) or preset["models"],
              "checkpoint": args.checkpoint, "hf": args.hf,
              "d_model": args.d_model or preset["d_model"], "n_layers": args.n_layers or preset["n_layers"]}
    from ..models.presets import PRESETS as MODEL_PRESETS
    from ..models.registry import MIXERS

    for name in models["patterns"] if not (args.checkpoint or args.hf) else ():
        unknown = [p for p in name.split("+") if p.strip() not in MIXERS]
        if name not in MODEL_PRESETS and unknown:
            raise ValueError(f"--model {name!r}: {unknown} are neither mixers {sorted(MIXERS)} nor model "
                             f"presets {sorted(MODEL_PRESETS)}")
    if args.checkpoint is not None and not args.checkpoint.is_dir():
        raise ValueError(f"--checkpoint {str(args.checkpoint)!r}: no such folder")
    if args.hf is not None and not args.hf.is_dir():
        raise ValueError(f"--hf {str(args.hf)!r}: no such folder")
    return cfg, models


def load_models(spec: dict[str, Any], device: str, seed: int) -> list[tuple[str, torch.nn.Module, Any]]:
    """(name, model, tokenizer) for every model the command names."""
    from ..models import ModelConfig, build_model
    from ..models.presets import PRESETS as MODEL_PRESETS
    from ..train.data import ByteTokenizer, load_tokenizer

    if spec["checkpoint"] is not None:
        from ..train.checkpoint import from_pretrained

        path = spec["checkpoint"]
        return [(path.name, from_pretrained(path, device=device), load_tokenizer(path))]
    if spec["hf"] is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(spec["hf"]), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(spec["hf"]), local_files_only=True).to(device)
        return [(spec["hf"].name, model, tok)]
    tok = ByteTokenizer()
    out = []
    for name in spec["patterns"]:
        torch.manual_seed(seed)
        if name in MODEL_PRESETS:
            model = build_model(name, vocab_size=tok.vocab_size)
        else:
            pattern = tuple(p.strip() for p in name.split("+"))
            model = build_model(ModelConfig(vocab_size=tok.vocab_size, d_model=spec["d_model"],
                                            n_layers=spec["n_layers"], pattern=pattern))
        out.append((name, model.to(device), tok))
    return out


def write_outputs(out: Path, run_id: str, created: str, payload: dict[str, Any], plots: bool) -> dict[str, Any]:
    from .results import append_csv, write_json

    paths: dict[str, Any] = {"json": str(write_json(out, run_id, payload))}
    rows = [{"run_id": run_id, "created": created, "mode": payload["config"]["mode"], "model": model, **row}
            for model, result in payload["models"].items() for row in result["rows"]]
    csv_path = append_csv(out / "memorize.csv", rows, CSV_FIELDS, extra="ignore")
    paths["csv"] = str(csv_path)
    if plots:
        from .memorize_plots import plot_context, plot_exposures, plot_retention

        d = out / "plots"
        models = {m: r["rows"] for m, r in payload["models"].items()}
        if payload["config"]["mode"] == "weights":
            paths["plots"] = [str(plot_exposures(models, d / f"{run_id}-exposures.png")),
                              str(plot_retention(models, d / f"{run_id}-retention.png"))]
        else:
            paths["plots"] = [str(plot_context(models, d / f"{run_id}-context.png"))]
    return paths


def run(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    from .memorize import LMAdapter, run_memorize
    from .results import environment, new_run_id

    cfg, spec = build_config(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available")
    run_id = new_run_id("memorize", f"{args.preset}-{cfg.mode}")
    created = dt.datetime.now().isoformat(timespec="seconds")
    t0 = time.perf_counter()
    results = {}
    for name, model, tok in load_models(spec, device, cfg.seed):
        log(f"== {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), mode {cfg.mode}")
        progress = None if args.no_progress else (lambda msg, name=name: log(f"  [{name}] {msg}"))
        t = time.perf_counter()
        result = run_memorize(LMAdapter(model, batch_size=cfg.batch_size * 2), tok, cfg, progress)
        result["wall_s"] = round(time.perf_counter() - t, 2)
        results[name] = result
        for line in summary_lines(result["rows"], cfg.mode):
            log(f"  {line}")
    payload = {"run_id": run_id, "created": created, "task": "memorize", "preset": args.preset,
               "config": dataclasses.asdict(cfg), "models": results, "environment": environment(device),
               "wall_s": round(time.perf_counter() - t0, 2)}
    paths = write_outputs(args.out, run_id, created, payload, plots=not args.no_plots)
    log(f"wrote {paths['json']}, {paths['csv']}" + (f", {len(paths['plots'])} plots" if "plots" in paths else ""))
    return {**payload, "paths": paths}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        build_config(args)  # usage errors before any model is built
    except (ValueError, TypeError) as e:
        print(f"memzoo-bench memorize: error: {e}", file=sys.stderr)
        return 2
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
