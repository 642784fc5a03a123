"""Hugging Face transformers integration: Auto classes, save/load, ``generate``, attention swapping, conversion.

    import memzoo.integrations.hf                     # registers model_type "memzoo" with the Auto classes
    model = MemzooForCausalLM(MemzooConfig(pattern=["gated_delta"], d_model=64, n_layers=2))
    model.save_pretrained(path); AutoModelForCausalLM.from_pretrained(path).generate(ids, max_new_tokens=8)
    replace_attention(llama, mixer="gated_delta", n_heads=4)   # memzoo mixers inside an HF decoder
    python -m memzoo.integrations.hf convert runs/tiny/final hf_dir     # memzoo-train export <-> HF folder

``MemzooForCausalLM`` holds memzoo's ``LanguageModel`` as ``self.model``, so HF weights are the
memzoo weights with a ``model.`` prefix and conversion is a renaming.  Generation carries
memzoo's own per-layer state in the cache slot (a ``MemzooState``, not a ``transformers.Cache``
subclass; the slot is ``past_key_values`` in transformers 4.x and early 5.x, ``cache`` since, and both names
are accepted): the model opts out of the default ``DynamicCache`` and its own
``prepare_inputs_for_generation`` feeds only the tokens the state has not consumed yet.  That uses
three small, long-stable hooks instead of HF's cache internals; see docs/hf.md for the reasons.
Needs the ``hf`` extra (transformers, safetensors); nothing else in memzoo imports this module.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import transformers
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..models.block import RMSNorm
from ..models.config import ModelConfig
from ..models.init import init_linear
from ..models.lm import LanguageModel
from ..models.state import index_state
from .hf_replace import REPLACED_CONFIG_KEY, MemzooAttentionAdapter, load_replaced, replace_attention

try:
    # transformers >= 5: init functions that skip parameters already loaded from a checkpoint.
    from transformers import initialization as _init
except ImportError:
    _init = nn.init

__all__ = [
    "MemzooConfig", "MemzooState", "MemzooPreTrainedModel", "MemzooForCausalLM", "MemzooCausalLMOutput",
    "MemzooAttentionAdapter", "replace_attention", "load_replaced", "REPLACED_CONFIG_KEY", "memzoo_to_hf",
    "hf_to_memzoo", "main",
]

MODEL_TYPE = "memzoo"
_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
# The output field (and generate's keyword) that carries the cache: renamed from past_key_values to cache in 5.x.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# Files of a model folder that conversion rewrites; every other file (tokenizer) is copied as is.
_MODEL_FILES = {"model.safetensors", "config.json", "generation_config.json"}


class MemzooConfig(PretrainedConfig):
    """The HF config of a memzoo ``LanguageModel``: the ``ModelConfig`` fields plus HF's token ids.

    ``hidden_size`` and ``num_hidden_layers`` alias ``d_model`` and ``n_layers`` (``generate`` needs
    ``num_hidden_layers``).  The fields are validated by building the ``ModelConfig`` at once, so a
    bad mixer name or option fails here, not at model construction.
    """

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers"}

    def __init__(self, vocab_size: int = 256, d_model: int = 256, n_layers: int = 4,
                 pattern: list[str] | tuple[str, ...] | str = ("attention",), mixers: dict[str, dict] | None = None,
                 d_ff: int | None = None, ffn: str = "swiglu", ffn_opts: dict[str, Any] | None = None,
                 norm_eps: float = 1e-5, init_std: float = 0.02, use_cache: bool = True,
                 tie_word_embeddings: bool = True, pad_token_id: int | None = None, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, **kwargs: Any) -> None:
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_layers = n_layers
        self.pattern = [pattern] if isinstance(pattern, str) else list(pattern)
        self.mixers = dict(mixers or {})
        self.d_ff = d_ff
        self.ffn = ffn
        self.ffn_opts = dict(ffn_opts or {})
        self.norm_eps = norm_eps
        self.init_std = init_std
        self.use_cache = use_cache
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.to_model_config()

    def to_model_config(self) -> ModelConfig:
        """The memzoo ``ModelConfig`` this config describes."""
        return ModelConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                           pattern=tuple(self.pattern), mixers=self.mixers, d_ff=self.d_ff, ffn=self.ffn,
                           ffn_opts=self.ffn_opts, norm_eps=self.norm_eps,
                           tie_embeddings=self.tie_word_embeddings, init_std=self.init_std)

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs: Any) -> MemzooConfig:
        """An HF config from a memzoo ``ModelConfig``; ``kwargs`` add HF fields (``eos_token_id=...``)."""
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a memzoo ModelConfig, got {type(config).__name__}")
        d = config.to_dict()
        d["tie_word_embeddings"] = d.pop("tie_embeddings")
        return cls(**d, **kwargs)


class MemzooState:
    """memzoo's per-layer state in the ``past_key_values`` slot of ``generate``.

    ``layers`` is ``LanguageModel``'s state tuple; ``seen`` counts the tokens it has consumed, which
    is how ``prepare_inputs_for_generation`` knows which tokens are new.  Deliberately not a
    ``transformers.Cache``: the few attributes ``generate`` reads from any cache are set here.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, layers: tuple[Any, ...], seen: int) -> None:
        self.layers = layers
        self.seen = seen

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def __repr__(self) -> str:
        return f"MemzooState(layers={len(self.layers)}, seen={self.seen})"


@dataclass
class MemzooCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus memzoo's loss parts (``loss = ce_loss + sum(aux_losses)``)."""

    ce_loss: Tensor | None = None
    aux_losses: dict[str, Tensor] | None = None


class MemzooPreTrainedModel(PreTrainedModel):
    """Weight init, FSDP wrapping and HF bookkeeping shared by the memzoo HF models."""

    config_class = MemzooConfig
    base_model_prefix = "model"
    # FSDP (Accelerate's TRANSFORMER_BASED_WRAP) shards one memzoo Block at a time.
    _no_split_modules = ["Block"]
    # memzoo Blocks are not GradientCheckpointingLayers; wrap them with torch.utils.checkpoint instead.
    supports_gradient_checkpointing = False
    # A recurrent state cannot be rolled back, so HF refuses assisted decoding for this model.
    _is_stateful = True
    # transformers 4.x reads this flag before creating a DynamicCache; 5.x asks the classmethod below.
    _supports_cache_class = False

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # Without this, generate() puts a DynamicCache into past_key_values, which memzoo's state cannot live in.
        return False

    def _init_weights(self, module: nn.Module) -> None:
        # The same draws as LanguageModel.reset_parameters, via transformers' guarded init functions
        # (5.x) so that loading a checkpoint never re-draws a loaded weight.  Mixer-specific
        # parameters (decays, SSM matrices) keep the values their constructors gave them, and
        # come from the checkpoint when loading.
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            init_linear(module, std, self.config.n_layers, normal_=_init.normal_, zeros_=_init.zeros_)
        elif isinstance(module, nn.Embedding):
            _init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            _init.ones_(module.weight)


class MemzooForCausalLM(MemzooPreTrainedModel, GenerationMixin):
    """memzoo's ``LanguageModel`` behind HF's causal-LM interface (``self.model`` is the LanguageModel)."""

    # 5.x maps each tied target to its source; 4.x lists the targets.
    _tied_weights_keys = ({"model.lm_head.weight": "model.embed.weight"} if _TRANSFORMERS_MAJOR >= 5
                          else ["model.lm_head.weight"])

    def __init__(self, config: MemzooConfig) -> None:
        if not isinstance(config, MemzooConfig):
            raise TypeError(f"config must be a MemzooConfig, got {type(config).__name__}")
        super().__init__(config)
        self.model = LanguageModel(config.to_model_config())
        self.post_init()

    @classmethod
    def from_memzoo(cls, model: LanguageModel, **config_kwargs: Any) -> MemzooForCausalLM:
        """Wrap a copy of a memzoo ``LanguageModel``'s weights; ``config_kwargs`` add HF fields (token ids)."""
        if not isinstance(model, LanguageModel):
            raise TypeError(f"model must be a memzoo LanguageModel, got {type(model).__name__}")
        param = next(model.parameters())
        hf = cls(MemzooConfig.from_model_config(model.config, **config_kwargs))
        hf.model.load_state_dict(model.state_dict())
        return hf.to(device=param.device, dtype=param.dtype)

    def to_memzoo(self) -> LanguageModel:
        """The wrapped ``LanguageModel`` (shares the weights)."""
        return self.model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.lm_head = value

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                inputs_embeds: Tensor | None = None, past_key_values: MemzooState | None = None,
                use_cache: bool | None = None, labels: Tensor | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, logits_to_keep: int = 0, cu_seqlens: Tensor | None = None,
                cache: MemzooState | None = None, **kwargs: Any) -> MemzooCausalLMOutput | tuple:
        """HF's causal-LM forward on memzoo's ``LanguageModel.forward``.

        Args:
            input_ids: ``[B, T]`` token ids (or ``inputs_embeds`` ``[B, T, D]``).
            attention_mask: only all-ones masks are accepted: memzoo models have no padding (pack
                variable-length batches with ``cu_seqlens`` instead).
            past_key_values: ``None`` or the ``MemzooState`` of a previous output; continues those sequences.
                ``cache`` is the same argument under its newer transformers name (pass at most one).
            use_cache: return the new state as ``past_key_values`` (default ``config.use_cache``).
            labels: ``[B, T]`` aligned with ``input_ids``, shifted inside; ``-100`` is ignored.
            output_hidden_states: return ``(final-norm hidden states,)`` (memzoo keeps no per-layer list).
            logits_to_keep: if > 0, logits for the last ``logits_to_keep`` positions only.
            cu_seqlens: ``[N+1]`` offsets of packed sequences (B = 1).
            kwargs: HF plumbing (``position_ids``, ``cache_position``, ...); memzoo derives positions
                from its state, so these are not used.

        Returns:
            ``MemzooCausalLMOutput`` (a tuple when ``return_dict=False``).
        """
        if not isinstance(logits_to_keep, int) or isinstance(logits_to_keep, bool) or logits_to_keep < 0:
            raise TypeError(f"logits_to_keep must be an int >= 0, got {logits_to_keep!r}")
        if past_key_values is not None and cache is not None:
            raise TypeError("past_key_values and cache are the same argument (renamed in transformers 5.x): "
                            "pass one of them")
        past_key_values = cache if cache is not None else past_key_values
        if past_key_values is not None and not isinstance(past_key_values, MemzooState):
            raise TypeError("past_key_values must be None or the MemzooState of a previous output, got "
                            f"{type(past_key_values).__name__} (memzoo models do not use transformers caches)")
        state = None if past_key_values is None else past_key_values.layers
        seen = 0 if past_key_values is None else past_key_values.seen
        if attention_mask is not None:
            ids_or_embeds = input_ids if input_ids is not None else inputs_embeds
            n_rows, n_new = (ids_or_embeds.shape[0], ids_or_embeds.shape[1]) if ids_or_embeds is not None else (
                None, None)
            if (not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2
                    or (n_rows is not None and (attention_mask.shape[0] != n_rows
                                                or attention_mask.shape[1] not in (n_new, seen + n_new)))):
                got = (tuple(attention_mask.shape) if isinstance(attention_mask, Tensor)
                       else type(attention_mask).__name__)
                raise ValueError(f"attention_mask must be a [B, T] tensor matching input_ids ([{n_rows}, {n_new}], or "
                                 f"[{n_rows}, {seen + n_new}] counting the tokens already seen), got {got}")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("attention_mask: memzoo models do not support padding; pass unpadded rows of equal "
                             "length, or pack sequences with cu_seqlens")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
        output_hidden = bool(output_hidden_states)
        decoding = (state is not None and input_ids is not None and input_ids.shape[-1] == 1 and labels is None
                    and cu_seqlens is None and not output_hidden and input_ids.dim() == 2)
        if decoding:
            # The exact path LanguageModel.generate takes per token, so both generators agree bit for bit.
            logits, new_state = self.model.step(input_ids[:, 0], state)
            out_logits, loss, ce_loss, aux, hidden = logits[:, None], None, None, {}, None
        else:
            out = self.model(input_ids, state=state, labels=labels, cu_seqlens=cu_seqlens,
                             logits_to_keep=logits_to_keep, inputs_embeds=inputs_embeds, output_hidden=output_hidden)
            out_logits, new_state, loss, ce_loss, aux = out.logits, out.state, out.loss, out.ce_loss, out.aux_losses
            hidden = (out.hidden,) if output_hidden else None
        n_new = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        past = MemzooState(new_state, seen + n_new) if use_cache else None
        output = MemzooCausalLMOutput(loss=loss, logits=out_logits, hidden_states=hidden, ce_loss=ce_loss,
                                      aux_losses=aux, **{CACHE_FIELD: past})
        return output if return_dict else output.to_tuple()

    def prepare_inputs_for_generation(self, input_ids: Tensor, past_key_values: MemzooState | None = None,
                                      attention_mask: Tensor | None = None, inputs_embeds: Tensor | None = None,
                                      use_cache: bool | None = None, cache: MemzooState | None = None,
                                      **kwargs: Any) -> dict[str, Any]:
        """Feed the prompt (or ``inputs_embeds``) once, then only the tokens the state has not seen.

        The slice comes from ``MemzooState.seen``, not from the arguments HF passes to say which
        tokens are new (``cache_position`` in 4.x, ``next_sequence_length`` in 5.x), so the
        same code works across those versions.  The state arrives as ``past_key_values`` or
        ``cache`` (its newer name) and goes back under the name this transformers uses.  Only the
        last position's logits are computed: ``generate`` reads no others.
        """
        past_key_values = cache if cache is not None else past_key_values
        if past_key_values is None:
            if inputs_embeds is not None:
                model_inputs: dict[str, Any] = {"input_ids": None, "inputs_embeds": inputs_embeds}
            else:
                model_inputs = {"input_ids": input_ids}
        else:
            if past_key_values.seen >= input_ids.shape[1]:
                raise ValueError(f"past_key_values has seen {past_key_values.seen} tokens, but input_ids has only "
                                 f"{input_ids.shape[1]}: pass the full sequence so far")
            model_inputs = {"input_ids": input_ids[:, past_key_values.seen:]}
        model_inputs.update({CACHE_FIELD: past_key_values}, attention_mask=attention_mask,
                            use_cache=use_cache, logits_to_keep=kwargs.get("logits_to_keep") or 1)
        return model_inputs

    def _reorder_cache(self, past_key_values: MemzooState, beam_idx: Tensor) -> MemzooState:
        # Beam search: every state leaf is batch first, so one index_select per leaf follows the beams.
        return MemzooState(index_state(past_key_values.layers, beam_idx), past_key_values.seen)


def memzoo_to_hf(src: str | Path, dst: str | Path, **config_kwargs: Any) -> Path:
    """Convert a memzoo model folder (memzoo-train's ``final/``) to an HF folder; other files are copied.

    ``config_kwargs`` add HF fields such as ``eos_token_id``.
    """
    from ..train.checkpoint import from_pretrained

    src, dst = Path(src), Path(dst)
    model = MemzooForCausalLM.from_memzoo(from_pretrained(src), **config_kwargs)
    model.save_pretrained(str(dst))
    _copy_extra_files(src, dst)
    return dst


def hf_to_memzoo(src: str | Path, dst: str | Path) -> Path:
    """Convert an HF ``MemzooForCausalLM`` folder to memzoo's format (``memzoo.from_pretrained`` loads it)."""
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    model = MemzooForCausalLM.from_pretrained(str(src)).to_memzoo()
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        # The same rule as memzoo-train's export: safetensors refuses shared tensors; the loader re-ties.
        tensors.pop("lm_head.weight")
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(model.config.to_json(indent=2))
    _copy_extra_files(src, dst)
    return dst


def _copy_extra_files(src: Path, dst: Path) -> None:
    if src.is_dir():
        for p in src.iterdir():
            if p.is_file() and p.name not in _MODEL_FILES:
                shutil.copy2(p, dst / p.name)


def _is_hf_folder(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"src: no config.json in {str(path)!r}")
    return json.loads(config.read_text()).get("model_type") == MODEL_TYPE


def main(argv: list[str] | None = None) -> int:
    """``python -m memzoo.integrations.hf convert SRC DST [--to hf|memzoo]``."""
    parser = argparse.ArgumentParser(prog="python -m memzoo.integrations.hf",
                                     description="Convert between memzoo model folders and Hugging Face folders.")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert a model folder (direction detected from config.json)")
    conv.add_argument("src", type=Path, help="memzoo folder (memzoo-train's final/) or HF folder")
    conv.add_argument("dst", type=Path, help="output folder")
    conv.add_argument("--to", choices=["hf", "memzoo"], default=None,
                      help="target format (default: the other one than src's)")
    conv.add_argument("--eos-token-id", type=int, default=None, help="eos_token_id for the HF config")
    args = parser.parse_args(argv)
    to = args.to or ("memzoo" if _is_hf_folder(args.src) else "hf")
    if to == "hf":
        extra = {} if args.eos_token_id is None else {"eos_token_id": args.eos_token_id}
        out = memzoo_to_hf(args.src, args.dst, **extra)
    else:
        out = hf_to_memzoo(args.src, args.dst)
    print(f"wrote {to} model to {out}")
    return 0


AutoConfig.register(MODEL_TYPE, MemzooConfig, exist_ok=True)
AutoModel.register(MemzooConfig, MemzooForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(MemzooConfig, MemzooForCausalLM, exist_ok=True)

if __name__ == "__main__":
    sys.exit(main())
