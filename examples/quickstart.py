"""Train a small memzoo language model on text that ships with Python, then sample from it.

    python examples/quickstart.py                      # attention-tiny, 500 steps, about 28 s of CPU time
    python examples/quickstart.py --preset attention-small --steps 2000 --device cuda

Byte-level tokens (vocabulary 256), so no tokenizer files are needed; the corpus is Python's own
help topics (``pydoc_data``), so nothing is downloaded.  This is a plain PyTorch loop for a first
look; ``memzoo-train`` is the full Accelerate trainer.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import memzoo  # noqa: E402


def corpus_bytes() -> torch.Tensor:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="attention-tiny", choices=sorted(memzoo.PRESETS))
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    data = corpus_bytes()
    split = int(0.95 * len(data))
    train, val = data[:split], data[split:]
    model = memzoo.build_model(args.preset).to(args.device)
    if model.config.vocab_size < 256:
        raise SystemExit(f"--preset {args.preset} has vocab_size {model.config.vocab_size}; bytes need 256")
    print(f"{args.preset}: {model.num_parameters() / 1e6:.2f}M parameters, corpus {len(data) / 1e6:.2f}M bytes")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / args.steps))))

    def batch(source: torch.Tensor) -> torch.Tensor:
        starts = torch.randint(0, len(source) - args.seq_len, (args.batch_size,))
        return torch.stack([source[s:s + args.seq_len] for s in starts.tolist()]).to(args.device)

    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x = batch(train)
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            with torch.no_grad():
                model.eval()
                xv = batch(val)
                val_loss = model(xv, labels=xv).loss.item()
                model.train()
            print(f"step {step:5d}  train {loss.item():.3f}  val {val_loss:.3f} nats/byte  "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)

    prompt = torch.tensor([list(b"The ")], device=args.device)
    out = model.eval().generate(prompt, max_new_tokens=200, temperature=0.8, top_k=40)
    print("---\n" + bytes(out[0].tolist()).decode("utf-8", errors="replace"))


if __name__ == "__main__":
    main()
