"""``LanguageModel``: token embedding, a stack of pre-norm blocks (any mixer pattern), final norm, tied head.

    out = model(input_ids, state=None, labels=None)   # out.logits, out.loss, out.aux_losses, out.state
    ids = model.generate(prompt, max_new_tokens=32)   # prefill with forward, then exact per-token step

Labels follow the Hugging Face convention: ``labels`` is aligned with ``input_ids`` and shifted
inside (position t predicts token t+1); ``-100`` is ignored, and with ``cu_seqlens`` no position
is trained to predict across a sequence boundary.  The loss is the mean cross-entropy
plus the sum of the auxiliary losses the mixers recorded during this pass.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.utils import debug_checks
from .block import Block, RMSNorm
from .config import ModelConfig
from .contract import Mixer, check_cu_seqlens
from .init import init_linear
from .registry import build_mixer
from .state import state_batch_size, state_leaves

__all__ = ["LanguageModel", "LMOutput", "NonFiniteWarning", "check_labels", "check_logits_to_keep",
           "check_max_new_tokens", "check_token_ids", "decode_loop", "sample_next"]

IGNORE_INDEX = -100


@dataclass
class LMOutput:
    logits: Tensor  # [B, T', V] (T' = T, or logits_to_keep)
    state: tuple[Any, ...]  # one state per layer, batch first
    loss: Tensor | None = None  # ce_loss + sum(aux_losses), when labels are given
    ce_loss: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # "layers.{i}.{name}" -> weighted scalar
    hidden: Tensor | None = None  # [B, T', D] final-norm hidden states, with output_hidden=True


def check_token_ids(ids: Any, name: str, vocab_size: int | None = None, rank: int = 2) -> None:
    """``ids`` must be an integer tensor ``[B, T]`` (T >= 1; ``rank=1``: ``[B]``) with values in [0, vocab_size).

    The value check runs on CPU tensors outside compilation only: on CUDA it would stall the stream (and
    break a compiled graph), and the embedding's device assert covers it there.
    """
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dim() != rank or (rank == 2 and ids.shape[1] == 0) or (ids.dim() and ids.shape[0] == 0):
        raise ValueError(f"{name} must have shape {'[B, T] with B, T >= 1' if rank == 2 else '[B] with B >= 1'}, "
                         f"got {tuple(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must hold integer token ids (int64 or int32), got {ids.dtype}")
    if vocab_size is not None and ids.device.type == "cpu" and ids.numel() and not torch.compiler.is_compiling():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{name} must be in [0, vocab_size={vocab_size}), got values in [{lo}, {hi}]")


def check_labels(labels: Any, B: int, T: int, vocab_size: int | None = None) -> None:
    """``labels`` must be an integer tensor ``[B, T]`` aligned with the input (wrappers share this check), with
    values in [0, vocab_size) or ``-100`` (ignored); the value check runs on CPU tensors only, as for token ids."""
    if (not isinstance(labels, Tensor) or labels.shape != (B, T) or labels.is_floating_point() or labels.is_complex()
            or labels.dtype == torch.bool):
        got = f"{tuple(labels.shape)} {labels.dtype}" if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an integer tensor shaped like the input [B, T] = {[B, T]}, got {got}")
    if vocab_size is not None and labels.device.type == "cpu" and labels.numel() and not torch.compiler.is_compiling():
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))
        if bool(bad.any()):
            raise ValueError(f"labels must be in [0, vocab_size={vocab_size}) or {IGNORE_INDEX} (ignored), got "
                             f"{int(labels[bad][0])} at {tuple(bad.nonzero()[0].tolist())}")


def check_logits_to_keep(logits_to_keep: Any) -> None:
    """``logits_to_keep`` must be an int >= 0 (0: every position)."""
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be an int >= 0 (0 keeps every position), got {logits_to_keep!r}")


class NonFiniteWarning(RuntimeWarning):
    """``MEMZOO_DEBUG=1``: where the first non-finite value of a forward pass entered."""


class _NonFiniteTrace:
    """Debug mode: check each stage's output and warn once, at the first stage whose input was finite and whose
    output is not (the stage that let it in).  Each check syncs with the device, hence debug mode only."""

    def __init__(self) -> None:
        self.reported = False

    def check(self, t: Tensor, where: str) -> None:
        if self.reported or not t.is_floating_point():
            return
        bad = ~torch.isfinite(t)
        if not bool(bad.any()):
            return
        self.reported = True
        if t.dim() >= 2:
            rows = bad.flatten(2).any(-1) if t.dim() > 2 else bad  # [B, T]
            b, pos = rows.nonzero()[0].tolist()
            value = t[b, pos][bad[b, pos]][0].item() if t.dim() > 2 else t[b, pos].item()
            at = f"batch row {b}, position {pos} (the first non-finite position in that output)"
        else:
            value, at = t[bad][0].item(), f"index {tuple(bad.nonzero()[0].tolist())}"
        warnings.warn(f"MEMZOO_DEBUG: the first non-finite value ({value}) enters at {where}: {at}. Its input was "
                      "finite. A chunked or FFT/attention mixer also turns earlier positions of the same chunk or call "
                      "non-finite (docs/ARCHITECTURE.md, non-finite values)", NonFiniteWarning, stacklevel=3)

    def check_state(self, state: Any, where: str) -> None:
        for leaf in state_leaves(state):
            if self.reported:
                return
            if leaf.is_floating_point() and not bool(torch.isfinite(leaf).all()):
                self.reported = True
                warnings.warn(f"MEMZOO_DEBUG: the incoming {where} already holds non-finite values (from an earlier "
                              "call)", NonFiniteWarning, stacklevel=3)


class LanguageModel(nn.Module):
    """A causal language model over any pattern of registered mixers."""

    # FSDP auto-wrapping (Accelerate's TRANSFORMER_BASED_WRAP) shards the model one Block at a time.
    _no_split_modules = ["Block"]

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(
            Block(build_mixer(name, config.d_model, config.mixers.get(name)), config.ffn_hidden, config.norm_eps,
                  ffn=config.ffn, ffn_opts=config.ffn_opts)
            for name in config.layer_types
        )
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    @property
    def hidden_size(self) -> int:
        """Width of the embeddings and hidden states (the backbone protocol of ``memzoo.models.wrappers``)."""
        return self.config.d_model

    @property
    def mixers(self) -> list[Mixer]:
        return [b.mixer for b in self.blocks]

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for embeddings and linear weights, zero linear biases, GPT-2 residual scaling of the
        projections the layers mark with ``residual_output``; parameters marked ``keep_init`` keep their values.

        Mixers with parameters of their own (decays, SSM matrices) keep the values their
        constructor gave them: only ``nn.Linear``/``nn.Embedding`` weights are re-drawn here
        (see ``memzoo.models.init``).
        """
        if self.embed.weight.is_meta:
            # Nothing to draw on the meta device (parameter counts, deferred init: ``to_empty`` then this call);
            # drawing there costs about a millisecond per tensor.
            return
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.Linear):
                init_linear(module, std, self.config.n_layers)

    def init_state(self, batch_size: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> tuple[Any, ...]:
        return tuple(m.init_state(batch_size, device=device, dtype=dtype) for m in self.mixers)

    def forward(self, input_ids: Tensor | None = None, state: tuple[Any, ...] | None = None,
                labels: Tensor | None = None, *, cu_seqlens: Tensor | None = None, logits_to_keep: int = 0,
                inputs_embeds: Tensor | None = None, output_hidden: bool = False) -> LMOutput:
        """Run the model.

        Args:
            input_ids: ``[B, T]`` integer token ids (or ``None`` with ``inputs_embeds``).
            state: ``None`` or the ``state`` of a previous output (continue those sequences).
            labels: optional ``[B, T]`` targets aligned with ``input_ids`` (shifted inside).
            cu_seqlens: optional ``[N+1]`` offsets of packed sequences (B must be 1).
            logits_to_keep: if > 0, compute logits for the last ``logits_to_keep`` positions only.
            inputs_embeds: ``[B, T, D]`` input vectors used instead of ``embed(input_ids)`` (wrappers
                such as HMT splice memory vectors between token embeddings).
            output_hidden: also return the final-norm hidden states (the vectors the head reads).

        Returns:
            ``LMOutput`` with logits ``[B, T', V]`` (fp32 upcast only inside the loss), the new
            state, and ``loss``/``ce_loss``/``aux_losses`` when labels are given.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            self._check_ids(input_ids, "input_ids")
            B, T = input_ids.shape
        else:
            d = self.config.d_model
            if not isinstance(inputs_embeds, Tensor) or not inputs_embeds.is_floating_point():
                raise TypeError(f"inputs_embeds must be a floating-point tensor, got {type(inputs_embeds).__name__}")
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[1] == 0 or inputs_embeds.shape[2] != d:
                raise ValueError(f"inputs_embeds must have shape [B, T, D={d}] with T >= 1, "
                                 f"got {tuple(inputs_embeds.shape)}")
            B, T = inputs_embeds.shape[:2]
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, B, T)
        states = self._check_state(state, B if cu_seqlens is None else cu_seqlens.numel() - 1)
        check_logits_to_keep(logits_to_keep)
        if labels is not None:
            check_labels(labels, B, T, self.config.vocab_size)
            if logits_to_keep > 0:
                raise ValueError("labels and logits_to_keep > 0 cannot be combined")
        for m in self.mixers:
            m.pop_aux_losses()
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        trace = _NonFiniteTrace() if debug_checks() else None
        if trace:
            trace.check(x, "the token embeddings (embed.weight)" if inputs_embeds is None else "inputs_embeds")
        new_states = []
        for i, (block, s) in enumerate(zip(self.blocks, states)):
            if trace:
                trace.check_state(s, f"state[{i}]")
            x, s = block(x, s, cu_seqlens=cu_seqlens)
            if trace:
                trace.check(x, f"layer {i} (the block around {type(block.mixer).__name__})")
            new_states.append(s)
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        hidden = self.norm(x)
        logits = self.lm_head(hidden)
        if trace:
            trace.check(logits, "the output head (final norm + lm_head)")
        aux = {f"layers.{i}.{k}": v for i, m in enumerate(self.mixers) for k, v in m.pop_aux_losses().items()}
        out = LMOutput(logits=logits, state=tuple(new_states), aux_losses=aux, hidden=hidden if output_hidden else None)
        if labels is not None:
            targets = labels[:, 1:].long()
            if cu_seqlens is not None:
                # The last token of a packed sequence must not be trained to predict the next sequence's first.
                starts = torch.zeros(T + 1, dtype=torch.bool, device=labels.device)
                starts[cu_seqlens[1:-1].long()] = True
                targets = targets.masked_fill(starts[1:T][None], IGNORE_INDEX)
            out.ce_loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX
            )
            out.loss = out.ce_loss + sum(aux.values()) if aux else out.ce_loss
        return out

    def step(self, token: Tensor, state: tuple[Any, ...]) -> tuple[Tensor, tuple[Any, ...]]:
        """Decode one token per row: ``token`` ``[B]`` -> ``(logits [B, V], state)``."""
        self._check_ids(token, "token", rank=1)
        states = self._check_state(state, token.shape[0])
        x = self.embed(token)
        new_states = []
        for block, s in zip(self.blocks, states):
            x, s = block.step(x, s)
            new_states.append(s)
        return self.lm_head(self.norm(x)), tuple(new_states)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                 state: tuple[Any, ...] | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Continue ``input_ids`` ``[B, T]``: one prefill pass, then exact per-token ``step``s.

        ``temperature=0`` is greedy; otherwise tokens are sampled from softmax(logits / temperature)
        restricted to the ``top_k`` most likely and/or the ``top_p`` nucleus.  Rows that emitted
        ``eos_token_id`` keep emitting it; generation stops early once every row has.

        Returns:
            ``[B, T + n]`` token ids, ``n <= max_new_tokens``.
        """
        check_max_new_tokens(max_new_tokens)
        self._check_ids(input_ids, "input_ids")
        if max_new_tokens == 0:
            return input_ids
        out = self(input_ids, state=state, logits_to_keep=1)
        state = out.state

        def advance(token: Tensor) -> Tensor:
            nonlocal state
            logits, state = self.step(token, state)
            return logits

        return decode_loop(input_ids, out.logits[:, -1], advance, max_new_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, generator=generator)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (tied weights counted once), optionally without the embedding table."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embeddings else n

    def num_activated_parameters(self) -> int:
        """Parameters used per token: sparse mixers (routed memories) count only what a token touches."""
        mixer_params = sum(p.numel() for m in self.mixers for p in m.parameters())
        return self.num_parameters() - mixer_params + sum(m.num_activated_parameters() for m in self.mixers)

    def flops_per_token(self, seq_len: int) -> int:
        """Analytic training FLOPs (forward + backward) per token at context length ``seq_len``.

        ``6 x`` the activated non-embedding parameters, plus the output head (``6 V D``, real
        compute even when tied), plus each mixer's ``extra_flops_per_token`` (attention scores,
        state updates).  Embedding lookups are free.
        """
        c = self.config
        head = 6 * c.vocab_size * c.d_model
        dense = 6 * (self.num_activated_parameters() - self.embed.weight.numel()
                     - (0 if c.tie_embeddings else self.lm_head.weight.numel()))
        return dense + head + sum(m.extra_flops_per_token(seq_len) for m in self.mixers)

    @property
    def split_multiple(self) -> int:
        """Least common multiple of the mixers' ``split_multiple``: segment and sequence lengths must be multiples."""
        return math.lcm(*(type(m).split_multiple for m in self.mixers))

    def state_size(self, seq_len: int | None = None) -> int:
        """Floats of state per sequence over all layers after ``seq_len`` tokens."""
        return sum(m.state_size(seq_len) for m in self.mixers)

    def _check_ids(self, ids: Any, name: str, rank: int = 2) -> None:
        check_token_ids(ids, name, self.config.vocab_size, rank)

    def _check_state(self, state: tuple[Any, ...] | None, batch_size: int) -> tuple[Any, ...]:
        if state is None:
            return (None,) * len(self.blocks)
        if not isinstance(state, (tuple, list)) or len(state) != len(self.blocks):
            raise ValueError(f"state must be a tuple of {len(self.blocks)} layer states (as returned by forward)")
        batch = state_batch_size(state)
        if batch is not None and batch != batch_size:
            raise ValueError(f"state has batch size {batch}, but the input has {batch_size} sequences")
        for i, (m, s) in enumerate(zip(self.mixers, state)):
            m.check_state(s, batch_size, f"state[{i}]")
        return tuple(state)


def check_max_new_tokens(max_new_tokens: Any) -> None:
    """``max_new_tokens`` must be an int >= 0 (every model's ``generate``)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")


def decode_loop(input_ids: Tensor, logits: Tensor, advance: Callable[[Tensor], Tensor], max_new_tokens: int, *,
                temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                eos_token_id: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """The sampling loop shared by every model's ``generate``.

    Args:
        input_ids: ``[B, T]`` prompt ids (returned in front of the new tokens).
        logits: ``[B, V]`` next-token logits after the prompt.
        advance: feeds one sampled token ``[B]`` to the model and returns the next logits ``[B, V]``.

    Rows that emitted ``eos_token_id`` keep emitting it; the loop stops early once every row has.

    Returns:
        ``[B, T + n]`` token ids, ``1 <= n <= max_new_tokens``.
    """
    if eos_token_id is not None and (isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int)
                                     or not 0 <= eos_token_id < logits.shape[-1]):
        raise ValueError(f"eos_token_id must be a token id in [0, vocab_size={logits.shape[-1]}), got {eos_token_id!r}")
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    for i in range(max_new_tokens):
        token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        if eos_token_id is not None:
            token = token.masked_fill(finished, eos_token_id)
            finished |= token == eos_token_id
        new_tokens.append(token)
        if i == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
            break
        logits = advance(token)
    return torch.cat((input_ids, torch.stack(new_tokens, dim=1)), dim=1)


def sample_next(logits: Tensor, *, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Pick one token per row from ``logits`` ``[B, V]``: greedy at temperature 0, else top-k/top-p sampling."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (a number), got {temperature!r}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
