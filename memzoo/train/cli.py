"""Command line: ``memzoo-train`` / ``python -m memzoo.train`` and ``memzoo-prepare``.

    memzoo-train --preset tiny                                    # CPU, minutes, embedded corpus
    memzoo-train --preset tiny --model.d_model 192 --optim.lr=1e-3 --out_dir runs/wider
    memzoo-train --config run.yaml --resume auto                  # CLI > file > preset > defaults
    memzoo-train --preset longmem_tiny --wrapper.backbone runs/tiny-attention/final   # LongMem SideNet, frozen backbone
    memzoo-train presets                                          # list the training presets
    memzoo-train plot runs/a runs/b --out loss.png                # loss curves
    memzoo-train prepare --source stdlib-code --out data/code     # = memzoo-prepare: {train,val}.bin + meta.json
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from .config import ConfigError, TrainConfig, check_paths, resolve_config, train_presets
from .data import DECODE_ERRORS

__all__ = ["main", "prepare_main", "parse_train_args", "check_launch"]

_ALIASES = {"--resume": "ckpt.resume", "--out-dir": "out_dir", "--out_dir": "out_dir"}


def _usage() -> str:
    from .tracking import flat_config

    lines = [__doc__.strip(), "", "Every config field can be overridden as --SECTION.FIELD VALUE (defaults shown):"]
    for key, value in flat_config(TrainConfig().to_dict()).items():
        if not key.startswith("model."):
            lines.append(f"  --{key} {value}")
    lines.append("  --model.FIELD VALUE (ModelConfig fields), --model.preset NAME (a memzoo model preset)")
    lines.append("Other flags: --preset NAME, --config FILE.yaml|json, --resume auto|none|PATH, --print-config")
    return "\n".join(lines)


def parse_train_args(argv: Sequence[str]) -> tuple[TrainConfig, bool]:
    """``argv`` -> (resolved config, print-only flag).  Raises ``ConfigError`` on bad input."""
    preset = file = None
    print_only = False
    overrides: dict[str, Any] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options are --SECTION.FIELD VALUE (see --help)")
        key, eq, value = arg.partition("=")
        if not eq:
            nxt = args[i + 1] if i + 1 < len(args) else None
            if nxt is None or (nxt.startswith("--") and not _is_number(nxt)):
                value = "true"
            else:
                value, i = nxt, i + 1
        i += 1
        if key == "--print-config":
            print_only = value.lower() in ("true", "1", "yes")
        elif key == "--preset":
            preset = value
        elif key == "--config":
            file = value
        else:
            dotted = _ALIASES.get(key, key[2:])
            if not dotted:
                raise ConfigError(f"empty option {arg!r}")
            overrides[dotted] = value
    return resolve_config(preset, file, overrides), print_only


def check_launch() -> None:
    """Under ``accelerate launch`` (or torchrun) asking for more GPU processes than this machine has GPUs, refuse
    before any work: each process would otherwise train alone on the CPU, all writing one output folder."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world <= 1 or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return
    gpus = torch.cuda.device_count()
    if gpus < local:
        raise ConfigError(
            f"launched as {world} processes ({local} on this machine), but this machine has "
            f"{gpus or 'no'} GPU{'s' if gpus != 1 else ''}: each process would train alone on "
            f"{'the CPU' if not gpus else 'a shared GPU'}. Run `python -m memzoo.train ...` without accelerate launch "
            f"on a CPU, or pass --num_processes {max(gpus, 1)} (or a launch config for {gpus or 'no'} GPUs)")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _prepare_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Tokenize a corpus into {train,val}.bin + meta.json "
                                "(train with --data.source prepared:OUT)")
    p.add_argument("--source", default="pydoc", help="pydoc | stdlib-code | file:GLOB | hf:NAME[:SPLIT]")
    p.add_argument("--tokenizer", default="byte", help="byte | bpe:PATH | train:VOCAB")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--text-field", default="text")
    p.add_argument("--decode-errors", default="replace", choices=DECODE_ERRORS,
                   help="bytes that are not UTF-8: replace them (one warning with their count) or fail naming the file")
    return p


def prepare_main(argv: Sequence[str] | None = None, prog: str = "memzoo-prepare") -> int:
    from .data import prepare

    a = _prepare_parser(prog).parse_args(argv)
    if not 0 < a.val_fraction < 1:
        print(f"{prog}: error: --val-fraction must be in (0, 1), got {a.val_fraction}", file=sys.stderr)
        return 2
    meta = prepare(a.source, a.tokenizer, a.out, val_fraction=a.val_fraction, text_field=a.text_field,
                   decode_errors=a.decode_errors)
    print(f"{a.out}: {meta['tokens']['train']:,} train + {meta['tokens']['val']:,} val tokens "
          f"({meta['dtype']}, {meta['tokenizer']['type']} vocab {meta['tokenizer']['vocab_size']})")
    return 0


def _plot_main(argv: Sequence[str]) -> int:
    from .plot import plot_runs

    p = argparse.ArgumentParser(prog="memzoo-train plot", description="Draw loss curves of runs to a PNG")
    p.add_argument("runs", nargs="+", help="run directories (holding metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG path (default: RUN/loss.png for one run, ./loss.png otherwise)")
    p.add_argument("--metric", action="append", default=None, help="metric name(s); default loss/train, loss/val")
    p.add_argument("--x", default="step", choices=("step", "tokens_seen"))
    a = p.parse_args(argv)
    path = plot_runs(a.runs, a.out, metrics=a.metric or ("loss/train", "loss/val"), x=a.x)
    print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plot":
        return _plot_main(argv[1:])
    if argv and argv[0] == "prepare":
        return prepare_main(argv[1:], prog="memzoo-train prepare")
    if argv and argv[0] == "presets":
        for name, fn in sorted(train_presets().items()):
            c = fn()
            print(f"{name:<26} model d={c.model.d_model} L={c.model.n_layers} {'/'.join(c.model.pattern)}  "
                  f"seq {c.data.seq_len}  {c.train.max_steps} steps  precision {c.train.precision}")
        return 0
    if any(a in ("-h", "--help") for a in argv):
        print(_usage())
        return 0
    try:
        check_launch()
        cfg, print_only = parse_train_args(argv)
        check_paths(cfg)
        print(cfg.to_json())
        if print_only:
            return 0
        from .loop import train

        train(cfg)
    except ConfigError as e:
        # Under a launcher every process fails alike; one message is enough.
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"memzoo-train: error: {e}", file=sys.stderr)
        return 2
    return 0
