"""LongMem: a frozen backbone caches its attention keys/values; a trainable residual SideNet reads them.

Paper: "Augmenting Language Models with Long-Term Memory" (Wang, Dong, Cheng, Liu, Yan, Gao, Wei;
arXiv 2306.07174).  A document stream is cut into segments of ``segment_len`` tokens; per segment n:

    (1) H^0..H^L, (K_m, V_m) = backbone(x_n)                 frozen, no_grad; K_m un-rotated layer-m keys
    (2) h^0 = H^0;  h^{i+1} = SideBlock_i(h^i) + (H^{r(i+1)} - H^{ri})        cross-network residuals
        side block m // r is memory-augmented: local attention + attention over the top-k chunks of the
        bank retrieved by its own un-rotated queries, mixed by a per-head gate sigma(g_h), g_h = 0 at init
    (3) logits = lm_head(norm(h^{L/r}))                        the backbone's frozen head, a copied final norm
    (4) bank <- (K_m, V_m) of x_n                              after (2): a segment never retrieves itself

Only the SideNet trains.  Each batch row is its own document stream with its own bank rows;
``reset_state(state, mask)`` empties rows at document boundaries.

Backbone: a memzoo ``LanguageModel`` whose layer ``memory_layer`` is an ``Attention``, or a Hugging Face
Llama causal LM (its decoder layers are mapped onto memzoo Blocks for the SideNet).  Hidden states and
the layer-m k/v are captured with forward hooks that exist only for the duration of the backbone call,
so the backbone stays usable on its own.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..block import Block, RMSNorm
from ..contract import config_from_args
from ..layers.attention import Attention
from ..layers.memory_attention import MemoryAugmentedAttention
from ..lm import IGNORE_INDEX, LanguageModel, LMOutput, check_labels, check_max_new_tokens, check_token_ids, decode_loop
from .base import Wrapper, register_wrapper

__all__ = ["LongMem", "LongMemConfig", "LongMemState", "SideNet"]


@dataclass(frozen=True)
class LongMemConfig:
    # Tokens per segment: the backbone's local context; the bank is written once per full segment.
    segment_len: int = 1024
    # m: the backbone layer (0-based) whose keys/values feed the bank; None = round(0.7 L).
    memory_layer: int | None = None
    # r: the SideNet has ceil(L / r) blocks.
    reduction: int = 2
    # M: tokens kept per batch row (and head) in the bank; the oldest chunks are evicted first.
    capacity: int = 65536
    # csz: tokens per retrieval chunk (a chunk's key is the mean of its token keys).
    chunk_size: int = 4
    # Chunks retrieved per query; each query attends over n_chunks * chunk_size tokens.
    n_chunks: int = 16
    # Bank storage dtype ("bfloat16", "float16" or "float32"); None = the model's dtype (fp32 for fp64).
    bank_dtype: str | None = None
    # False: no retrieval (gate forced to 0) and no bank writes: the memory-free baseline.
    use_memory: bool = True
    # Where the frozen backbone comes from when the wrapper is built from a config (memzoo-train, memzoo-bench):
    # a memzoo export folder, whose config.json replaces the run's model section; None = the model section at
    # random init (smoke tests and ablations: the SideNet then learns on top of an untrained backbone).
    backbone: str | None = None

    def __post_init__(self) -> None:
        if self.segment_len < 1 or self.chunk_size < 1 or self.n_chunks < 1 or self.reduction < 1:
            raise ValueError(f"segment_len, chunk_size, n_chunks and reduction must be >= 1, got {self.segment_len}, "
                             f"{self.chunk_size}, {self.n_chunks}, {self.reduction}")
        if self.segment_len % self.chunk_size:
            raise ValueError(f"segment_len={self.segment_len} must be a multiple of chunk_size={self.chunk_size} "
                             "(the bank stores whole chunks)")
        if self.capacity < self.chunk_size or self.capacity % self.chunk_size:
            raise ValueError(f"capacity={self.capacity} must be a positive multiple of chunk_size={self.chunk_size}")
        if self.memory_layer is not None and self.memory_layer < 0:
            raise ValueError(f"memory_layer must be None or >= 0, got {self.memory_layer}")
        if self.bank_dtype is not None and not isinstance(getattr(torch, self.bank_dtype, None), torch.dtype):
            raise ValueError(f"bank_dtype must be None or a torch dtype name such as 'bfloat16', "
                             f"got {self.bank_dtype!r}")


class LongMemState(NamedTuple):
    # The KVMemoryBank: a mutable object updated in place; the state a forward returns shares it
    # with the state it was given (use ``bank.clone()`` to branch).
    bank: Any
    open_ids: Tensor  # [B, n] int64 token ids of the open (incomplete) segment, n < segment_len


class SideNet(nn.Module):
    """ceil(L / r) blocks initialised from the backbone, one of them memory-augmented, plus a final norm.

    Side block i starts as a copy of backbone block min(r i + r - 1, L - 1); block m // r is built from
    backbone block m (its attention becomes a ``MemoryAugmentedAttention``), so its queries start aligned
    with the cached keys.

    Args:
        make_block: ``j -> Block``, a fresh memzoo ``Block`` equal to backbone layer j (a copy).
        final_norm: a fresh copy of the backbone's final norm.
    """

    def __init__(self, make_block: Callable[[int], Block], final_norm: nn.Module, n_layers: int, memory_layer: int,
                 reduction: int, n_chunks: int) -> None:
        super().__init__()
        L, r = n_layers, reduction
        self.reduction, self.n_layers = r, L
        self.memory_index = memory_layer // r
        self.sources = [memory_layer if i == self.memory_index else min(r * i + r - 1, L - 1)
                        for i in range(math.ceil(L / r))]
        self.blocks = nn.ModuleList(make_block(j) for j in self.sources)
        block = self.blocks[self.memory_index]
        block.mixer = MemoryAugmentedAttention.from_attention(block.mixer, n_chunks=n_chunks)
        self.norm = final_norm
        for p in self.parameters():
            p.requires_grad_(True)

    @property
    def memory_attention(self) -> MemoryAugmentedAttention:
        return self.blocks[self.memory_index].mixer

    def forward(self, hidden: list[Tensor], bank: Any = None) -> Tensor:
        """Side pass over one segment.

        Args:
            hidden: the backbone's L + 1 hidden states H^0..H^L, each ``[B, T, D]``.
            bank: the memory the memory layer searches (None: local attention only).

        Returns:
            ``[B, T, D]`` final-norm hidden states (what the frozen LM head reads).
        """
        r, L = self.reduction, self.n_layers
        h = hidden[0]
        for i, block in enumerate(self.blocks):
            out, _ = block(h, bank=bank) if i == self.memory_index else block(h)
            h = out + (hidden[min(r * (i + 1), L)] - hidden[r * i])
        return self.norm(h)


class _MemzooBackbone:
    """A memzoo ``LanguageModel`` as a LongMem backbone: blocks are copied as they are."""

    def __init__(self, model: LanguageModel, memory_layer: int | None) -> None:
        self.model = model
        self.n_layers = len(model.blocks)
        self.vocab_size = model.config.vocab_size
        self.memory_layer = _resolve_memory_layer(memory_layer, self.n_layers)
        mixer = model.blocks[self.memory_layer].mixer
        if not isinstance(mixer, Attention):
            raise ValueError(f"memory_layer={self.memory_layer}: backbone layer {self.memory_layer} is "
                             f"{type(mixer).__name__}; it must be an Attention layer (with k_proj / v_proj) whose "
                             "keys and values feed the bank")
        self.n_kv_heads, self.d_head = mixer.n_kv_heads, mixer.d_head
        self.embed_weight, self.lm_head = model.embed.weight, model.lm_head
        self.layers, self.attention = list(model.blocks), mixer

    def block(self, j: int) -> Block:
        return copy.deepcopy(self.model.blocks[j])

    def final_norm(self) -> nn.Module:
        return copy.deepcopy(self.model.norm)

    def run(self, segment: Tensor) -> None:
        self.model(segment, logits_to_keep=1)


class _LlamaBackbone:
    """A Hugging Face Llama-family causal LM: decoder layers are mapped onto memzoo Blocks.

    LlamaDecoderLayer is x + attn(rms(x)); x + down(silu(gate(rms x)) * up(rms x)) with rotate-half RoPE
    over (x[:d/2], x[d/2:]) and frequencies theta^(-2i/d): memzoo's Block, Attention, SwiGLU and apply_rope.
    """

    MODEL_TYPES = ("llama",)

    def __init__(self, model: nn.Module, memory_layer: int | None) -> None:
        c = model.config
        rope = getattr(c, "rope_parameters", None) or {"rope_type": "default", "rope_theta": c.rope_theta}
        if rope.get("rope_type", "default") != "default" or c.hidden_act != "silu" or getattr(c, "mlp_bias", False):
            raise NotImplementedError(f"LongMem maps Llama layers with default RoPE, SiLU and no MLP bias; got "
                                      f"rope {rope}, hidden_act {c.hidden_act!r}, mlp_bias {c.mlp_bias}")
        self.model = model
        self.n_layers = c.num_hidden_layers
        self.vocab_size = c.vocab_size
        self.memory_layer = _resolve_memory_layer(memory_layer, self.n_layers)
        self.n_kv_heads = c.num_key_value_heads
        self.d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.attention_config = dict(d_model=c.hidden_size, n_heads=c.num_attention_heads,
                                     n_kv_heads=c.num_key_value_heads, d_head=self.d_head,
                                     rope_theta=float(rope["rope_theta"]), bias=bool(c.attention_bias))
        self.d_ff, self.eps = c.intermediate_size, c.rms_norm_eps
        self.embed_weight, self.lm_head = model.model.embed_tokens.weight, model.lm_head
        self.layers = list(model.model.layers)
        self.attention = self.layers[self.memory_layer].self_attn

    def block(self, j: int) -> Block:
        """A memzoo Block holding copies of decoder layer j's weights."""
        src = self.layers[j]
        ref = src.self_attn.q_proj.weight
        block = Block(Attention(**self.attention_config), self.d_ff, self.eps).to(device=ref.device, dtype=ref.dtype)
        pairs = [(block.mixer_norm, src.input_layernorm), (block.mlp_norm, src.post_attention_layernorm),
                 *((getattr(block.mixer, n), getattr(src.self_attn, n)) for n in ("q_proj", "k_proj", "v_proj",
                                                                                  "o_proj")),
                 *((getattr(block.mlp, n), getattr(src.mlp, n)) for n in ("gate_proj", "up_proj", "down_proj"))]
        with torch.no_grad():
            for dst, mod in pairs:
                dst.load_state_dict(mod.state_dict())
        return block

    def final_norm(self) -> nn.Module:
        src = self.model.model.norm
        norm = RMSNorm(src.weight.shape[0], self.eps).to(device=src.weight.device, dtype=src.weight.dtype)
        with torch.no_grad():
            norm.weight.copy_(src.weight)
        return norm

    def run(self, segment: Tensor) -> None:
        self.model.model(input_ids=segment, use_cache=False)


def _resolve_memory_layer(memory_layer: int | None, n_layers: int) -> int:
    m = memory_layer if memory_layer is not None else min(max(round(0.7 * n_layers), 0), n_layers - 1)
    if not 0 <= m < n_layers:
        raise ValueError(f"memory_layer={m} must be in [0, n_layers={n_layers})")
    return m


def _adapter(backbone: nn.Module, memory_layer: int | None) -> _MemzooBackbone | _LlamaBackbone:
    if isinstance(backbone, LanguageModel):
        return _MemzooBackbone(backbone, memory_layer)
    model_type = getattr(getattr(backbone, "config", None), "model_type", None)
    if model_type is not None and hasattr(backbone, "lm_head"):
        if model_type in _LlamaBackbone.MODEL_TYPES and hasattr(getattr(backbone, "model", None), "layers"):
            return _LlamaBackbone(backbone, memory_layer)
        raise NotImplementedError(f"LongMem supports Hugging Face Llama-family causal LMs "
                                  f"{_LlamaBackbone.MODEL_TYPES}; got model_type {model_type!r}")
    raise TypeError(f"backbone must be a memzoo LanguageModel or a Hugging Face Llama causal LM, "
                    f"got {type(backbone).__name__}")


@register_wrapper
class LongMem(Wrapper):
    """LongMem around a frozen ``backbone``; ``forward(input_ids, state=None, labels=None) -> LMOutput``.

    Calls chained through ``state`` equal one call on the concatenation at any split: the ids of an
    incomplete segment are kept in the state and re-run with the next call's tokens (the bank is
    written only when a segment completes), so ``generate`` equals greedy decoding by full forwards.
    """

    name = "longmem"
    config_class = LongMemConfig
    # 32-token segments, a 4096-token bank per row, 8 chunks of 4 tokens per query.
    bench_defaults = {"segment_len": 32, "capacity": 4096, "chunk_size": 4, "n_chunks": 8}

    @classmethod
    def backbone_config(cls, model_config: Any, config: LongMemConfig, *, required: bool = False) -> Any:
        """With ``config.backbone`` set, the backbone export's ``config.json`` (the run's model section is
        replaced); a folder that does not exist yet leaves ``model_config`` unless ``required``."""
        from ..config import ModelConfig

        if config.backbone is None:
            return model_config
        found = Path(config.backbone) / "config.json"
        if not found.is_file():
            if required:
                raise ValueError(
                    f"longmem backbone {config.backbone!r} is not a memzoo export folder (model.safetensors + "
                    "config.json): pretrain and export a backbone first (memzoo-train --preset tiny writes "
                    "runs/tiny-attention/final), or set the backbone to none to wrap a randomly initialised "
                    "model (smoke tests only)")
            return model_config
        try:
            return ModelConfig.from_json(found.read_text())
        except (TypeError, ValueError) as e:
            raise ValueError(f"longmem backbone: cannot read {str(found)!r}: {e}") from None

    @classmethod
    def build(cls, model_config: Any, config: LongMemConfig, *, resume: bool = False, say: Any = print) -> LongMem:
        """LongMem over the frozen backbone ``config.backbone`` (or a random backbone of ``model_config``, with a
        loud warning); records the backbone's path and weight hash for the export."""
        from ...train.checkpoint import from_pretrained
        from .. import build_model
        from .longmem_io import weights_hash

        if config.backbone is None:
            backbone = build_model(model_config)
            bar = "!" * 100
            say(f"{bar}\n!! the LongMem backbone is None: the frozen backbone is RANDOMLY INITIALISED and UNTRAINED. "
                f"Useful for smoke tests only;\n!! pretrain and export one (memzoo-train --preset tiny) and pass "
                f"--wrapper.backbone <out_dir>/final.\n{bar}")
        else:
            # model_config is already the backbone's (backbone_config); callers check it against their data.
            backbone = from_pretrained(config.backbone)
        model = cls(backbone, config)
        model.backbone_record = {"path": config.backbone, "sha256": weights_hash(backbone)}
        return model

    @classmethod
    def check_data(cls, config: LongMemConfig, *, pack: str, seq_len: int, segment_len: int | None,
                   tokenizer: str) -> None:
        if pack != "stream":
            raise ValueError(f"longmem needs data.pack 'stream' (each row a persistent document stream whose bank "
                             f"carries over batches and resets at document starts), got {pack!r}")
        if segment_len is None or segment_len % config.segment_len:
            raise ValueError(f"longmem needs data.segment_len set to a multiple of the longmem segment_len="
                             f"{config.segment_len}, got {segment_len}: bank resets happen at trainer segment starts "
                             "and must fall on LongMem segment boundaries")
        if not (tokenizer == "byte" or tokenizer.startswith("bpe:")):
            raise ValueError(f"longmem: data.tokenizer {tokenizer!r} would train a new tokenizer; the frozen backbone "
                             "needs its own: use 'byte' or 'bpe:<backbone>/tokenizer.json'")

    def describe(self) -> str:
        record = getattr(self, "backbone_record", None) or {"path": self.config.backbone, "sha256": "?" * 12}
        return (f"LongMem over the frozen backbone {record['path'] or '(random init)'} (sha256 "
                f"{record['sha256'][:12]}): training {self.added_parameters():,} SideNet parameters, "
                f"{sum(p.numel() for p in self.backbone.parameters()):,} backbone parameters frozen")

    def export_tensors(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The SideNet only: the backbone stays where the record points."""
        return {k[len("side."):]: v for k, v in state.items() if k.startswith("side.")}

    def export_meta(self, state: dict[str, Tensor], directory: Path) -> dict[str, Any]:
        """The backbone's record; its hash is checked against the one taken at build time (a changed hash
        means the "frozen" backbone was updated).  A random backbone is first written next to the export."""
        from .longmem_io import save_backbone, weights_hash

        record = getattr(self, "backbone_record", None)
        if record is None:
            raise RuntimeError("LongMem.export_meta needs a LongMem made by LongMem.build (it records the backbone)")
        # The gathered state dict, not self.backbone: under FSDP / ZeRO-3 the live parameters are shards.
        backbone_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        live = weights_hash(backbone_state, self.backbone.config.tie_embeddings)
        if live != record["sha256"]:
            raise RuntimeError(f"LongMem export: the frozen backbone's weights changed during training "
                               f"(sha256 {record['sha256'][:12]} -> {live[:12]})")
        path = record["path"]
        if path is None:
            path = str(save_backbone(self.backbone, Path(directory).parent / "random_backbone", backbone_state))
        return {"backbone": {"path": path, "abs_path": str(Path(path).resolve()), "sha256": record["sha256"],
                             "random_init": record["path"] is None, "model": self.backbone.config.to_dict()},
                "sidenet_parameters": self.added_parameters()}

    @classmethod
    def load(cls, directory: Path, meta: dict[str, Any], tensors: dict[str, Tensor], model_config: Any = None, *,
             backbone: Any = None, verify: bool = True) -> LongMem:
        """The recorded backbone (or ``backbone``: an export folder or a model), hash-checked unless ``verify`` is
        off, with the saved SideNet; it can be exported again (the record carries over)."""
        from .longmem_io import longmem_backbone

        model = cls(longmem_backbone(meta, directory, backbone, verify), LongMemConfig(**meta["config"]))
        model.backbone_record = {"path": meta["backbone"]["path"], "sha256": meta["backbone"]["sha256"]}
        missing, unexpected = model.side.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ValueError(f"LongMem export {str(directory)!r}: SideNet weights do not match: missing {missing}, "
                             f"unexpected {unexpected}")
        return model

    def __init__(self, backbone: nn.Module, config: LongMemConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        config = config_from_args("LongMem", LongMemConfig, config, kwargs)
        bb = _adapter(backbone, config.memory_layer)
        self.config = config
        self.memory_layer = bb.memory_layer
        self.n_kv_heads, self.d_head = bb.n_kv_heads, bb.d_head
        self.side = SideNet(bb.block, bb.final_norm(), bb.n_layers, bb.memory_layer, config.reduction,
                            config.n_chunks)
        self.side.memory_attention.memory_off = not config.use_memory
        self.backbone = backbone
        self._bb = bb
        for p in backbone.parameters():
            p.requires_grad_(False)
        backbone.eval()

    @property
    def hidden_size(self) -> int:
        return self.side.norm.weight.shape[0]

    @property
    def split_multiple(self) -> int:
        return 1

    def train(self, mode: bool = True) -> LongMem:
        """Train/eval the SideNet; the frozen backbone always stays in eval mode (no dropout)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The SideNet's parameters: the only ones an optimizer should see."""
        return [p for p in self.side.parameters() if p.requires_grad]

    def added_parameters(self) -> int:
        """Parameters LongMem adds to the backbone (the SideNet, memory gate included)."""
        return sum(p.numel() for p in self.side.parameters())

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self._bb.embed_weight.numel() if exclude_embeddings else n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (for MFU): the frozen backbone's forward, the SideNet's forward + backward.

        Backbone: 2 per block parameter plus q.k and p.v over the segment (forward only; its head is not
        run).  SideNet: 6 per block parameter, 12 H d_head per visible key in each attention (the memory
        layer adds its n_chunks * chunk_size retrieved keys), the head's forward and its backward to the
        input (4 V D; the head is frozen) and the exact chunk search (2 H d_head per stored chunk key).
        The per-token cost does not depend on ``seq_len``: every segment sees at most ``segment_len`` keys.
        """
        c = self.config
        S, H_d = c.segment_len, self.side.memory_attention.n_heads * self.d_head
        backbone = 2 * sum(p.numel() for layer in self._bb.layers for p in layer.parameters())
        backbone += 4 * H_d * S * len(self._bb.layers)
        side = 6 * sum(p.numel() for p in self.side.parameters())
        side += 12 * H_d * S * len(self.side.blocks) + 12 * H_d * c.n_chunks * c.chunk_size
        vocab, width = self._bb.lm_head.weight.shape
        search = 2 * H_d * (c.capacity // c.chunk_size) if c.use_memory else 0
        return backbone + side + 4 * vocab * width + search

    def memory_stats(self) -> dict[str, float]:
        """The memory layer's last call: mean gate sigma(g), memory mass, fraction of queries with memory."""
        return {k: float(v) for k, v in self.side.memory_attention.last_stats.items()}

    def state_size(self, seq_len: int | None = None) -> int:
        """Floats per sequence: the bank's keys, values and chunk keys (the open segment is not counted)."""
        c = self.config
        return self.n_kv_heads * self.d_head * (2 * c.capacity + c.capacity // c.chunk_size)

    def init_state(self, batch_size: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> LongMemState:
        """Fresh rows: an empty bank and no open segment."""
        from ...memory.bank import KVMemoryBank

        ref = self.side.norm.weight
        device = ref.device if device is None else device
        c = self.config
        if dtype is None:
            dtype = getattr(torch, c.bank_dtype) if c.bank_dtype is not None else ref.dtype
            # The bank stores fp32 / fp16 / bf16 only: a float64 model (oracle tests) keeps an fp32 bank.
            dtype = torch.float32 if dtype == torch.float64 else dtype
        bank = KVMemoryBank(batch_size, self.n_kv_heads, self.d_head, c.capacity, c.chunk_size,
                            device=device, dtype=dtype)
        return LongMemState(bank, torch.zeros(batch_size, 0, dtype=torch.long, device=device))

    def reset_state(self, state: LongMemState, mask: Tensor) -> LongMemState:
        """Rows where ``mask`` ``[B]`` (bool) is true start a new document: their bank rows are emptied.

        The segment clock is shared by the batch, so a reset must fall on a segment boundary (no
        open segment); feed calls whose length is a multiple of ``segment_len`` when resetting.
        """
        state = self._check_state(state, state.open_ids if isinstance(state, LongMemState) else None)
        batch = state.open_ids.shape[0]
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (batch,):
            raise ValueError(f"mask must be a bool tensor [B={batch}], got {getattr(mask, 'shape', mask)}")
        if state.open_ids.shape[1] and bool(mask.any()):
            raise ValueError(f"reset_state inside an open segment ({state.open_ids.shape[1]} of "
                             f"{self.config.segment_len} tokens): documents must start on segment boundaries")
        state.bank.reset(mask)
        return state

    def forward(self, input_ids: Tensor, state: LongMemState | None = None, labels: Tensor | None = None, *,
                cu_seqlens: Tensor | None = None, output_hidden: bool = False) -> LMOutput:
        """Run the segments of ``input_ids`` in order, reading and then writing the bank.

        Args:
            input_ids: ``[B, T]`` integer token ids, any ``T >= 1``; row b continues document stream b.
            state: ``None`` (fresh streams) or the ``state`` of a previous output.  Its bank is updated
                in place.
            labels: optional ``[B, T]`` targets aligned with ``input_ids`` (shifted inside, -100 ignored).
            cu_seqlens: not supported (streams are rows; use ``reset_state`` at document boundaries).
            output_hidden: also return the SideNet's final-norm hidden states.

        Returns:
            ``LMOutput`` with logits ``[B, T, V]``, the new ``LongMemState`` and the loss with labels.
        """
        if cu_seqlens is not None:
            raise ValueError("LongMem does not take cu_seqlens: give each document stream its own row and "
                             "reset rows with reset_state")
        check_token_ids(input_ids, "input_ids", self._bb.vocab_size)
        B, T = input_ids.shape
        if labels is not None:
            check_labels(labels, B, T, self._bb.vocab_size)
        state = self._check_state(state, input_ids)
        S = self.config.segment_len
        n_open = state.open_ids.shape[1]
        ids = torch.cat((state.open_ids, input_ids), dim=1) if n_open else input_ids
        bank = state.bank if self.config.use_memory else None
        hidden = []
        for start in range(0, ids.shape[1], S):
            segment = ids[:, start:start + S]
            states, k, v = self._backbone_pass(segment)
            hidden.append(self.side(states, bank))
            if bank is not None and segment.shape[1] == S:
                # Written after the memory layer read the bank: a segment never retrieves itself.
                bank.append(k, v)
        h = torch.cat(hidden, dim=1)[:, n_open:]
        logits = self._bb.lm_head(h)
        tail = ids.shape[1] % S
        new_state = LongMemState(state.bank, ids[:, ids.shape[1] - tail:])
        out = LMOutput(logits=logits, state=new_state, hidden=h if output_hidden else None)
        if labels is not None:
            out.ce_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().long(),
                                          ignore_index=IGNORE_INDEX)
            out.loss = out.ce_loss
        return out

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                 state: LongMemState | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Continue ``input_ids`` ``[B, T]`` across segment boundaries (exactly the segmented forward).

        Each new token re-runs the open segment (at most ``segment_len`` tokens); a segment that fills
        is written to the bank exactly as ``forward`` writes it.

        Returns:
            ``[B, T + n]`` token ids, ``n <= max_new_tokens``.
        """
        check_max_new_tokens(max_new_tokens)
        check_token_ids(input_ids, "input_ids", self._bb.vocab_size)
        if max_new_tokens == 0:
            return input_ids
        out = self(input_ids, state=state)
        state = out.state

        def advance(token: Tensor) -> Tensor:
            nonlocal state
            step = self(token[:, None], state=state)
            state = step.state
            return step.logits[:, -1]

        return decode_loop(input_ids, out.logits[:, -1], advance, max_new_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, generator=generator)

    def _backbone_pass(self, segment: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """Frozen backbone on one segment: (H^0..H^L, K_m [B, H_kv, T, d], V_m [B, H_kv, T, d])."""
        B, T = segment.shape
        with torch.no_grad(), self._capture() as (hidden, kv):
            self._bb.run(segment)
        if len(hidden) != self._bb.n_layers + 1 or set(kv) != {"k", "v"}:
            raise RuntimeError("the backbone hooks did not fire as expected (a block or k/v projection was skipped)")
        k, v = (kv[n].view(B, T, self.n_kv_heads, self.d_head).transpose(1, 2) for n in ("k", "v"))
        return hidden, k, v

    @contextmanager
    def _capture(self) -> Iterator[tuple[list[Tensor], dict[str, Tensor]]]:
        """Hooks collecting the block inputs/outputs and layer m's un-rotated k/v, removed on exit."""
        layers = self._bb.layers
        hidden: list[Tensor] = []
        kv: dict[str, Tensor] = {}
        attention = self._bb.attention

        def output(module: nn.Module, args: Any, out: Any) -> None:
            # memzoo Blocks return (x, state); HF decoder layers a tensor (or a tuple in older versions).
            hidden.append(out if isinstance(out, Tensor) else out[0])

        handles = [
            layers[0].register_forward_pre_hook(
                lambda module, args, kwargs: hidden.append(args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True),
            *(layer.register_forward_hook(output) for layer in layers),
            attention.k_proj.register_forward_hook(lambda module, args, out: kv.__setitem__("k", out)),
            attention.v_proj.register_forward_hook(lambda module, args, out: kv.__setitem__("v", out)),
        ]
        try:
            yield hidden, kv
        finally:
            for handle in handles:
                handle.remove()


    def _check_state(self, state: LongMemState | None, ids: Tensor | None) -> LongMemState:
        if state is None:
            return self.init_state(ids.shape[0], device=ids.device)
        if not isinstance(state, LongMemState):
            raise TypeError(f"state must be a LongMemState (as returned by forward), got {type(state).__name__}")
        bank, open_ids = state.bank, state.open_ids
        B = open_ids.shape[0]
        if ids is not None and ids.shape[0] != B:
            raise ValueError(f"state has batch size {B}, but the input has {ids.shape[0]} sequences")
        if open_ids.dim() != 2 or open_ids.shape[1] >= self.config.segment_len:
            raise ValueError(f"state.open_ids must be [B, n] with n < segment_len={self.config.segment_len}, "
                             f"got {tuple(open_ids.shape)}")
        shape = tuple(getattr(bank, "keys", torch.empty(0)).shape)
        if shape != (B, self.n_kv_heads, self.config.capacity, self.d_head):
            raise ValueError(f"state.bank does not fit this LongMem: keys {shape}, expected "
                             f"{(B, self.n_kv_heads, self.config.capacity, self.d_head)}")
        return state
