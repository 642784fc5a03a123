"""HMT: hierarchical memory segment recurrence around any decoder backbone.

Paper: "Hierarchical Memory Transformer for (Efficient) Long Context Language Processing"
(He, Cao, Qin, Prakriya, Sun, Cong; arXiv 2405.06067).

A document is cut into segments of ``segment_len`` new tokens x_n; each segment is one backbone call:

    (1) S_n = hidden(BBM([T ; x_n[:j] ; T]))[-1]                   summary of the first j tokens
    (2) P_n = softmax((S_n W_q)(C W_k)^T / sqrt(d_h)) C             recall over the FIFO cache C of M's
    (3) sensory = embed(last k token ids of segment n-1)
    (4) h = BBM([P_n ; sensory ; x_n ; P_n]);  M_n = h[-1] -> C     logits for x_n, memory write

S_n does not depend on the recurrent state, so all summaries of a call are computed in one batched
backbone pass.  Without recall (training stage 1) P_n is the newest memory M_{n-1} (RMT with
sensory tokens).  An empty cache falls back to the learned initial memory M_0.

Backbone protocol (``memzoo.LanguageModel`` implements it): ``embed(ids) -> [B, T, D]``,
``backbone(inputs_embeds=..., state=..., output_hidden=True) -> out`` with ``out.hidden`` (final
hidden states), ``out.logits`` and ``out.state``; ``hidden_size``; ``init_state`` and ``mixers``
(``reset_state``) when ``carry_backbone_state`` is on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..contract import config_from_args
from ..lm import IGNORE_INDEX, LMOutput, check_labels, check_max_new_tokens, check_token_ids, decode_loop
from ..state import detach_state, index_state, state_batch_size, state_leaves, tree_map
from .base import Wrapper, register_wrapper

__all__ = ["HMT", "HMTConfig", "HMTState", "recall"]


@dataclass(frozen=True)
class HMTConfig:
    # New tokens per segment (the reference's augmented length L is segment_len + n_sensory + 2).
    segment_len: int = 222
    # k: token ids of the previous segment re-embedded in front of the current one.
    n_sensory: int = 32
    # N: memory embeddings kept in the FIFO cache.
    cache_size: int = 300
    # j = round(segment_len * sum_fraction) leading tokens feed the summary S_n.
    sum_fraction: float = 0.5
    # d_h of W_q, W_k; set it explicitly for small backbones (it sets the parameter overhead).
    recall_dim: int = 4096
    # False: training stage 1 (no memory search, no T / W_q / W_k parameters).
    use_recall: bool = True
    # Also carry the backbone's own recurrent state from segment to segment (off in the paper).
    carry_backbone_state: bool = False
    # Recompute each segment's main pass in backward instead of storing its activations.
    checkpoint_segments: bool = False
    # Stage 2: a stage-1 ``model.safetensors`` (or its folder) loaded by the trainer before step 0.
    init_from: str | None = None

    def __post_init__(self) -> None:
        if self.n_sensory < 0 or self.cache_size < 1 or self.recall_dim < 1:
            raise ValueError(f"n_sensory must be >= 0, cache_size and recall_dim >= 1, got "
                             f"{self.n_sensory}, {self.cache_size}, {self.recall_dim}")
        if self.segment_len < self.n_sensory + 2:
            raise ValueError(f"segment_len={self.segment_len} must be at least n_sensory + 2 memory slots = "
                             f"{self.n_sensory + 2}")
        if not 0.0 < self.sum_fraction <= 1.0:
            raise ValueError(f"sum_fraction must be in (0, 1], got {self.sum_fraction}")

    @property
    def summary_len(self) -> int:
        """j: how many leading tokens of a full segment the summary reads."""
        return max(1, round(self.segment_len * self.sum_fraction))


class _UnmergeableState(ValueError):
    """Two row groups ended with backbone states of different shapes (e.g. KV caches of different lengths)."""


class HMTState(NamedTuple):
    cache: Tensor  # [B, N, D] memory embeddings, oldest first, newest at N-1
    valid: Tensor  # [B, N] bool: slot holds a memory of the current document
    sensory: Tensor  # [B, k] int64 last k token ids of the previous segment
    has_sensory: Tensor  # [B] bool: the row has a previous segment
    backbone: Any = None  # the backbone's own state (carry_backbone_state only)


def recall(summary: Tensor, cache: Tensor, valid: Tensor, w_q: Tensor, w_k: Tensor, fallback: Tensor) -> Tensor:
    """Memory search: single-head cross-attention of the summary over the valid cache slots.

    Args:
        summary: ``[B, D]`` S_n.
        cache: ``[B, N, D]`` past memory embeddings; ``valid`` ``[B, N]`` bool marks the filled slots.
        w_q, w_k: ``[d_h, D]`` projection weights (``nn.Linear`` layout); there is no value projection.
        fallback: ``[D]`` M_0, returned for rows with no valid slot.

    Returns:
        ``[B, D]`` P_n, a convex combination of raw cache entries (fp32 softmax, scale 1/sqrt(d_h)).
    """
    q = F.linear(summary, w_q)  # [B, d_h]
    k = F.linear(cache, w_k)  # [B, N, d_h]
    scores = torch.einsum("bh,bnh->bn", q.float(), k.float()) / math.sqrt(w_q.shape[0])
    any_valid = valid.any(dim=-1, keepdim=True)  # [B, 1]
    # Empty rows get uniform (finite) scores so the softmax stays NaN-free; they take M_0 below.
    scores = scores.masked_fill(~valid, float("-inf")).masked_fill(~any_valid, 0.0)
    weights = scores.softmax(dim=-1).to(cache.dtype)
    out = torch.einsum("bn,bnd->bd", weights, cache)
    return torch.where(any_valid, out, fallback.to(cache.dtype))


@register_wrapper
class HMT(Wrapper):
    """HMT around ``backbone``; ``forward(input_ids, state=None, labels=None) -> LMOutput``.

    The input is cut into segments of ``config.segment_len`` tokens; a trailing shorter piece is
    a (short) segment of its own.  Calls chained through ``state`` therefore equal one call on
    the concatenation whenever the split points are multiples of ``segment_len``.
    """

    name = "hmt"
    config_class = HMTConfig
    # 16-token segments, 4 sensory tokens, a 32-slot cache.
    bench_defaults = {"segment_len": 16, "n_sensory": 4, "cache_size": 32, "recall_dim": 32}

    @classmethod
    def build(cls, model_config: Any, config: HMTConfig, *, resume: bool = False, say: Any = print) -> HMT:
        """HMT around a fresh backbone; stage 2 (``init_from``) loads the stage-1 weights unless resuming."""
        model = super().build(model_config, config, resume=resume, say=say)
        if config.init_from and not resume:
            model.load_stage1(config.init_from)
        return model

    @classmethod
    def check_data(cls, config: HMTConfig, *, pack: str, seq_len: int, segment_len: int | None,
                   tokenizer: str) -> None:
        if pack == "varlen":
            raise ValueError("hmt needs data.pack 'block' or 'stream' (it does not take cu_seqlens)")
        seg = config.segment_len
        if seq_len % seg or (segment_len is not None and segment_len % seg):
            raise ValueError(f"data.seq_len={seq_len} and data.segment_len={segment_len} must be multiples of "
                             f"the hmt segment_len={seg}, so that trainer segments and HMT segments line up")

    @classmethod
    def check_paths(cls, config: HMTConfig, *, resuming: bool) -> None:
        if config.init_from and not resuming and not Path(config.init_from).exists():
            raise ValueError(f"hmt init_from {config.init_from!r}: no such file or folder (train the previous stage "
                             "first)")

    def describe(self) -> str:
        overhead = 100 * self.parameter_overhead()
        return f"HMT adds {self.added_parameters():,} parameters ({overhead:.2f}% of the backbone)"

    def __init__(self, backbone: nn.Module, config: HMTConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        config = config_from_args("HMT", HMTConfig, config, kwargs)
        for attr in ("embed", "hidden_size"):
            if not hasattr(backbone, attr):
                raise TypeError(f"backbone must provide {attr!r} (the HMT backbone protocol)")
        self.config = config
        self.backbone = backbone
        d = backbone.hidden_size
        ref = next(backbone.parameters())
        std = float(getattr(getattr(backbone, "config", None), "init_std", 0.02))
        factory = dict(device=ref.device, dtype=ref.dtype)
        # M_0: the memory a segment reads when no earlier memory exists.
        self.mem_init = nn.Parameter(torch.randn(d, **factory) * std)
        if config.use_recall:
            # T, the summary prompt, plus the two recall projections (no value/output projection).
            self.summary_prompt = nn.Parameter(torch.randn(d, **factory) * std)
            self.w_q = nn.Linear(d, config.recall_dim, bias=False, **factory)
            self.w_k = nn.Linear(d, config.recall_dim, bias=False, **factory)
            nn.init.normal_(self.w_q.weight, std=std)
            nn.init.normal_(self.w_k.weight, std=std)

    @property
    def vocab_size(self) -> int | None:
        """Rows of the backbone's embedding table: token ids must lie in [0, vocab_size)."""
        return getattr(self.backbone.embed, "num_embeddings", None)

    @property
    def hidden_size(self) -> int:
        return self.backbone.hidden_size

    @property
    def mixers(self) -> list[Any]:
        """The layers whose state HMT carries across segments: the backbone's with ``carry_backbone_state``."""
        return list(self.backbone.mixers) if self.config.carry_backbone_state else []

    @property
    def split_multiple(self) -> int:
        return self.config.segment_len

    def parameter_overhead(self) -> float:
        """Added parameters as a fraction of the backbone's (unique) parameters."""
        return self.added_parameters() / sum(p.numel() for p in self.backbone.parameters())

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.backbone.embed.weight.numel() if exclude_embeddings else n

    def flops_per_token(self, seq_len: int) -> int:
        """Backbone FLOPs of the main pass and the summary pass, spread over the segment's new tokens."""
        c = self.config
        aug = c.segment_len + c.n_sensory + 2
        per_pass = self.backbone.flops_per_token(aug)
        summary = c.summary_len + 2 if c.use_recall else 0
        return per_pass * (aug + summary) // c.segment_len

    def state_size(self, seq_len: int | None = None) -> int:
        c = self.config
        own = c.cache_size * (self.hidden_size + 1) + c.n_sensory + 1
        return own + (self.backbone.state_size(c.segment_len + c.n_sensory + 2) if c.carry_backbone_state else 0)

    def init_state(self, batch_size: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> HMTState:
        """Fresh rows: an empty cache, no sensory tokens (and a fresh backbone state when carried)."""
        device = self.mem_init.device if device is None else device
        dtype = self.mem_init.dtype if dtype is None else dtype
        c = self.config
        backbone = self.backbone.init_state(batch_size, device=device, dtype=dtype) if c.carry_backbone_state else None
        return HMTState(
            cache=torch.zeros(batch_size, c.cache_size, self.hidden_size, device=device, dtype=dtype),
            valid=torch.zeros(batch_size, c.cache_size, dtype=torch.bool, device=device),
            sensory=torch.zeros(batch_size, c.n_sensory, dtype=torch.long, device=device),
            has_sensory=torch.zeros(batch_size, dtype=torch.bool, device=device),
            backbone=backbone,
        )

    detach_state = staticmethod(detach_state)

    def reset_state(self, state: HMTState, mask: Tensor) -> HMTState:
        """Rows where ``mask`` ``[B]`` (bool) is true start a new document: empty cache, no sensory tokens."""
        batch = state.cache.shape[0]
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (batch,):
            raise ValueError(f"mask must be a bool tensor [B={batch}], got {getattr(mask, 'shape', mask)}")
        keep = ~mask
        backbone = state.backbone
        if backbone is not None:
            backbone = tuple(m.reset_state(s, mask) for m, s in zip(self.backbone.mixers, backbone))
        return HMTState(
            cache=state.cache.masked_fill(mask[:, None, None], 0.0),
            valid=state.valid & keep[:, None],
            sensory=state.sensory.masked_fill(mask[:, None], 0),
            has_sensory=state.has_sensory & keep,
            backbone=backbone,
        )

    def forward(self, input_ids: Tensor, state: HMTState | None = None, labels: Tensor | None = None,
                *, cu_seqlens: Tensor | None = None) -> LMOutput:
        """Run the segments of ``input_ids`` in order, carrying the memory.

        Args:
            input_ids: ``[B, T]`` integer token ids, any ``T >= 1``.
            state: ``None`` (fresh documents) or the ``state`` of a previous output.
            labels: optional ``[B, T]`` targets aligned with ``input_ids`` (shifted inside, -100 ignored);
                the loss is the token mean over every segment.
            cu_seqlens: not supported (packed documents need a reset per document; use ``reset_state``).

        Returns:
            ``LMOutput`` with logits ``[B, T, V]`` (one per new token), the new ``HMTState`` and the loss.
        """
        if cu_seqlens is not None:
            raise ValueError("HMT does not take cu_seqlens: pack documents as rows and reset with reset_state")
        check_token_ids(input_ids, "input_ids", self.vocab_size)
        B, T = input_ids.shape
        if labels is not None:
            check_labels(labels, B, T, self.vocab_size)
        state = self._check_state(state, input_ids)
        segments = input_ids.split(self.config.segment_len, dim=1)
        summaries = self.summaries(segments) if self.config.use_recall else [None] * len(segments)
        logits = []
        for x, s in zip(segments, summaries):
            if self.config.checkpoint_segments and torch.is_grad_enabled():
                out, state = checkpoint(self._segment, x, s, state, use_reentrant=False)
            else:
                out, state = self._segment(x, s, state)
            logits.append(out)
        out = LMOutput(logits=torch.cat(logits, dim=1), state=state)
        if labels is not None:
            out.ce_loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().long(),
                                          ignore_index=IGNORE_INDEX)
            out.loss = out.ce_loss
        return out

    def summaries(self, segments: tuple[Tensor, ...] | list[Tensor]) -> list[Tensor]:
        """S_n for every segment ``[B, L_n]``, batched: one backbone pass per distinct prefix length.

        Returns:
            one ``[B, D]`` tensor per segment.
        """
        j = self.config.summary_len
        prefixes = [x[:, :j] for x in segments]
        out: list[Tensor | None] = [None] * len(prefixes)
        for length in sorted({p.shape[1] for p in prefixes}):
            idx = [i for i, p in enumerate(prefixes) if p.shape[1] == length]
            ids = torch.cat([prefixes[i] for i in idx], dim=0)  # [len(idx) * B, length]
            emb = self.backbone.embed(ids)
            prompt = self.summary_prompt.to(emb.dtype).expand(emb.shape[0], 1, -1)
            hidden = self.backbone(inputs_embeds=torch.cat((prompt, emb, prompt), dim=1), output_hidden=True).hidden
            for i, h in zip(idx, hidden[:, -1].chunk(len(idx), dim=0)):
                out[i] = h
        return out

    def read_memory(self, summary: Tensor | None, state: HMTState) -> Tensor:
        """P_n ``[B, D]``: recall over the cache, or (stage 1) the newest memory; M_0 when there is none."""
        if summary is not None:
            return recall(summary, state.cache, state.valid, self.w_q.weight, self.w_k.weight, self.mem_init)
        return torch.where(state.valid[:, -1:], state.cache[:, -1], self.mem_init.to(state.cache.dtype))

    def _segment(self, x: Tensor, summary: Tensor | None, state: HMTState) -> tuple[Tensor, HMTState]:
        """One main pass over ``[P ; sensory ; x ; P]``: logits ``[B, L, V]`` for x and the state after it."""
        memory = self.read_memory(summary, state)
        logits, hidden_last, backbone = self._main_pass(x, memory, state, append_memory=True)
        k = self.config.n_sensory
        new_memory = hidden_last.to(state.cache.dtype)
        # A plain shift keeps the FIFO order (oldest first) and stays autograd-safe, unlike in-place ring writes.
        cache = torch.cat((state.cache[:, 1:], new_memory[:, None]), dim=1)
        valid = torch.cat((state.valid[:, 1:], torch.ones_like(state.valid[:, :1])), dim=1)
        sensory = torch.cat((state.sensory, x), dim=1)[:, x.shape[1]:] if k else state.sensory
        has_sensory = state.has_sensory | (x.shape[1] >= k) if k else state.has_sensory
        return logits, HMTState(cache, valid, sensory, has_sensory, backbone)

    def _main_pass(self, x: Tensor, memory: Tensor, state: HMTState, *, append_memory: bool,
                   merge_state: bool = True) -> tuple[Tensor, Tensor, Any]:
        """Backbone over ``[P ; sensory ; x (; P)]``: (logits for x, last hidden, backbone state or None).

        Rows with and without sensory tokens (a document start next to a continuing one) need
        prefixes of different lengths, so they run as two groups; all rows alike run as one.
        """
        k = self.config.n_sensory
        if k == 0:
            return self._pass(x, memory, None, state.backbone, append_memory)
        has = state.has_sensory
        if bool(has.all()):
            return self._pass(x, memory, state.sensory, state.backbone, append_memory)
        if not bool(has.any()):
            return self._pass(x, memory, None, state.backbone, append_memory)
        rows_a, rows_b = has.nonzero().squeeze(1), (~has).nonzero().squeeze(1)
        sub = (lambda s, r: None if s is None else index_state(s, r))
        a = self._pass(x[rows_a], memory[rows_a], state.sensory[rows_a], sub(state.backbone, rows_a), append_memory)
        b = self._pass(x[rows_b], memory[rows_b], None, sub(state.backbone, rows_b), append_memory)
        inverse = torch.cat((rows_a, rows_b)).argsort()
        logits = torch.cat((a[0], b[0]))[inverse]
        hidden = torch.cat((a[1], b[1]))[inverse]
        backbone = None
        if a[2] is not None and merge_state:
            leaves_b = iter(state_leaves(b[2]))
            try:
                backbone = tree_map(lambda t: torch.cat((t, next(leaves_b)))[inverse], a[2])
            except RuntimeError as e:
                raise _UnmergeableState("carry_backbone_state needs a fixed-shape backbone state when rows with and "
                                        f"without sensory tokens share a batch: {e}") from None
        return logits, hidden, backbone

    def _pass(self, x: Tensor, memory: Tensor, sensory: Tensor | None, backbone_state: Any,
              append_memory: bool) -> tuple[Tensor, Tensor, Any]:
        emb = self.backbone.embed(x)
        mem = memory.to(emb.dtype)[:, None]
        parts = [mem] + ([self.backbone.embed(sensory)] if sensory is not None else []) + [emb]
        if append_memory:
            parts.append(mem)
        out = self.backbone(inputs_embeds=torch.cat(parts, dim=1), state=backbone_state, output_hidden=True)
        start = 1 + (sensory.shape[1] if sensory is not None else 0)
        logits = out.logits[:, start:start + x.shape[1]]
        carried = out.state if self.config.carry_backbone_state or not append_memory else None
        return logits, out.hidden[:, -1], carried

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                 state: HMTState | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Continue ``input_ids`` ``[B, T]`` across any number of segment boundaries.

        Finished segments of the prompt run through ``forward``.  Inside the open segment the
        backbone's cache is kept and extended token by token; while the open segment is shorter
        than the summary length j its S_n (hence P_n) still changes, so it is re-prefilled.  When a
        segment fills, its memory is written exactly as ``forward`` writes it and the next begins.

        Returns:
            ``[B, T + n]`` token ids, ``n <= max_new_tokens``.
        """
        check_max_new_tokens(max_new_tokens)
        check_token_ids(input_ids, "input_ids", self.vocab_size)
        if max_new_tokens == 0:
            return input_ids
        S, j = self.config.segment_len, self.config.summary_len
        state = self._check_state(state, input_ids)
        T = input_ids.shape[1]
        closed = T - (T % S)
        open_ids = input_ids[:, closed:]
        logits = ctx = None
        if closed:
            out = self(input_ids[:, :closed], state=state)
            logits, state = out.logits[:, -1], out.state
        if open_ids.shape[1]:
            logits, ctx = self._prefill(open_ids, state)

        def advance(token: Tensor) -> Tensor:
            nonlocal open_ids, ctx, state
            if open_ids.shape[1] == S:
                summary = self.summaries([open_ids])[0] if self.config.use_recall else None
                _, state = self._segment(open_ids, summary, state)
                open_ids, ctx = open_ids[:, :0], None
            open_ids = torch.cat((open_ids, token[:, None]), dim=1)
            if ctx is None or (self.config.use_recall and open_ids.shape[1] <= j):
                logits, ctx = self._prefill(open_ids, state)
                return logits
            out = self.backbone(inputs_embeds=self.backbone.embed(token[:, None]), state=ctx)
            ctx = out.state
            return out.logits[:, -1]

        return decode_loop(input_ids, logits, advance, max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, eos_token_id=eos_token_id, generator=generator)

    def _prefill(self, open_ids: Tensor, state: HMTState) -> tuple[Tensor, Any]:
        """Main pass over ``[P ; sensory ; open_ids]``: last logits and the backbone cache (None: cannot extend)."""
        summary = self.summaries([open_ids])[0] if self.config.use_recall else None
        memory = self.read_memory(summary, state)
        try:
            logits, _, ctx = self._main_pass(open_ids, memory, state, append_memory=False)
        except _UnmergeableState:
            # Document starts next to continuing rows: caches of different lengths; re-prefill every token.
            logits, _, ctx = self._main_pass(open_ids, memory, state, append_memory=False, merge_state=False)
        return logits[:, -1], ctx

    def load_stage1(self, source: str | Path | dict[str, Tensor]) -> None:
        """Load a stage-1 HMT (or its ``model.safetensors``): every key must match except the fresh recall
        parameters (T, W_q, W_k) and a tied output head."""
        if not isinstance(source, dict):
            from safetensors.torch import load_file

            path = Path(source)
            source = load_file(str(path / "model.safetensors" if path.is_dir() else path))
        own = self.state_dict()
        fresh = {k for k in own if k.split(".")[0] in ("summary_prompt", "w_q", "w_k")}
        tied = {k for k in own if k.endswith("lm_head.weight") and k not in source}
        missing = set(own) - set(source) - fresh - tied
        unexpected = set(source) - set(own)
        if missing or unexpected:
            raise ValueError(f"stage-1 weights do not match this HMT: missing {sorted(missing)}, "
                             f"unexpected {sorted(unexpected)}")
        self.load_state_dict({**source, **{k: own[k] for k in fresh | tied}}, strict=True)

    def _check_state(self, state: HMTState | None, ids: Tensor) -> HMTState:
        B = ids.shape[0]
        if state is None:
            return self.init_state(B, device=ids.device)
        if not isinstance(state, HMTState):
            raise TypeError(f"state must be an HMTState (as returned by forward), got {type(state).__name__}")
        c = self.config
        if state.cache.shape[1:] != (c.cache_size, self.hidden_size) or state.sensory.shape[1:] != (c.n_sensory,):
            raise ValueError(f"state does not fit this HMT: cache {tuple(state.cache.shape)}, sensory "
                             f"{tuple(state.sensory.shape)}; expected [B, {c.cache_size}, {self.hidden_size}], "
                             f"[B, {c.n_sensory}]")
        if state_batch_size(state) != B:
            raise ValueError(f"state has batch size {state_batch_size(state)}, but the input has {B} sequences")
        return state
