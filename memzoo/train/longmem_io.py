"""LongMem in memzoo-train: building it over a frozen backbone, the SideNet-only export, and its loader.

    out/final/   model.safetensors (SideNet only: ``LongMem.side`` state dict)
                 longmem.json      {"longmem": LongMemConfig fields, "backbone": {"path", "sha256", "model"}}
                 config.json       the backbone's ModelConfig (what ``model`` was) + tokenizer files

``load_longmem(final)`` (also reached through ``memzoo.from_pretrained(final)``) loads the backbone
from its recorded path, checks the SHA-256 of its weights against the one recorded at export, and
rebuilds the LongMem.  A run with ``longmem.backbone = None`` (random backbone, smoke tests) first
writes that backbone as a normal export to ``out_dir/random_backbone`` and records that path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.config import ModelConfig
from ..models.wrappers.longmem import LongMem, LongMemConfig
from .checkpoint import publish_folder, staging_folder

__all__ = ["weights_hash", "build_longmem", "export_longmem", "load_longmem", "save_backbone", "LONGMEM_FILE"]

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


def build_longmem(model_config: ModelConfig, longmem: Any, say: Any = print) -> tuple[LongMem, dict[str, Any]]:
    """LongMem over the frozen backbone ``longmem.backbone`` (or a random ``model_config`` backbone).

    Args:
        model_config: the run's ``model`` section (already the backbone's config when a path is given).
        longmem: a ``LongMemTrainConfig`` (``backbone`` + ``LongMemConfig`` fields).
        say: where the messages go (the loud warning for a random backbone included).

    Returns:
        ``(model, info)``; ``info`` holds ``path`` (None for a random backbone) and ``sha256`` of the
        backbone weights as loaded.
    """
    from ..models import build_model
    from .checkpoint import from_pretrained

    if longmem.backbone is None:
        backbone = build_model(model_config)
        bar = "!" * 100
        say(f"{bar}\n!! longmem.backbone is None: the frozen backbone is RANDOMLY INITIALISED and UNTRAINED. Useful "
            f"for smoke tests only;\n!! pretrain and export one (memzoo-train --preset tiny) and pass "
            f"--longmem.backbone <out_dir>/final.\n{bar}")
        path = None
    else:
        backbone = from_pretrained(longmem.backbone)
        if backbone.config != model_config:
            raise ValueError(f"longmem.backbone {longmem.backbone!r}: its config differs from the run's model "
                             "section (resolve the config with resolve_config / apply_longmem_backbone)")
        path = str(longmem.backbone)
    info = {"path": path, "sha256": weights_hash(backbone)}
    model = LongMem(backbone, longmem.longmem_config())
    return model, info


def save_backbone(backbone: nn.Module, directory: str | Path,
                  state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``backbone`` (or its gathered ``state``) as a plain memzoo export (model.safetensors + config.json)."""
    from safetensors.torch import save_file

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


def export_longmem(accelerator: Any, model: nn.Module, directory: str | Path, info: dict[str, Any],
                   tokenizer: Any = None) -> Path | None:
    """Write the SideNet-only export of a trained LongMem; every rank calls it.

    ``info`` is ``build_longmem``'s: the backbone path (None: the backbone is first written to
    ``directory/../random_backbone``) and the hash of its weights at the start of training, checked
    against the live backbone (a changed hash means the "frozen" backbone was updated).
    """
    from safetensors.torch import save_file

    from .checkpoint import _clean_key

    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return None
    lm = accelerator.unwrap_model(model, keep_torch_compile=False)
    state = {_clean_key(k): v for k, v in state.items()}
    # The gathered state dict, not lm.backbone: under FSDP / ZeRO-3 the live parameters are shards.
    backbone_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    live = weights_hash(backbone_state, lm.backbone.config.tie_embeddings)
    if live != info["sha256"]:
        raise RuntimeError(f"LongMem export: the frozen backbone's weights changed during training "
                           f"(sha256 {info['sha256'][:12]} -> {live[:12]})")
    directory = Path(directory)
    backbone_path = info["path"]
    if backbone_path is None:
        backbone_path = str(save_backbone(lm.backbone, directory.parent / "random_backbone", backbone_state))
    tmp = staging_folder(directory)
    tensors = {k[len("side."):]: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith("side.")}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "memzoo": _FORMAT})
    meta = {
        "format": _FORMAT, "version": 1,
        "longmem": dataclasses.asdict(lm.config if type(lm.config) is LongMemConfig else
                                      LongMemConfig(**{f.name: getattr(lm.config, f.name)
                                                       for f in dataclasses.fields(LongMemConfig)})),
        "backbone": {"path": backbone_path, "abs_path": str(Path(backbone_path).resolve()),
                     "sha256": info["sha256"], "random_init": info["path"] is None,
                     "model": lm.backbone.config.to_dict()},
        "sidenet_parameters": lm.added_parameters(),
    }
    (tmp / LONGMEM_FILE).write_text(json.dumps(meta, indent=2))
    (tmp / "config.json").write_text(lm.backbone.config.to_json(indent=2))
    return publish_folder(tmp, directory, accelerator, tokenizer)


def load_longmem(path: str | Path, *, backbone: str | Path | nn.Module | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 verify: bool = True) -> LongMem:
    """Rebuild a LongMem from ``export_longmem``'s folder: the recorded backbone plus the saved SideNet.

    Args:
        path: the export folder (``final/``) holding ``longmem.json`` and ``model.safetensors``.
        backbone: another place to load the backbone from (an export folder or a ``LanguageModel``),
            e.g. after moving the run; default: the recorded path (relative to the working directory,
            then its absolute form at export time).
        verify: check the backbone's SHA-256 against the recorded one (``ValueError`` on a mismatch).

    Returns:
        The LongMem in eval mode.
    """
    from safetensors.torch import load_file

    from .checkpoint import from_pretrained

    path = Path(path)
    directory = path.parent if path.suffix == ".safetensors" else path
    meta_file = directory / LONGMEM_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"load_longmem: no {LONGMEM_FILE} in {str(directory)!r} (not a LongMem export)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != _FORMAT:
        raise ValueError(f"load_longmem: {str(meta_file)!r} has format {meta.get('format')!r}, expected {_FORMAT!r}")
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
    model = LongMem(bb, LongMemConfig(**meta["longmem"]))
    tensors = load_file(str(directory / "model.safetensors"))
    missing, unexpected = model.side.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(f"load_longmem({str(directory)!r}): SideNet weights do not match: missing {missing}, "
                         f"unexpected {unexpected}")
    return model.to(device=device, dtype=dtype).eval()
