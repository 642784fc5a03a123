"""LongMem on CPU in a few minutes: recall a fact placed several segments back through the memory bank.

    python examples/longmem_recall.py                    # prints both runs' query accuracy and loss
    python examples/longmem_recall.py --out results.json

1. Pretrain a tiny attention ``LanguageModel`` on in-segment key-value recall: a segment lists facts
   ``k v`` and later repeats the keys; the model must emit each key's value.
2. Freeze it and wrap it in ``LongMem``.  Streams put the facts in segment 0, ``--gap`` filler segments
   after it, and the queries in the last segment, so the backbone's local context never holds the facts.
3. Train the SideNet twice with the same data and steps: with memory, and with the memory layer's gate
   forced to 0 (``use_memory=False``, the same parameters reading nothing).  Report query accuracy and
   loss on held-out streams, the learned gates and the memory mass.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memzoo.models import LanguageModel, ModelConfig  # noqa: E402
from memzoo.models.wrappers import LongMem, LongMemConfig  # noqa: E402

IGNORE = -100


class Task:
    """Token layout: keys [0, n_keys), values [n_keys, n_keys + n_values), filler above."""

    def __init__(self, n_keys: int, n_values: int, n_filler: int, n_facts: int, segment_len: int) -> None:
        self.n_keys, self.n_values, self.n_facts, self.S = n_keys, n_values, n_facts, segment_len
        self.filler0, self.vocab = n_keys + n_values, n_keys + n_values + n_filler
        if 4 * n_facts > segment_len:
            raise ValueError("segment_len must hold the facts and the queries (4 * n_facts tokens)")

    def facts(self, B: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        keys = torch.rand(B, self.n_keys, generator=g).argsort(-1)[:, :self.n_facts]  # distinct keys per row
        values = self.n_keys + torch.randint(0, self.n_values, (B, self.n_facts), generator=g)
        return keys, values

    def filler(self, B: int, T: int, g: torch.Generator) -> torch.Tensor:
        return self.filler0 + torch.randint(0, self.vocab - self.filler0, (B, T), generator=g)

    def pairs(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return torch.stack((keys, values), -1).flatten(1)  # [B, 2 n_facts]: k1 v1 k2 v2 ...

    def in_segment(self, B: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone pretraining: facts, filler, then the keys again in a new order (answers labelled)."""
        keys, values = self.facts(B, g)
        order = torch.rand(B, self.n_facts, generator=g).argsort(-1)
        ids = self.filler(B, self.S, g)
        f = 2 * self.n_facts
        ids[:, :f] = self.pairs(keys, values)
        start = f + int(torch.randint(0, self.S - 2 * f + 1, (1,), generator=g))
        ids[:, start:start + f] = self.pairs(keys.gather(1, order), values.gather(1, order))
        labels = torch.full_like(ids, IGNORE)
        labels[:, start + 1:start + f:2] = ids[:, start + 1:start + f:2]
        return ids, labels

    def stream(self, B: int, gap: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Facts in segment 0, ``gap`` filler segments, queries at the start of the last segment."""
        keys, values = self.facts(B, g)
        order = torch.rand(B, self.n_facts, generator=g).argsort(-1)
        n_seg = gap + 2
        ids = self.filler(B, n_seg * self.S, g)
        f = 2 * self.n_facts
        ids[:, :f] = self.pairs(keys, values)
        q0 = (n_seg - 1) * self.S
        ids[:, q0:q0 + f] = self.pairs(keys.gather(1, order), values.gather(1, order))
        labels = torch.full_like(ids, IGNORE)
        labels[:, q0 + 1:q0 + f:2] = ids[:, q0 + 1:q0 + f:2]
        return ids, labels


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Query accuracy and mean cross-entropy at the labelled positions (labels are shifted as in the model)."""
    pred, target = logits[:, :-1], labels[:, 1:]
    mask = target != IGNORE
    loss = torch.nn.functional.cross_entropy(pred[mask].float(), target[mask])
    return float((pred.argmax(-1)[mask] == target[mask]).float().mean()), float(loss)


def pretrain_backbone(task: Task, args: argparse.Namespace) -> tuple[LanguageModel, dict]:
    torch.manual_seed(args.seed)
    cfg = ModelConfig(vocab_size=task.vocab, d_model=args.d_model, n_layers=args.n_layers,
                      mixers={"attention": {"n_heads": args.n_heads}}, d_ff=2 * args.d_model)
    model = LanguageModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(args.seed + 1)
    bar = tqdm(range(args.backbone_steps), desc="pretrain backbone", leave=False)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 100)
        ids, labels = task.in_segment(args.batch_size, g)
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        ids, labels = task.in_segment(512, torch.Generator().manual_seed(10_000))
        acc, loss = accuracy(model(ids).logits, labels)
        # The same backbone on the long-range streams: the facts are outside its segment.
        ids, labels = task.stream(512, args.gap, torch.Generator().manual_seed(10_001))
        out = [model(x).logits for x in ids.split(task.S, dim=1)]
        stream_acc, stream_loss = accuracy(torch.cat(out, 1), labels)
    return model, {"in_segment_acc": acc, "in_segment_loss": loss, "stream_acc_local": stream_acc,
                   "stream_loss_local": stream_loss}


def train_side(backbone: LanguageModel, task: Task, args: argparse.Namespace, use_memory: bool) -> dict:
    torch.manual_seed(args.seed + 2)
    config = LongMemConfig(segment_len=task.S, capacity=args.capacity, chunk_size=args.chunk_size,
                           n_chunks=args.n_chunks, use_memory=use_memory)
    model = LongMem(backbone, config)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=args.side_lr, betas=(0.9, 0.98), weight_decay=0.01)
    g = torch.Generator().manual_seed(args.seed + 3)
    name = "SideNet + memory" if use_memory else "SideNet, gate 0"
    model.train()
    bar = tqdm(range(args.side_steps), desc=name, leave=False)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = args.side_lr * min(1.0, (step + 1) / 50)
        ids, labels = task.stream(args.batch_size, args.gap, g)
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        ids, labels = task.stream(512, args.gap, torch.Generator().manual_seed(10_001))
        logits = torch.cat([model(i).logits for i in ids.split(128)], 0)
        acc, loss = accuracy(logits, labels)
        stats = model.memory_stats()
        gate = torch.sigmoid(model.side.memory_attention.gate).tolist()
    return {"query_acc": acc, "query_loss": loss, "gate_sigmoid": gate, **stats}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--segment-len", type=int, default=32)
    p.add_argument("--gap", type=int, default=3, help="filler segments between the facts and the queries")
    p.add_argument("--n-facts", type=int, default=4)
    p.add_argument("--n-keys", type=int, default=16)
    p.add_argument("--n-values", type=int, default=16)
    p.add_argument("--n-filler", type=int, default=32)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--backbone-steps", type=int, default=1500)
    p.add_argument("--side-steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--side-lr", type=float, default=1e-2)
    p.add_argument("--capacity", type=int, default=256)
    # A fact "k v" sits at an even offset, so a chunk of 2 tokens is one fact (the paper: small chunks suit
    # fine-grained recall).
    p.add_argument("--chunk-size", type=int, default=2)
    p.add_argument("--n-chunks", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    task = Task(args.n_keys, args.n_values, args.n_filler, args.n_facts, args.segment_len)
    backbone, bb = pretrain_backbone(task, args)
    print(f"backbone: in-segment query acc {bb['in_segment_acc']:.3f} (loss {bb['in_segment_loss']:.3f}); "
          f"on the streams, segment by segment: acc {bb['stream_acc_local']:.3f}")
    results = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "backbone": bb}
    for use_memory in (True, False):
        r = train_side(backbone, task, args, use_memory)
        results["memory" if use_memory else "no_memory"] = r
        label = "with memory   " if use_memory else "without memory"
        gate = [round(x, 3) for x in r["gate_sigmoid"]] if use_memory else "forced to 0"
        print(f"SideNet {label}: query acc {r['query_acc']:.3f}, loss {r['query_loss']:.3f}, "
              f"sigma(gate) {gate}, memory mass {r['memory_mass']:.3f}")
    results["chance"] = 1 / args.n_values
    results["seconds"] = round(time.time() - t0, 1)
    print(f"chance {results['chance']:.3f}; {results['seconds']} s")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
