"""The one registry of token mixers: name -> class.  Add a line here when a layer lands.

A name is what model configs use in ``pattern`` and ``mixers``; the class carries its config
dataclass as ``config_class``, so a mixer is built from ``d_model`` plus keyword overrides.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from .contract import Mixer, check_field_types, renamed_options
from .layers import TitansMAC, TitansMAG, TitansMAL
from .layers.attention import Attention
from .layers.gated_delta import GatedDeltaNet
from .layers.gla import GatedLinearAttention
from .layers.lssl import LSSL
from .layers.mom import MixtureOfMemories
from .layers.s4d import S4D
from .layers.titans import TitansMemory

__all__ = ["MIXERS", "mixer_config", "build_mixer", "unknown_name"]

MIXERS: dict[str, type[Mixer]] = {
    "attention": Attention,
    "gated_delta": GatedDeltaNet,
    "gla": GatedLinearAttention,
    "s4d": S4D,
    "lssl": LSSL,
    "titans": TitansMemory,
    "mom": MixtureOfMemories,
    "titans_mac": TitansMAC,
    "titans_mag": TitansMAG,
    "titans_mal": TitansMAL,
}


def unknown_name(what: str, name: str, known: Iterable[str]) -> str:
    """The message for an unknown ``name``: the nearest known names first, then every known name."""
    known = sorted(known)
    close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
    hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
    return f"unknown {what} {name!r}{hint}; available: {', '.join(known)}"


def _mixer_class(name: str) -> type[Mixer]:
    if name not in MIXERS:
        raise ValueError(unknown_name("mixer", name, MIXERS))
    return MIXERS[name]


def mixer_config(name: str, d_model: int, overrides: dict[str, Any] | None = None) -> Any:
    """The validated config of mixer ``name`` at width ``d_model`` with keyword ``overrides``."""
    cls = _mixer_class(name)
    overrides = dict(overrides or {})
    if "d_model" in overrides:
        raise ValueError(f"mixer {name!r}: d_model is set by the model, not per mixer")
    overrides = renamed_options(f"mixer {name!r}", cls.config_class, overrides)
    try:
        check_field_types(f"mixer {name!r}", cls.config_class, {"d_model": d_model, **overrides})
        return cls.config_class(d_model=d_model, **overrides)
    except TypeError as e:
        raise ValueError(f"bad options for mixer {name!r}: {e}") from None


def build_mixer(name: str, d_model: int, overrides: dict[str, Any] | None = None) -> Mixer:
    """Instantiate mixer ``name`` (see ``MIXERS``) at width ``d_model``."""
    return _mixer_class(name)(mixer_config(name, d_model, overrides))
