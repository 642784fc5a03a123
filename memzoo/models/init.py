"""Initialisation marks: what a layer tells the language model about its parameters' starting values.

``LanguageModel.reset_parameters`` (and the transformers wrapper's ``_init_weights``) re-draw every
``nn.Linear``/``nn.Embedding`` weight from Normal(0, init_std) and zero every ``nn.Linear`` bias, except
where a layer says otherwise with a mark set in its constructor, like ``_no_weight_decay`` for the optimizer:

* ``residual_output(linear)``: the projection writes into the residual stream (a mixer's ``o_proj``, the
  FFN's ``down_proj``); its weight is drawn with GPT-2's residual std ``init_std / sqrt(2 * n_layers)``.
* ``keep_init(param, ...)``: the layer chose this value on purpose (e.g. GLA's gate bias, which sets the
  initial forgetting); it is left as the constructor made it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor, nn

__all__ = ["RESIDUAL_OUT", "KEEP_INIT", "residual_output", "is_residual_output", "keep_init", "keeps_init",
           "init_linear"]

# Attribute names of the marks (on the module / on the parameter).
RESIDUAL_OUT = "_memzoo_residual_out"
KEEP_INIT = "_memzoo_keep_init"


def residual_output(linear: nn.Linear) -> nn.Linear:
    """Mark ``linear`` as a residual output projection and return it."""
    setattr(linear, RESIDUAL_OUT, True)
    return linear


def is_residual_output(module: nn.Module) -> bool:
    return bool(getattr(module, RESIDUAL_OUT, False))


def keep_init(*params: Tensor | None) -> None:
    """Mark parameters whose constructor value must survive the model's initialisation (``None`` is skipped)."""
    for p in params:
        if p is not None:
            setattr(p, KEEP_INIT, True)


def keeps_init(param: Tensor) -> bool:
    return bool(getattr(param, KEEP_INIT, False))


def init_linear(module: nn.Linear, std: float, n_layers: int, *,
                normal_: Callable[..., Tensor] = nn.init.normal_, zeros_: Callable[..., Tensor] = nn.init.zeros_
                ) -> None:
    """Normal(0, std) weight (``std / sqrt(2 n_layers)`` for a residual output), zero bias, marks respected.

    ``normal_``/``zeros_`` let the transformers wrapper pass its guarded init functions.
    """
    if is_residual_output(module):
        std = std / math.sqrt(2 * n_layers)
    if not keeps_init(module.weight):
        normal_(module.weight, mean=0.0, std=std)
    if module.bias is not None and not keeps_init(module.bias):
        zeros_(module.bias)
