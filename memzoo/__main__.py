"""``python -m memzoo``: what this install holds (mixers, presets, optional backends)."""

from __future__ import annotations

import importlib.util
import inspect

import torch

import memzoo
from memzoo.kernels import triton_available


def main() -> None:
    print(f"memzoo {memzoo.__version__} (torch {torch.__version__}, CUDA available: {torch.cuda.is_available()})")
    print("mixers:  " + ", ".join(sorted(memzoo.MIXERS)))
    print("presets:")
    for name, fn in sorted(memzoo.PRESETS.items()):
        cfg = fn()
        # The meta device counts parameters without allocating them.
        with torch.device("meta"):
            n = memzoo.build_model(cfg).num_parameters()
        # Presets built with functools.partial carry partial's docstring, not a description.
        doc = fn.__doc__ if inspect.isfunction(fn) and fn.__doc__ else ""
        shape = f"{cfg.n_layers} x {cfg.d_model}, pattern {'+'.join(cfg.pattern)}"
        about = doc.strip().splitlines()[0] if doc else shape
        print(f"  {name:<18} {n / 1e6:8.2f}M params   {about}")
    optional = {"triton": triton_available(), "flash_attn": importlib.util.find_spec("flash_attn") is not None}
    print("optional: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in optional.items()))


if __name__ == "__main__":
    main()
