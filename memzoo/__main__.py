"""``python -m memzoo``: what this install holds (mixers, presets, optional backends)."""

from __future__ import annotations

import importlib.util

import torch

import memzoo
from memzoo.kernels import triton_available


def main() -> None:
    print(f"memzoo {memzoo.__version__} (torch {torch.__version__}, CUDA available: {torch.cuda.is_available()})")
    print("mixers:  " + ", ".join(sorted(memzoo.MIXERS)))
    print("presets:")
    for name, fn in sorted(memzoo.PRESETS.items()):
        # The meta device counts parameters without allocating them.
        with torch.device("meta"):
            n = memzoo.build_model(fn()).num_parameters()
        print(f"  {name:<18} {n / 1e6:8.2f}M params   {(fn.__doc__ or '').strip().splitlines()[0]}")
    optional = {"triton": triton_available(), "flash_attn": importlib.util.find_spec("flash_attn") is not None}
    print("optional: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in optional.items()))


if __name__ == "__main__":
    main()
