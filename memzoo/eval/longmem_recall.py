"""LongMem recall on a CPU: a fact placed several segments back, reachable only through the memory bank.

LongMem (Augmenting Language Models with Long-Term Memory, arXiv 2306.07174) caches a frozen backbone's keys
and values in a bank that a trainable SideNet reads.  The experiment, one seed end to end:

1. Pretrain a small attention ``LanguageModel`` on in-segment key-value recall: a segment lists facts ``k v``
   and later repeats the keys; the model must emit each key's value.
2. Freeze it and wrap it in ``LongMem``.  Streams put the facts in segment 0, ``gap`` filler segments after it
   and the queries in the last segment, so the backbone's local context never holds the facts.
3. Train the SideNet twice with the same data and steps: with memory, and with the memory layer's gate forced
   to 0 (``use_memory=False``, the same parameters reading nothing).  Score query accuracy and loss on held-out
   streams, the learned gates and the memory mass.

``run_longmem_recall`` returns both arms in one record: they share the pretrained backbone, which is what makes
them a pair.  ``examples/longmem_recall.py`` is its command line; ``memzoo-bench report`` runs it per seed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from memzoo.models import LanguageModel, ModelConfig
from memzoo.models.wrappers import LongMem, LongMemConfig

__all__ = ["LongMemRecallConfig", "Task", "accuracy", "pretrain_backbone", "train_side", "run_longmem_recall", "ARMS",
           "arm_metrics"]

IGNORE = -100
# Linear warm-up of the learning rate, in steps.
BACKBONE_WARMUP, SIDE_WARMUP = 100, 50
# Seeds of the held-out data (fixed, so every seed of a study is scored on the same streams).
IN_SEGMENT_EVAL_SEED, STREAM_EVAL_SEED = 10_000, 10_001


@dataclass(frozen=True)
class LongMemRecallConfig:
    """The task, the backbone and the LongMem SideNet; defaults are the CPU demonstration of docs/longmem.md."""

    # Tokens per segment: the backbone's context and LongMem's segment.
    segment_len: int = 32
    # Filler segments between the facts (segment 0) and the queries (the last segment).
    gap: int = 3
    # Facts ``k v`` per stream; a segment must hold them and their queries (4 * n_facts tokens).
    n_facts: int = 4
    n_keys: int = 16
    n_values: int = 16
    n_filler: int = 32
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    batch_size: int = 32
    backbone_steps: int = 1500
    side_steps: int = 400
    # Peak learning rates of the backbone's pretraining and of the SideNet.
    lr: float = 3e-3
    side_lr: float = 1e-2
    # Bank tokens per row.
    capacity: int = 256
    # A fact "k v" sits at an even offset, so a chunk of 2 tokens is one fact (the paper: small chunks suit
    # fine-grained recall).
    chunk_size: int = 2
    n_chunks: int = 8
    # Held-out streams (and in-segment examples) scored per arm.
    eval_streams: int = 512

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool)):
                raise TypeError(f"LongMemRecallConfig.{f.name} must be an int, got {value!r}")
            if f.type == "float" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise TypeError(f"LongMemRecallConfig.{f.name} must be a number, got {value!r}")
            low = 0 if f.name == "gap" else 1
            if f.type == "int" and value < low:
                raise ValueError(f"LongMemRecallConfig.{f.name} must be >= {low}, got {value}")
            if f.type == "float" and not value > 0:
                raise ValueError(f"LongMemRecallConfig.{f.name} must be > 0, got {value}")
        if self.n_facts > self.n_keys:
            raise ValueError(f"LongMemRecallConfig.n_facts={self.n_facts} must be <= n_keys={self.n_keys} "
                             "(the facts of a stream have distinct keys)")
        if 4 * self.n_facts > self.segment_len:
            raise ValueError(f"LongMemRecallConfig.segment_len={self.segment_len} must hold the facts and the "
                             f"queries: >= 4 * n_facts = {4 * self.n_facts}")
        if self.d_model % self.n_heads:
            raise ValueError(f"LongMemRecallConfig.d_model={self.d_model} must be a multiple of "
                             f"n_heads={self.n_heads}")
        # The SideNet's own checks (chunk_size dividing segment_len and capacity), before any training.
        self.longmem_config(use_memory=True)

    def task(self) -> Task:
        return Task(self.n_keys, self.n_values, self.n_filler, self.n_facts, self.segment_len)

    def longmem_config(self, use_memory: bool) -> LongMemConfig:
        return LongMemConfig(segment_len=self.segment_len, capacity=self.capacity, chunk_size=self.chunk_size,
                             n_chunks=self.n_chunks, use_memory=use_memory)


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


def _fit(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
         steps: int, peak_lr: float, warmup: int, *, show_every: int, device: str | torch.device, progress: bool,
         desc: str) -> None:
    """``steps`` optimizer steps on ``batch()`` with a linear warm-up to ``peak_lr``; the bar shows the loss of every
    ``show_every``-th step."""
    bar = tqdm(range(steps), desc=desc, leave=False, disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = peak_lr * min(1.0, (step + 1) / warmup)
        ids, labels = (t.to(device) for t in batch())
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % show_every == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")


def pretrain_backbone(task: Task, cfg: LongMemRecallConfig, seed: int, *, device: str | torch.device = "cpu",
                      progress: bool = True, desc: str = "") -> tuple[LanguageModel, dict[str, float]]:
    """Train the attention backbone on in-segment recall; score it in-segment and, segment by segment, on the
    held-out streams (where the facts are outside its context).

    Returns:
        The backbone (eval mode) and ``in_segment_acc``, ``in_segment_loss``, ``stream_acc_local``,
        ``stream_loss_local``.
    """
    torch.manual_seed(seed)
    model_cfg = ModelConfig(vocab_size=task.vocab, d_model=cfg.d_model, n_layers=cfg.n_layers,
                            mixers={"attention": {"n_heads": cfg.n_heads}}, d_ff=2 * cfg.d_model)
    model = LanguageModel(model_cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed + 1)
    _fit(model, opt, lambda: task.in_segment(cfg.batch_size, g), cfg.backbone_steps, cfg.lr, BACKBONE_WARMUP,
         show_every=50, device=device, progress=progress, desc=f"{desc}pretrain backbone")
    model.eval()
    with torch.no_grad():
        ids, labels = task.in_segment(cfg.eval_streams, torch.Generator().manual_seed(IN_SEGMENT_EVAL_SEED))
        acc, loss = accuracy(model(ids.to(device)).logits.cpu(), labels)
        ids, labels = task.stream(cfg.eval_streams, cfg.gap, torch.Generator().manual_seed(STREAM_EVAL_SEED))
        out = [model(x.to(device)).logits.cpu() for x in ids.split(task.S, dim=1)]
        stream_acc, stream_loss = accuracy(torch.cat(out, 1), labels)
    return model, {"in_segment_acc": acc, "in_segment_loss": loss, "stream_acc_local": stream_acc,
                   "stream_loss_local": stream_loss}


def train_side(backbone: LanguageModel, task: Task, cfg: LongMemRecallConfig, seed: int, use_memory: bool, *,
               device: str | torch.device = "cpu", progress: bool = True, desc: str = "") -> dict[str, Any]:
    """Train a LongMem SideNet over the frozen ``backbone`` on the streams and score it on held-out streams.

    Returns:
        ``query_acc``, ``query_loss``, ``gate_sigmoid`` (per head) and ``LongMem.memory_stats()``
        (``memory_mass`` among them).
    """
    torch.manual_seed(seed + 2)
    model = LongMem(backbone, cfg.longmem_config(use_memory)).to(device)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.side_lr, betas=(0.9, 0.98), weight_decay=0.01)
    g = torch.Generator().manual_seed(seed + 3)
    name = "SideNet + memory" if use_memory else "SideNet, gate 0"
    model.train()
    _fit(model, opt, lambda: task.stream(cfg.batch_size, cfg.gap, g), cfg.side_steps, cfg.side_lr, SIDE_WARMUP,
         show_every=25, device=device, progress=progress, desc=f"{desc}{name}")
    model.eval()
    with torch.no_grad():
        ids, labels = task.stream(cfg.eval_streams, cfg.gap, torch.Generator().manual_seed(STREAM_EVAL_SEED))
        logits = torch.cat([model(i.to(device)).logits.cpu() for i in ids.split(128)], 0)
        acc, loss = accuracy(logits, labels)
        stats = model.memory_stats()
        gate = torch.sigmoid(model.side.memory_attention.gate).tolist()
    return {"query_acc": acc, "query_loss": loss, "gate_sigmoid": gate, **stats}


def run_longmem_recall(cfg: LongMemRecallConfig, seed: int, *, device: str | torch.device = "cpu",
                       progress: bool = True, desc: str = "") -> dict[str, Any]:
    """One seed end to end: pretrain and freeze the backbone, then train the SideNet with memory and with the gate
    forced to 0 over that same backbone, on the same data and steps.

    Args:
        cfg: the task and model sizes.
        seed: seeds the backbone, the SideNet and the training data (the held-out data is fixed).
        progress: show tqdm bars; ``desc`` prefixes their labels.

    Returns:
        A JSON-ready record: ``config``, ``seed``, ``backbone`` (``pretrain_backbone``'s scores), ``memory`` and
        ``no_memory`` (``train_side``'s, per arm), ``chance`` (1 / n_values) and ``seconds`` (wall time).
    """
    if not isinstance(cfg, LongMemRecallConfig):
        raise TypeError(f"cfg must be a LongMemRecallConfig, got {type(cfg).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    t0 = time.perf_counter()
    task = cfg.task()
    backbone, bb = pretrain_backbone(task, cfg, seed, device=device, progress=progress, desc=desc)
    record: dict[str, Any] = {"config": dataclasses.asdict(cfg), "seed": seed, "backbone": bb}
    for use_memory in (True, False):
        arm = train_side(backbone, task, cfg, seed, use_memory, device=device, progress=progress, desc=desc)
        record["memory" if use_memory else "no_memory"] = arm
    record["chance"] = 1 / cfg.n_values
    record["seconds"] = round(time.perf_counter() - t0, 1)
    return record


# The arms of a ``run_longmem_recall`` record, as rows of a table: row name -> (record key, accuracy key, loss key).
ARMS = {"longmem-on": ("memory", "query_acc", "query_loss"),
        "longmem-off": ("no_memory", "query_acc", "query_loss"),
        "backbone": ("backbone", "stream_acc_local", "stream_loss_local")}


def arm_metrics(record: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per row of ``ARMS``, the held-out ``accuracy`` and ``loss`` of that arm of a ``run_longmem_recall`` record."""
    missing = [key for key, _, _ in ARMS.values() if key not in record]
    if missing:
        raise ValueError(f"record is not a run_longmem_recall record: it lacks {missing}")
    return {name: {"accuracy": record[key][acc], "loss": record[key][loss]} for name, (key, acc, loss) in ARMS.items()}
