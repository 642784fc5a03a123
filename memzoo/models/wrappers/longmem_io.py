"""LongMem's files: the SideNet-only export, the frozen backbone's weight hash, and the loader.

    out/final/   model.safetensors (SideNet only: ``LongMem.side`` state dict)
                 wrapper.json      {"name": "longmem", "config": LongMemConfig fields,
                                    "backbone": {"path", "abs_path", "sha256", "random_init", "model"}}
                 config.json       the backbone's ModelConfig (what ``model`` was) + tokenizer files

``load_longmem(final)`` (also reached through ``memzoo.from_pretrained(final)``) loads the backbone
from its recorded path, checks the SHA-256 of its weights against the one recorded at export, and
rebuilds the LongMem.  A run with ``longmem.backbone = None`` (random backbone, smoke tests) first
writes that backbone as a normal export to ``out_dir/random_backbone`` and records that path.
Exports written before the wrapper protocol hold the same record in ``longmem.json``; they still load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import WRAPPER_FILE

__all__ = ["weights_hash", "load_longmem", "save_backbone", "LONGMEM_FILE"]

# The record of exports written before the wrapper protocol (now wrapper.json).
LONGMEM_FILE = "longmem.json"
_FORMAT = "memzoo-longmem-sidenet"


def weights_hash(weights: nn.Module | dict[str, torch.Tensor], tie_embeddings: bool | None = None) -> str:
    """SHA-256 over a backbone's weights: sorted names, dtypes, shapes and raw bytes.

    ``weights`` is the module or its (gathered) state dict; a tied ``lm_head.weight`` is left out
    (``tie_embeddings``: default the module's ``config.tie_embeddings``, else False), so the hash of a
    model equals the hash of the state dict Accelerate gathers for it.
    """
    if isinstance(weights, nn.Module):
        if tie_embeddings is None:
            tie_embeddings = bool(getattr(getattr(weights, "config", None), "tie_embeddings", False))
        weights = weights.state_dict()
    h = hashlib.sha256()
    for name, t in sorted(weights.items()):
        if tie_embeddings and name == "lm_head.weight":
            continue
        t = t.detach()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}|".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_backbone(backbone: nn.Module, directory: str | Path,
                  state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``backbone`` (or its gathered ``state``) as a plain memzoo export (model.safetensors + config.json)."""
    from safetensors.torch import save_file

    from ...train.checkpoint import publish_folder, staging_folder

    directory = Path(directory)
    tmp = staging_folder(directory)
    config = backbone.config
    state = backbone.state_dict() if state is None else state
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(config.to_json(indent=2))
    return publish_folder(tmp, directory)


def load_longmem(path: str | Path, *, backbone: str | Path | nn.Module | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 verify: bool = True) -> Any:
    """Rebuild a LongMem from its export folder: the recorded backbone plus the saved SideNet.

    Args:
        path: the export folder (``final/``) holding ``wrapper.json`` (or an older ``longmem.json``) and
            ``model.safetensors``.
        backbone: another place to load the backbone from (an export folder or a ``LanguageModel``),
            e.g. after moving the run; default: the recorded path (relative to the working directory,
            then its absolute form at export time).
        verify: check the backbone's SHA-256 against the recorded one (``ValueError`` on a mismatch).

    Returns:
        The LongMem in eval mode.
    """
    from safetensors.torch import load_file

    from .longmem import LongMem

    path = Path(path)
    directory = path.parent if path.suffix == ".safetensors" else path
    meta = read_longmem_meta(directory)
    tensors = load_file(str(directory / "model.safetensors"))
    model = LongMem.load(directory, meta, tensors, backbone=backbone, verify=verify)
    return model.to(device=device, dtype=dtype).eval()


def read_longmem_meta(directory: Path) -> dict[str, Any]:
    """The export's record as ``{"config": LongMemConfig fields, "backbone": {...}}``, from ``wrapper.json`` or
    an older ``longmem.json``."""
    new, old = directory / WRAPPER_FILE, directory / LONGMEM_FILE
    if new.is_file():
        meta = json.loads(new.read_text())
        if meta.get("name") != "longmem":
            raise ValueError(f"load_longmem: {str(new)!r} describes a {meta.get('name')!r} wrapper, not LongMem")
        return meta
    if not old.is_file():
        raise FileNotFoundError(f"load_longmem: no {WRAPPER_FILE} in {str(directory)!r} (not a LongMem export)")
    meta = json.loads(old.read_text())
    if meta.get("format") != _FORMAT:
        raise ValueError(f"load_longmem: {str(old)!r} has format {meta.get('format')!r}, expected {_FORMAT!r}")
    return {"config": meta["longmem"], "backbone": meta["backbone"]}


def longmem_backbone(meta: dict[str, Any], directory: Path, backbone: str | Path | nn.Module | None = None,
                     verify: bool = True) -> nn.Module:
    """The frozen backbone an export records (or ``backbone``), hash-checked against the record."""
    from ...train.checkpoint import from_pretrained

    record = meta["backbone"]
    if isinstance(backbone, nn.Module):
        bb = backbone
    else:
        candidates = [backbone] if backbone is not None else [record["path"], record.get("abs_path")]
        found = next((Path(c) for c in candidates if c is not None and (Path(c) / "model.safetensors").is_file()),
                     None)
        if found is None:
            raise FileNotFoundError(f"load_longmem: the backbone is not at {candidates}; pass backbone=<export folder>")
        bb = from_pretrained(found)
    if verify:
        got = weights_hash(bb)
        if got != record["sha256"]:
            raise ValueError(f"load_longmem: backbone weights sha256 {got[:16]}... differ from the "
                             f"{record['sha256'][:16]}... the SideNet in {str(directory)!r} was trained on")
    return bb
