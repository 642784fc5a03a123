"""``python -m memzoo``: what this install holds (mixers, wrappers, both preset sets, optional backends)."""

from __future__ import annotations

import importlib.util
import inspect

import torch

import memzoo
from memzoo.kernels import MIN_TRITON, triton_available, triton_version
from memzoo.models.wrappers.base import WRAPPERS


def _first_line(fn) -> str:
    # Presets built with functools.partial carry partial's docstring, not a description.
    doc = fn.__doc__ if inspect.isfunction(fn) and fn.__doc__ else ""
    return doc.strip().splitlines()[0] if doc else ""


def _millions(cfg: memzoo.ModelConfig) -> float:
    # The meta device counts parameters without allocating them.
    with torch.device("meta"):
        return memzoo.build_model(cfg).num_parameters() / 1e6


def main() -> None:
    from memzoo.train import train_presets

    print(f"memzoo {memzoo.__version__} (torch {torch.__version__}, CUDA available: {torch.cuda.is_available()})")
    print("mixers:   " + ", ".join(f"{name} ({cls.__name__})" for name, cls in sorted(memzoo.MIXERS.items())))
    print("wrappers: " + ", ".join(f"{name} ({cls.__name__})" for name, cls in sorted(WRAPPERS.items()))
          + '; block FFN slot: dkvb (DiscreteKVBottleneck, ModelConfig(ffn="dkvb"))')
    print('model presets: model shapes, <mixer>-<size> (memzoo.build_model("attention-tiny"), '
          "memzoo-train --model.preset NAME)")
    for name, fn in sorted(memzoo.PRESETS.items()):
        cfg = fn()
        about = _first_line(fn) or f"{cfg.n_layers} x {cfg.d_model}, pattern {'+'.join(cfg.pattern)}"
        print(f"  {name:<18} {_millions(cfg):8.2f}M params   {about}")
    print("training presets: recipes (data, optimizer, steps and a model), <size>-<mixer> "
          "(memzoo-train --preset NAME)")
    for name, fn in sorted(train_presets().items()):
        cfg = fn()
        m = cfg.model
        print(f"  {name:<22} {_millions(m):8.2f}M params   {m.n_layers} x {m.d_model} {'+'.join(m.pattern)}, "
              f"seq {cfg.data.seq_len}, {cfg.train.max_steps} steps")
    optional = {"triton": triton_available(), "flash_attn": importlib.util.find_spec("flash_attn") is not None}
    line = "optional: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in optional.items())
    if triton_version() is not None and not triton_available():
        line += f" (triton {triton_version()} is older than {'.'.join(map(str, MIN_TRITON))}: the references run)"
    print(line)


if __name__ == "__main__":
    main()
