"""Recognition, recall and retention of few-shot memories, in weights and in context.

"Recognition, recall, and retention of few-shot memories in large language models" (Orhan, 2023,
arXiv 2303.17557).  A model studies items (natural sentences, or random token strings of the same
length as a no-structure control) and is probed with

- **recognition**: a two-alternative forced choice between a studied item and a matched novel one,
  decided by the model's mean per-token loss (the lower loss is the model's "seen it" choice);
- **recall**: given a cue (the first ``cue_fraction`` of a studied item), the greedy continuation
  is compared with the rest of the item (exact match and token accuracy);
- **retention**: both probes, repeated while training continues on new items.

Two modes.  ``weights``: fine-tune on a study set in which every item appears ``k`` times (``k`` in
``exposures``), probe, then keep training on new items and probe every ``probe_every`` updates.
``context``: the study items are placed in the context, then a distractor span of ``D`` tokens
(``distractors``), then the probes: what each memory layer keeps at test time, without any update.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MemorizeConfig", "Materials", "make_materials", "two_afc", "recall_scores", "item_losses",
           "LMAdapter", "run_weights", "run_context", "run_memorize"]

MODES = ("weights", "context")
MATERIALS = ("sentences", "random")


@dataclass(frozen=True)
class MemorizeConfig:
    mode: str = "weights"
    materials: tuple[str, ...] = MATERIALS
    # Tokens per item (natural items are sentences cut to this length; random items have it).
    item_len: int = 32
    # Studied items per run (and as many matched novel foils).
    n_items: int = 32
    # weights mode: how many times each item is studied, one fresh model per value.
    exposures: tuple[int, ...] = (1, 3, 10)
    # weights mode: updates on new items after the study phase, and the probe interval.
    retention_updates: int = 200
    probe_every: int = 20
    # Updates of plain language-model training on the corpus (never on study or foil items) before the study.
    pretrain_steps: int = 0
    pretrain_len: int = 128
    batch_size: int = 8
    lr: float = 1e-3
    # Fraction of an item given as the recall cue.
    cue_fraction: float = 0.5
    # context mode: items per trial placed in the context, and distractor lengths in tokens.
    items_per_trial: int = 4
    distractors: tuple[int, ...] = (0, 64, 256)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("materials", "exposures", "distractors"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.materials or any(m not in MATERIALS for m in self.materials):
            raise ValueError(f"materials must be a non-empty subset of {MATERIALS}, got {self.materials}")
        for name in ("item_len", "n_items", "batch_size", "probe_every", "items_per_trial", "pretrain_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.item_len < 4:
            raise ValueError(f"item_len must be >= 4 (a cue and a continuation), got {self.item_len}")
        if self.retention_updates < 0 or self.pretrain_steps < 0:
            raise ValueError("retention_updates and pretrain_steps must be >= 0")
        if not self.exposures or any(k < 1 for k in self.exposures):
            raise ValueError(f"exposures must be integers >= 1, got {self.exposures}")
        if not self.distractors or any(d < 0 for d in self.distractors):
            raise ValueError(f"distractors must be lengths >= 0, got {self.distractors}")
        if not 0.0 < self.cue_fraction < 1.0:
            raise ValueError(f"cue_fraction must be in (0, 1), got {self.cue_fraction}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    @property
    def cue_len(self) -> int:
        return max(1, min(self.item_len - 1, round(self.item_len * self.cue_fraction)))


# ---------------------------------------------------------------------------------------------- scorers


def two_afc(loss_studied: Tensor, loss_novel: Tensor) -> float:
    """Share of pairs in which the studied item has the lower loss (a tie counts one half)."""
    if loss_studied.shape != loss_novel.shape or loss_studied.numel() == 0:
        raise ValueError(f"loss_studied and loss_novel must be non-empty and of one shape, got "
                         f"{tuple(loss_studied.shape)} and {tuple(loss_novel.shape)}")
    wins = (loss_studied < loss_novel).float() + 0.5 * (loss_studied == loss_novel).float()
    return wins.mean().item()


def recall_scores(generated: Tensor, target: Tensor) -> tuple[float, float]:
    """(exact match, token accuracy) of greedy continuations ``[N, L]`` against the items' rest ``[N, L]``."""
    if generated.shape != target.shape or generated.dim() != 2 or generated.numel() == 0:
        raise ValueError(f"generated and target must be non-empty [N, L] of one shape, got "
                         f"{tuple(generated.shape)} and {tuple(target.shape)}")
    same = generated == target
    return same.all(-1).float().mean().item(), same.float().mean().item()


def item_losses(logits: Tensor, ids: Tensor, start: int) -> Tensor:
    """Mean next-token loss of each row's tokens ``ids[:, start:]`` under ``logits`` ``[N, T, V]``.

    ``logits[:, t]`` predicts ``ids[:, t + 1]``; ``start >= 1`` (the first token has no prediction).
    """
    if not 1 <= start < ids.shape[1]:
        raise ValueError(f"start must be in [1, {ids.shape[1] - 1}], got {start}")
    pred = logits[:, start - 1:-1].float()
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids[:, start:].reshape(-1), reduction="none")
    return nll.view(ids.shape[0], -1).mean(-1)


class LMAdapter:
    """One interface over a memzoo ``LanguageModel`` and a transformers causal LM: logits, loss, greedy."""

    def __init__(self, model: nn.Module, batch_size: int = 32) -> None:
        self.model = model
        self.batch_size = batch_size
        self.is_hf = hasattr(model, "generation_config") and not hasattr(model, "step")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logits(self, ids: Tensor) -> Tensor:
        kw = {"use_cache": False} if self.is_hf else {}
        return self.model(ids.to(self.device), **kw).logits

    def loss(self, ids: Tensor) -> Tensor:
        kw = {"use_cache": False} if self.is_hf else {}
        ids = ids.to(self.device)
        return self.model(ids, labels=ids, **kw).loss

    @torch.no_grad()
    def item_losses(self, ids: Tensor, start: int) -> Tensor:
        return torch.cat([item_losses(self.logits(c), c.to(self.device), start).cpu()
                          for c in ids.split(self.batch_size)])

    @torch.no_grad()
    def greedy(self, ids: Tensor, n: int) -> Tensor:
        out = []
        for chunk in ids.split(self.batch_size):
            chunk = chunk.to(self.device)
            if self.is_hf:
                seq = self.model.generate(chunk, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                          attention_mask=torch.ones_like(chunk),
                                          pad_token_id=self.model.generation_config.pad_token_id or 0)
            else:
                seq = self.model.generate(chunk, n)
            out.append(seq[:, chunk.shape[1]:chunk.shape[1] + n].cpu())
        return torch.cat(out)


# -------------------------------------------------------------------------------------------- materials


@dataclass
class Materials:
    """Token tensors for one material: studied items, matched novel foils, and a pool of new items."""

    name: str
    studied: Tensor  # [n_items, item_len]
    novel: Tensor  # [n_items, item_len]
    new: Tensor  # [n_new, item_len]: retention training and context distractors
    corpus: Tensor = field(repr=False)  # 1-D tokens for pretraining (sentences not used as items)


def _sentences(text: str) -> list[str]:
    flat = re.sub(r"\s+", " ", text)
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat) if s.strip()]


def make_materials(tokenizer: Any, cfg: MemorizeConfig, n_new: int, corpus_text: str | None = None
                   ) -> dict[str, Materials]:
    """Studied, novel and new items for every material in ``cfg``, from one seeded draw.

    Natural items are sentences of the corpus (Python's own help topics unless ``corpus_text`` is
    given) with at least ``item_len`` tokens, cut to ``item_len``; studied, novel and new items are
    disjoint draws from the same pool, so they share one distribution.  Random items draw every
    token uniformly from the tokens the pool's items use (printable bytes for the byte tokenizer).
    """
    if corpus_text is None:
        from ..train.data import iter_documents

        corpus_text = "\n".join(iter_documents("pydoc"))
    sentences = _sentences(corpus_text)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(sentences), generator=gen).tolist()
    need = 2 * cfg.n_items + n_new
    items, rest = [], []
    for i in order:
        ids = [int(t) for t in tokenizer.encode(sentences[i])]
        if len(ids) >= cfg.item_len and len(items) < need:
            items.append(ids[:cfg.item_len])
        else:
            rest.append(ids)
    if len(items) < need:
        raise ValueError(f"item_len {cfg.item_len}: the corpus has only {len(items)} sentences that long, "
                         f"{need} needed (n_items x 2 + new items); lower item_len or n_items")
    pool = torch.tensor(items, dtype=torch.long)
    corpus = torch.tensor([t for s in rest for t in s], dtype=torch.long)
    out = {}
    n = cfg.n_items
    if "sentences" in cfg.materials:
        out["sentences"] = Materials("sentences", pool[:n], pool[n:2 * n], pool[2 * n:], corpus)
    if "random" in cfg.materials:
        alphabet = torch.unique(pool)
        draw = alphabet[torch.randint(len(alphabet), (need, cfg.item_len), generator=gen)]
        out["random"] = Materials("random", draw[:n], draw[n:2 * n], draw[2 * n:], corpus)
    return out


# --------------------------------------------------------------------------------------------- protocol


def _probe(lm: LMAdapter, mat: Materials, cfg: MemorizeConfig) -> dict[str, float]:
    was_training = lm.model.training
    lm.model.eval()
    ls, ln = lm.item_losses(mat.studied, 1), lm.item_losses(mat.novel, 1)
    gen = lm.greedy(mat.studied[:, :cfg.cue_len], cfg.item_len - cfg.cue_len)
    exact, tok = recall_scores(gen, mat.studied[:, cfg.cue_len:])
    lm.model.train(was_training)
    return {"recognition": two_afc(ls, ln), "recall_exact": exact, "recall_token_acc": tok,
            "loss_studied": ls.mean().item(), "loss_novel": ln.mean().item()}


def _train_on(lm: LMAdapter, opt: torch.optim.Optimizer, batch: Tensor) -> float:
    lm.model.train()
    loss = lm.loss(batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def pretrain(lm: LMAdapter, corpus: Tensor, cfg: MemorizeConfig, progress: Callable[[str], None] | None = None
             ) -> list[float]:
    """``cfg.pretrain_steps`` updates of next-token training on random windows of ``corpus`` (no items)."""
    if cfg.pretrain_steps == 0:
        return []
    if corpus.numel() <= cfg.pretrain_len:
        raise ValueError(f"pretrain_len {cfg.pretrain_len}: the corpus left after the items has only "
                         f"{corpus.numel()} tokens")
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(lm.model.parameters(), lr=cfg.lr)
    losses = []
    for step in range(cfg.pretrain_steps):
        starts = torch.randint(corpus.numel() - cfg.pretrain_len, (cfg.batch_size,), generator=gen)
        batch = torch.stack([corpus[s:s + cfg.pretrain_len] for s in starts.tolist()])
        losses.append(_train_on(lm, opt, batch))
        if progress is not None and (step + 1) % max(1, cfg.pretrain_steps // 10) == 0:
            progress(f"pretrain {step + 1}/{cfg.pretrain_steps} loss {losses[-1]:.3f}")
    return losses


def run_weights(lm: LMAdapter, materials: dict[str, Materials], cfg: MemorizeConfig,
                progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The weights protocol: for each material and exposure count, study, probe, then retention probes.

    Every (material, k) starts from a copy of ``lm.model`` as given.  Returns one row per probe with
    ``material, exposures, phase ("before" | "study" | "retention"), update`` and the probe's scores.
    """
    rows: list[dict[str, Any]] = []
    base = copy.deepcopy(lm.model.state_dict())
    for name, mat in materials.items():
        lm.model.load_state_dict(base)
        rows.append({"material": name, "exposures": 0, "phase": "before", "update": 0, **_probe(lm, mat, cfg)})
        for k in cfg.exposures:
            lm.model.load_state_dict(base)
            opt = torch.optim.AdamW(lm.model.parameters(), lr=cfg.lr)
            gen = torch.Generator().manual_seed(cfg.seed + 100 * k)
            updates = 0
            for _ in range(k):
                for idx in torch.randperm(len(mat.studied), generator=gen).split(cfg.batch_size):
                    _train_on(lm, opt, mat.studied[idx])
                    updates += 1
            rows.append({"material": name, "exposures": k, "phase": "study", "update": 0,
                         "study_updates": updates, **_probe(lm, mat, cfg)})
            new = mat.new[torch.randperm(len(mat.new), generator=gen)]
            for u in range(1, cfg.retention_updates + 1):
                s = ((u - 1) * cfg.batch_size) % max(1, len(new) - cfg.batch_size + 1)
                _train_on(lm, opt, new[s:s + cfg.batch_size])
                if u % cfg.probe_every == 0:
                    rows.append({"material": name, "exposures": k, "phase": "retention", "update": u,
                                 **_probe(lm, mat, cfg)})
            last = rows[-1]
            if progress is not None:
                progress(f"{name} k={k}: recognition {last['recognition']:.2f} recall {last['recall_exact']:.2f} "
                         f"after {last['update']} retention updates")
    lm.model.load_state_dict(base)
    return rows


@torch.no_grad()
def run_context(lm: LMAdapter, materials: dict[str, Materials], cfg: MemorizeConfig,
                progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The context protocol: study items in the context, a distractor of ``D`` tokens, then the probes.

    Trials group ``items_per_trial`` studied items; each studied item is probed once, after its own
    trial's study list and distractor (new items, cut to ``D`` tokens).  Recognition compares the loss
    of the studied item and of its matched foil at the probe position; recall continues the cue.
    """
    lm.model.eval()
    rows = []
    m = cfg.items_per_trial
    for name, mat in materials.items():
        n = (len(mat.studied) // m) * m
        if n == 0:
            raise ValueError(f"items_per_trial {m} exceeds n_items {len(mat.studied)}")
        studied, novel = mat.studied[:n], mat.novel[:n]
        distractor_pool = mat.new.reshape(-1) if name == "sentences" else materials.get(
            "sentences", mat).new.reshape(-1)
        for D in cfg.distractors:
            if D > distractor_pool.numel():
                raise ValueError(f"distractor {D} is longer than the {distractor_pool.numel()} new-item tokens")
            contexts = []
            for j in range(n):
                trial = studied[(j // m) * m:(j // m) * m + m].reshape(-1)
                start = (j * 7919) % max(1, distractor_pool.numel() - D + 1)
                contexts.append(torch.cat([trial, distractor_pool[start:start + D]]))
            ctx = torch.stack(contexts)  # [n, m * item_len + D]
            L = ctx.shape[1]
            ls = lm.item_losses(torch.cat([ctx, studied], 1), L + 1)
            ln = lm.item_losses(torch.cat([ctx, novel], 1), L + 1)
            gen = lm.greedy(torch.cat([ctx, studied[:, :cfg.cue_len]], 1), cfg.item_len - cfg.cue_len)
            exact, tok = recall_scores(gen, studied[:, cfg.cue_len:])
            rows.append({"material": name, "distractor": D, "context_len": L, "recognition": two_afc(ls, ln),
                         "recall_exact": exact, "recall_token_acc": tok, "loss_studied": ls.mean().item(),
                         "loss_novel": ln.mean().item(), "n": n})
            if progress is not None:
                progress(f"{name} D={D}: recognition {rows[-1]['recognition']:.2f} recall {exact:.2f}")
    return rows


def run_memorize(lm: LMAdapter, tokenizer: Any, cfg: MemorizeConfig, progress: Callable[[str], None] | None = None,
                 corpus_text: str | None = None) -> dict[str, Any]:
    """Materials, optional pretraining, then the ``cfg.mode`` protocol; returns rows and pretraining losses."""
    n_new = max(cfg.retention_updates * cfg.batch_size, 64) if cfg.mode == "weights" else max(
        64, math.ceil(max(cfg.distractors, default=0) / cfg.item_len) + 8)
    n_new = min(n_new, 4096)
    materials = make_materials(tokenizer, cfg, n_new, corpus_text)
    losses = pretrain(lm, next(iter(materials.values())).corpus, cfg, progress)
    run = run_weights if cfg.mode == "weights" else run_context
    return {"rows": run(lm, materials, cfg, progress), "pretrain_loss": losses[-1:] and losses[-1],
            "config": asdict(cfg)}


def summary_lines(rows: Sequence[dict[str, Any]], mode: str) -> list[str]:
    """One line per material and exposure (weights: after study and at the last probe) or distractor."""
    lines = []
    for r in rows:
        if mode == "context":
            lines.append(f"{r['material']:<10} D={r['distractor']:<5} recognition {r['recognition']:.3f}  "
                         f"recall exact {r['recall_exact']:.3f} token {r['recall_token_acc']:.3f}")
        elif r["phase"] in ("before", "study"):
            lines.append(f"{r['material']:<10} k={r['exposures']:<3} {r['phase']:<7} recognition "
                         f"{r['recognition']:.3f}  recall exact {r['recall_exact']:.3f} "
                         f"token {r['recall_token_acc']:.3f}")
    return lines
