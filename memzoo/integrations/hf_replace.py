"""memzoo mixers inside a Hugging Face decoder: ``replace_attention`` and the adapter it installs.

    replace_attention(llama, mixer="gated_delta", n_heads=4)    # every self-attention -> a memzoo mixer
    llama.generate(ids, max_new_tokens=32)                       # cached, exact: the mixers carry their state

How the state travels (docs/hf.md has the reasons).  Each adapter finds the model's cache object among the
arguments its decoder layer passes it, whatever the keyword (``past_key_value``, ``past_key_values``,
``layer_past``, ``cache``, or positional), and keeps the mixer's state in a small store attached to that
object.  It also appends one bookkeeping entry per token to its layer of the cache through the public
``Cache.update(keys, values, layer_idx)``: key = the row's index in the stored state, value = the token's
absolute position.  So the cache reports the true sequence length (models that place absolute position
embeddings outside attention, GPT-2 and OPT, read it), beam search's reordering of the cache tells the
adapter how to reorder its state, and a cache that was cropped, rolled back or filled elsewhere is detected
and refused instead of being decoded from.  Needs only ``Cache``, ``DynamicCache``, ``update`` and
``get_seq_length``, public since transformers 4.36.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from transformers import Cache, DynamicCache

from ..models.registry import MIXERS, build_mixer
from ..models.state import index_state

try:
    from transformers import EncoderDecoderCache
except ImportError:  # pragma: no cover - every supported release has it
    EncoderDecoderCache = ()

__all__ = ["MemzooAttentionAdapter", "replace_attention", "load_replaced", "REPLACED_CONFIG_KEY"]

# Child names of the self-attention module in HF decoder layers: Llama, Mistral, Qwen2, Gemma, Phi3 and OPT use
# ``self_attn``, GPT-2 ``attn`` (its cross-attention is ``crossattention`` and stays), GPT-NeoX ``attention``,
# Falcon ``self_attention``.
_ATTENTION_CHILD_NAMES = ("self_attn", "attn", "self_attention", "attention")
# replace_attention records its arguments in the model config under this key (saved with config.json).
REPLACED_CONFIG_KEY = "memzoo_replace_attention"
# The store an adapter keeps on a cache object (an attribute, so copy.deepcopy of a prompt cache copies it).
_STORE_ATTR = "_memzoo_states"
# Cache implementations whose storage is preallocated or transformed: bookkeeping entries cannot live there.
_STATIC_CACHES = ("static", "sliding_window", "hybrid", "hybrid_chunked", "mamba", "quantized")


class _Entry(NamedTuple):
    state: Any  # the mixer's state after ``seen`` tokens, rows in the order of the last call
    seen: int


class _Call:
    """Per-forward bookkeeping between the model-level hooks and the adapters."""

    def __init__(self) -> None:
        self.saw_cache = False


class MemzooAttentionAdapter(nn.Module):
    """A memzoo mixer with the call signature of an HF decoder's self-attention module.

    Accepts whatever arguments the decoder layer passes and returns ``(output, None)`` like the attention
    modules of transformers >= 4.56.  The mixer is causal by construction and uses its own positions (RoPE
    for ``attention``, none for the memories), so masks and position embeddings are not needed.  When the
    call carries a ``transformers`` cache, the mixer's state is kept with it (see the module docstring), so
    cached generation is exact; without one, the mixer runs on the given tokens from a fresh state.
    """

    def __init__(self, mixer: nn.Module, replaced: str, layer_idx: int, attrs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.mixer = mixer
        self.replaced = replaced
        self.layer_idx = layer_idx
        # Plain attributes of the replaced module (``is_sliding``, ``sliding_window``, ...) that some decoder
        # layers read from their attention; answered by __getattr__ below.
        self._replaced_attrs = dict(attrs or {})
        self._call: _Call | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            attrs = self.__dict__.get("_replaced_attrs", {})
            if name in attrs:
                return attrs[name]
            raise

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, None]:
        cache = _find_cache((*args, *kwargs.values()))
        if cache is None:
            y, _ = self.mixer(hidden_states)
            return y, None
        if self._call is not None:
            self._call.saw_cache = True
        return self._cached_forward(hidden_states, cache), None

    def _cached_forward(self, x: Tensor, cache: Cache) -> Tensor:
        if not isinstance(cache, DynamicCache):
            raise ValueError(
                f"cache: a {type(cache).__name__} cannot carry the state of the memzoo mixer that replaced "
                f"{self.replaced}; generate with the default dynamic cache (cache_implementation=None or "
                "'dynamic'), or use_cache=False")
        B, T = x.shape[:2]
        store = cache.__dict__.setdefault(_STORE_ATTR, {})
        entry = store.get(self.layer_idx)
        has_past = cache.get_seq_length(self.layer_idx) > 0
        if has_past and entry is None:
            raise ValueError(
                f"cache: it already holds tokens for layer {self.layer_idx} that the memzoo mixer replacing "
                f"{self.replaced} never processed (a cache from another model, or filled before "
                "replace_attention); start from an empty cache")
        seen = entry.seen if has_past else 0
        row = torch.arange(B, device=x.device, dtype=torch.float32)
        pos = torch.arange(seen, seen + T, device=x.device, dtype=torch.float32)
        keys = row.view(B, 1, 1, 1).expand(B, 1, T, 1).contiguous()
        values = pos.view(1, 1, T, 1).expand(B, 1, T, 1).contiguous()
        all_keys, all_values = cache.update(keys, values, self.layer_idx)
        state = None
        if has_past:
            state = self._state_after_reorder(entry, all_keys, all_values, T)
        if T == 1 and state is not None:
            y_t, new_state = self.mixer.step(x[:, 0], state)
            y = y_t[:, None]
        else:
            y, new_state = self.mixer(x, state)
        store[self.layer_idx] = _Entry(new_state, seen + T)
        return y

    def _state_after_reorder(self, entry: _Entry, all_keys: Tensor, all_values: Tensor, T: int) -> Any:
        n_old = all_keys.shape[2] - T
        in_place = reordered = False
        if n_old > 0:
            rows = all_keys[:, 0, n_old - 1, 0].long()
            arange = torch.arange(rows.shape[0], device=rows.device)
            # Both checks in one transfer: one host sync per layer and token.
            in_place, reordered = torch.stack(((all_values[:, 0, n_old - 1, 0] == entry.seen - 1).all(),
                                               (rows != arange).any())).tolist()
        if not in_place:
            raise ValueError(
                f"cache: its entries for layer {self.layer_idx} do not end at position {entry.seen - 1}, where "
                f"the memzoo mixer replacing {self.replaced} stopped: the cache was cropped, rolled back or "
                "edited (assisted decoding, cache reuse with truncation). A recurrent state cannot be rolled "
                "back; regenerate from the prompt")
        # Beam search (or any batch reordering) reordered the cache rows: follow it.
        return index_state(entry.state, rows) if reordered else entry.state

    def extra_repr(self) -> str:
        return f"replaced={self.replaced}, layer_idx={self.layer_idx}"


def _find_cache(values: Iterable[Any]) -> Cache | None:
    for v in values:
        if isinstance(v, Cache):
            if EncoderDecoderCache and isinstance(v, EncoderDecoderCache):
                return v.self_attention_cache
            return v
    return None


def _check_attention_mask(mask: Any) -> None:
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        return
    valid = mask.bool()
    # A zero followed by a one in the same row is left (or inner) padding: the mixers would read the pad tokens.
    if bool((~valid[:, :-1] & valid[:, 1:]).any()):
        raise ValueError(
            "attention_mask: memzoo mixers (after replace_attention) do not support left or inner padding; "
            "generate rows of equal length without padding, or one prompt at a time. Right padding (zeros "
            "after the last token of a row) is accepted for training: the mixers are causal")


# The model's adapters, kept on the model so a copy.deepcopy of it has its own list (the hooks read it from the
# module they are called on, never from a closure).
_ADAPTERS_ATTR = "_memzoo_adapters"


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    _check_attention_mask(kwargs.get("attention_mask"))
    call = _Call()
    for adapter in getattr(module, _ADAPTERS_ATTR):
        adapter._call = call


def _post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    adapters = getattr(module, _ADAPTERS_ATTR)
    call = adapters[0]._call
    for adapter in adapters:
        adapter._call = None
    values = output.values() if hasattr(output, "values") else output if isinstance(output, tuple) else ()
    if call is not None and not call.saw_cache and _find_cache(values) is not None:
        raise ValueError(
            f"use_cache: {type(module).__name__}'s decoder layers did not pass the cache to the memzoo mixers, "
            "so their state cannot be carried; run with use_cache=False (generate then recomputes the prefix)")


def _install_hooks(model: nn.Module, adapters: list[MemzooAttentionAdapter]) -> None:
    # A plain list attribute (not a ModuleList: the adapters are registered where they replaced attention).
    object.__setattr__(model, _ADAPTERS_ATTR, list(adapters))
    model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    model.register_forward_hook(_post_hook, with_kwargs=True)


def replace_attention(model: nn.Module, mixer: str = "gated_delta", **cfg: Any) -> list[str]:
    """Swap every self-attention module of an HF decoder for a fresh memzoo mixer, in place.

    Everything else (embeddings, norms, MLPs, head) is kept.  The mixers are built at the model's
    ``hidden_size`` with options ``cfg`` and placed on the replaced module's device and dtype.  Cached
    ``generate`` (the default) carries the mixers' state and is exact; ``use_cache=False`` recomputes the
    prefix per token.  The arguments are recorded in ``model.config`` so :func:`load_replaced` can rebuild
    a saved model.

    Args:
        model: a transformers decoder-only model (tested: Llama, GPT-2, Qwen2, Mistral, Gemma 1/2/3, Phi3,
            OPT, GPT-NeoX, Falcon; docs/hf.md).
        mixer: a registered memzoo mixer name (``memzoo.MIXERS``).
        cfg: the mixer's config options (``n_heads=4``, ...); ``d_model`` comes from the model.

    Returns:
        The qualified names of the replaced modules.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if mixer not in MIXERS:
        raise ValueError(f"mixer must be one of {sorted(MIXERS)}, got {mixer!r}")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        raise ValueError("model must be a transformers model (a PreTrainedModel with a config)")
    if any(isinstance(m, MemzooAttentionAdapter) for m in model.modules()):
        raise ValueError("model: its attention was already replaced by memzoo mixers; call replace_attention "
                         "once, on a fresh model")
    text_config = config.get_text_config()
    if not hasattr(text_config, "hidden_size"):
        raise ValueError(f"model: its config ({type(text_config).__name__}) has no hidden_size")
    targets = _attention_modules(model)
    if not targets:
        raise ValueError(f"model: found no self-attention modules named {_ATTENTION_CHILD_NAMES} "
                         f"in {type(model).__name__}")
    # Build every mixer first so a bad option fails before the model is touched.
    layers = [build_mixer(mixer, text_config.hidden_size, cfg) for _ in targets]
    replaced, adapters = [], []
    for i, ((parent_name, parent, child_name, child), layer) in enumerate(zip(targets, layers)):
        ref = next(child.parameters(), None)
        if ref is not None:
            layer = layer.to(device=ref.device, dtype=ref.dtype)
        layer_idx = getattr(child, "layer_idx", None)
        attrs = {k: v for k, v in vars(child).items()
                 if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))}
        adapter = MemzooAttentionAdapter(layer, type(child).__name__, i if layer_idx is None else int(layer_idx),
                                         attrs)
        setattr(parent, child_name, adapter)
        adapters.append(adapter)
        replaced.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    _install_hooks(model, adapters)
    setattr(config, REPLACED_CONFIG_KEY, {"mixer": mixer, "cfg": dict(cfg)})
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and getattr(generation_config, "cache_implementation", None) in _STATIC_CACHES:
        generation_config.cache_implementation = None
    return replaced


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Module]]:
    targets: list[tuple[str, nn.Module, str, nn.Module]] = []
    taken: list[str] = []
    for parent_name, parent in model.named_modules():
        if any(parent_name == t or parent_name.startswith(t + ".") for t in taken):
            continue  # inside an attention module already chosen (its own submodules named like these)
        for child_name in _ATTENTION_CHILD_NAMES:
            child = getattr(parent, child_name, None)
            if isinstance(child, nn.Module) and "Attention" in type(child).__name__:
                targets.append((parent_name, parent, child_name, child))
                taken.append(f"{parent_name}.{child_name}" if parent_name else child_name)
                break
    return targets


def load_replaced(path: str | Path, model_class: Any = None, **kwargs: Any) -> nn.Module:
    """Load a model that was saved (``save_pretrained``) after :func:`replace_attention`.

    transformers loads everything but the attention (its own ``from_pretrained``, so its checkpoint key
    conversions, sharding and dtype options apply), the attention is replaced with the mixer and options
    recorded in the config, and the mixers' weights are loaded from the same files.  Every saved tensor
    must be used and every parameter found, or a ``ValueError`` names the keys.

    Args:
        path: the folder ``save_pretrained`` wrote.
        model_class: the model class (default ``AutoModelForCausalLM``).
        kwargs: passed to ``model_class.from_pretrained`` (``torch_dtype``/``dtype``, ``device_map``...).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = Path(path)
    recorded = getattr(AutoConfig.from_pretrained(str(path)), REPLACED_CONFIG_KEY, None)
    if not isinstance(recorded, dict) or "mixer" not in recorded:
        raise ValueError(f"path: {str(path)!r} holds no model saved after replace_attention "
                         f"(its config has no {REPLACED_CONFIG_KEY!r})")
    model_class = model_class or AutoModelForCausalLM
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the replaced attention's weights are missing by design
    try:
        model, info = model_class.from_pretrained(str(path), output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    delattr(model.config, REPLACED_CONFIG_KEY)
    names = replace_attention(model, recorded["mixer"], **recorded.get("cfg", {}))
    prefixes = tuple(f"{n}." for n in names)
    index = path / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    saved: dict[str, Tensor] = {}
    for name in files:
        saved.update({k: v for k, v in load_file(str(path / name)).items() if _under(k, prefixes)})
    own = {k for k in model.state_dict() if _under(k, prefixes)}
    missing, unexpected = own - set(saved), set(saved) - own
    unexpected |= {k for k in info["unexpected_keys"] if not _under(k, prefixes)}
    missing |= {k for k in info["missing_keys"] if not _under(k, prefixes)}
    if missing or unexpected:
        raise ValueError(f"path: the weights in {str(path)!r} do not match the replaced model: "
                         f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(saved, strict=False)
    return model.eval()


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key.startswith(p) or f".{p}" in f".{key}" for p in prefixes)
