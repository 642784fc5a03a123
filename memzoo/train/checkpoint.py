"""Checkpoints: atomic ``accelerator.save_state`` folders, ``--resume auto``, and the exported final model.

    out/checkpoints/checkpoint_{step}/   model, optimizer, scheduler, RNG, trainer_state, torch_rng_{rank}.pt
                                         (+ stream_state_{rank}.pt)
    out/final/                           model.safetensors + config.json + tokenizer files
                                         (+ wrapper.json for a wrapper, which chooses what it saves:
                                         HMT everything, LongMem the SideNet only)

A checkpoint is written to ``checkpoints/.tmp_checkpoint_{step}`` and renamed once every rank has
finished, so a folder named ``checkpoint_{step}`` is always complete and an interrupted save leaves
only a temporary folder that ``latest_checkpoint`` never returns.  The last file written into it is
``manifest.json``: the name, size and sha256 of every other file.  ``verify_checkpoint`` checks a folder
against it, so a checkpoint damaged after the save (a truncated copy, a full disk, bit rot) is named
with the file at fault, and ``resumable_checkpoint`` (``--resume auto``) falls back to the newest
checkpoint that verifies.  ``from_pretrained`` needs only
torch and safetensors: no Accelerate, no transformers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from ..models.config import ModelConfig
from ..models.state import state_leaves, tree_map

__all__ = ["TrainState", "CheckpointError", "CheckpointWarning", "latest_checkpoint", "resumable_checkpoint",
           "save_checkpoint", "verify_checkpoint", "write_manifest", "export_model", "from_pretrained"]

MANIFEST = "manifest.json"

_CKPT = re.compile(r"^checkpoint_(\d+)$")
# Prefixes added by torch.compile (_orig_mod.) and DDP / DeepSpeed wrappers (module.).
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


class TrainState:
    """The trainer's counters, registered with Accelerate so ``save_state`` stores them.

    Only primitives, so the pickle loads under ``torch.load(weights_only=True)`` too.
    """

    def __init__(self) -> None:
        self.step = 0  # optimizer steps taken
        self.micro_index = 0  # micro-batches consumed per process: the data position
        self.tokens_seen = 0  # tokens trained on, all processes
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite gradient norm

    def state_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, int]) -> None:
        for k, v in state.items():
            setattr(self, k, int(v))


def _checkpoints(out_dir: str | Path) -> list[Path]:
    """The complete checkpoints under ``out_dir/checkpoints``, newest (highest step) first."""
    root = Path(out_dir, "checkpoints")
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``out_dir/checkpoints``, or ``None``."""
    found = _checkpoints(out_dir)
    return found[0] if found else None


class CheckpointError(ValueError):
    """A checkpoint folder that is incomplete or corrupt; the message names the folder and the file."""


class CheckpointWarning(UserWarning):
    """``--resume auto`` skipped a checkpoint that does not verify."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: str | Path) -> Path:
    """Record the name, size and sha256 of every file under ``folder`` in ``folder/manifest.json``.

    Written to a temporary name and renamed, so a manifest is either absent or complete; call it after
    every other file of the checkpoint is written.
    """
    folder = Path(folder)
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name not in (MANIFEST, MANIFEST + ".tmp"):
            files[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"format": 1, "files": files}, indent=1))
    os.replace(tmp, folder / MANIFEST)
    return folder / MANIFEST


def verify_checkpoint(folder: str | Path) -> None:
    """Check every file of checkpoint ``folder`` against its ``manifest.json`` (presence, size, sha256).

    Raises:
        CheckpointError: naming the checkpoint and the first file that is missing, truncated or corrupt (or the
            manifest itself when it is missing or unreadable).
    """
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"checkpoint {str(folder)!r} has no {MANIFEST}: the save did not finish, or an older "
                              "memzoo wrote it, so its files cannot be verified")
    try:
        files = json.loads(manifest.read_text())["files"]
        entries = [(str(name), int(meta["size"]), str(meta["sha256"])) for name, meta in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {str(folder)!r}: {MANIFEST} is unreadable ({type(e).__name__}: {e}); "
                              "the checkpoint cannot be verified") from None
    if "trainer_state.json" not in files:
        raise CheckpointError(f"checkpoint {str(folder)!r}: {MANIFEST} does not list trainer_state.json")
    for name, size, digest in entries:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {str(folder)!r}: file {name} is missing (listed in {MANIFEST})")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(f"checkpoint {str(folder)!r}: file {name} has {actual} bytes, {MANIFEST} says "
                                  f"{size} (truncated or overwritten)")
        if _sha256(path) != digest:
            raise CheckpointError(f"checkpoint {str(folder)!r}: file {name} is corrupt (its sha256 differs from "
                                  f"{MANIFEST})")


def resumable_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest checkpoint under ``out_dir/checkpoints`` that verifies (``--resume auto``), or ``None`` if none exist.

    Each newer checkpoint that does not verify is skipped with a ``CheckpointWarning`` naming it and the file.

    Raises:
        CheckpointError: checkpoints exist but none verifies (nothing is resumed silently from scratch).
    """
    problems = []
    for path in _checkpoints(out_dir):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            warnings.warn(f"--resume auto: skipping {e}", CheckpointWarning, stacklevel=2)
            continue
        return path
    if problems:
        raise CheckpointError("--resume auto: no checkpoint verifies; " + "; ".join(problems)
                              + ". Pass --resume PATH to resume from one of them anyway (an explicit PATH "
                              f"without {MANIFEST} is accepted unverified).")
    return None


def _remove(path: Path) -> None:
    # Rename first so a crash half-way through the deletion leaves no folder with a checkpoint name.
    trash = path.with_name(f".trash_{path.name}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def clean_stale(out_dir: str | Path) -> None:
    """Delete temporary folders left by interrupted saves or prunes (main process, before training)."""
    root = Path(out_dir, "checkpoints")
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp_", ".trash_")):
                shutil.rmtree(p, ignore_errors=True)


class _TiedWeightsFilter(logging.Filter):
    """Drops Accelerate's "Removed shared tensor {...} while saving" when every name is a tied parameter the model
    declares (``lm_head.weight`` tied to the embedding): loading ties them again, so nothing is lost."""

    def __init__(self, tied: set[str]):
        super().__init__()
        self.tied = tied

    def filter(self, record: logging.LogRecord) -> bool:
        # Under a process group Accelerate prefixes the rank: "[RANK 0] Removed shared tensor ...".
        _, found, rest = record.getMessage().partition("Removed shared tensor {")
        if not found:
            return True
        names = set(re.findall(r"'([^']+)'", rest.split("}", 1)[0]))
        return not (names and names <= self.tied)


@contextlib.contextmanager
def quiet_tied_weights(model: torch.nn.Module | None):
    """While saving ``model`` (unwrapped), silence Accelerate's warning about its declared tied parameters only."""
    seen: set[int] = set()
    tied: set[str] = set()
    for name, p in (model.named_parameters(remove_duplicate=False) if model is not None else ()):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    log_filter = _TiedWeightsFilter(tied)
    logger = logging.getLogger("accelerate.utils.other")
    logger.addFilter(log_filter)
    try:
        yield
    finally:
        logger.removeFilter(log_filter)


def save_checkpoint(accelerator: Any, out_dir: str | Path, state: TrainState, keep: int,
                    carried_state: Any = None, model: torch.nn.Module | None = None) -> Path:
    """Save everything needed to resume at ``state.step``, atomically; keep the newest ``keep``.

    ``carried_state`` (stream packing) differs per rank, so each rank writes its own leaves.  ``model`` (the
    unwrapped model) names the tied parameters whose removal from the saved state needs no warning.
    """
    root = Path(out_dir, "checkpoints")
    final = root / f"checkpoint_{state.step}"
    tmp = root / f".tmp_checkpoint_{state.step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    with quiet_tied_weights(model):
        accelerator.save_state(str(tmp))
    if carried_state is not None:
        leaves = [t.detach().cpu() for t in state_leaves(carried_state)]
        torch.save(leaves, tmp / f"stream_state_{accelerator.process_index}.pt")
    # torch's generators (dropout draws from them) once more, in a form any torch.load reads: Accelerate's own copy
    # holds numpy objects that it fails to load under some numpy/torch pairs, and then it only logs at INFO.
    torch.save(_torch_rng(), tmp / f"torch_rng_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        Path(tmp, "trainer_state.json").write_text(json.dumps(state.state_dict(), indent=2))
        # Last: the manifest covers every rank's files, which all exist after the barrier above.
        write_manifest(tmp)
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
        done = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT.match(p.name)))
        for _, old in done[:-keep]:
            _remove(old)
    accelerator.wait_for_everyone()
    return final


def _torch_rng() -> dict[str, Any]:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_torch_rng(checkpoint: str | Path, rank: int) -> bool:
    """After ``accelerator.load_state``: make torch's generators those this rank saved in ``checkpoint``.

    Returns True when they differed, i.e. Accelerate did not restore them (it logs "Could not load random states"
    at INFO and goes on); they are then set from memzoo's copy.  A checkpoint from an older memzoo has no copy:
    False, nothing changed.
    """
    path = Path(checkpoint, f"torch_rng_{rank}.pt")
    if not path.is_file():
        return False
    saved, now = torch.load(path, map_location="cpu", weights_only=True), _torch_rng()
    if len(saved["cuda"]) == len(now["cuda"]) and all(
            torch.equal(a, b) for a, b in zip([saved["cpu"], *saved["cuda"]], [now["cpu"], *now["cuda"]])):
        return False
    torch.set_rng_state(saved["cpu"])
    if saved["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])
    return True


def load_carried_state(checkpoint: str | Path, rank: int, template: Any) -> Any:
    """Rebuild this rank's carried stream state from its saved leaves, shaped like ``template``."""
    path = Path(checkpoint, f"stream_state_{rank}.pt")
    if not path.is_file():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(payload, dict):
        raise CheckpointError(f"{path}: a carried state written by an older memzoo (its LongMem bank stored apart); "
                              "this version cannot resume it: start the run again or resume with that version")
    if len(payload) != len(state_leaves(template)):
        # (Shapes may differ: a fresh state's caches are empty.)
        raise CheckpointError(f"{path}: the saved carried state has {len(payload)} tensors, this model's state "
                              f"{len(state_leaves(template))}")
    leaves = iter(payload)
    return tree_map(lambda t: next(leaves).to(t.device), template)


def _clean_key(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
        key = key.replace("._orig_mod.", ".")
    return key


def export_model(accelerator: Any, model: torch.nn.Module, directory: str | Path, tokenizer: Any = None) -> Path | None:
    """Write ``model.safetensors`` + ``config.json`` (+ tokenizer) for ``from_pretrained``; every rank calls it.

    ``get_state_dict`` gathers sharded (FSDP, ZeRO-3) weights.  The tied head is dropped, since
    safetensors refuses tensors that share memory; ``from_pretrained`` re-ties it.  A wrapper
    (``memzoo.models.wrappers``) also writes ``wrapper.json`` and chooses which tensors it saves.
    """
    from safetensors.torch import save_file

    from ..models.wrappers.base import Wrapper, export_wrapper

    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return None
    lm = accelerator.unwrap_model(model, keep_torch_compile=False)
    directory = Path(directory)
    tmp = staging_folder(directory)
    tensors = {_clean_key(k): v.detach().cpu().contiguous() for k, v in state.items()}
    if isinstance(lm, Wrapper):
        config = lm.export_config()
        tensors = export_wrapper(lm, tensors, tmp, directory)
    else:
        config = lm.config
    if config.tie_embeddings:
        # A wrapped backbone (HMT) stores its tied head as "backbone.lm_head.weight".
        for key in [k for k in tensors if k == "lm_head.weight" or k.endswith(".lm_head.weight")]:
            tensors.pop(key)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(config.to_json(indent=2))
    return publish_folder(tmp, directory, accelerator, tokenizer)


def staging_folder(directory: Path) -> Path:
    """An empty ``.tmp_<name>`` sibling of ``directory`` to write an export into before ``publish_folder``."""
    tmp = directory.with_name(f".tmp_{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish_folder(tmp: Path, directory: Path, accelerator: Any = None, tokenizer: Any = None) -> Path:
    """Add the tokenizer, replace ``directory`` by the finished ``tmp`` in one rename, release the other ranks
    (``accelerator=None``: a single-process write, nobody waits)."""
    if tokenizer is not None:
        tokenizer.save(tmp)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return directory


def from_pretrained(path: str | Path, *, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None, config: ModelConfig | None = None) -> Any:
    """Load a ``LanguageModel`` (or a wrapper around one) saved by ``memzoo-train`` (``final/``) or an
    Accelerate checkpoint folder.

    Args:
        path: a folder holding ``model.safetensors`` (and ``config.json``), or the file itself.
            For a ``checkpoints/checkpoint_N`` folder the model config comes from the run's
            ``config.json`` two levels up; a run with a ``wrapper`` section is rebuilt as that wrapper
            (``cls.build``, as the trainer did) and given every weight of the checkpoint.
        device, dtype: where to put the weights (default: CPU, as stored).
        config: the model config, when no ``config.json`` is found next to the weights.

    Returns:
        The model in eval mode.
    """
    from safetensors.torch import load_file

    from ..models import build_model
    from ..models.wrappers.base import load_wrapper, read_wrapper_meta
    from ..models.wrappers.longmem_io import LONGMEM_FILE, load_longmem

    path = Path(path)
    directory = path.parent if path.suffix == ".safetensors" else path
    meta = read_wrapper_meta(directory) if config is None else None
    if meta is None and config is None and (directory / LONGMEM_FILE).is_file():
        # A LongMem export written before the wrapper protocol.
        return load_longmem(directory, device=device, dtype=dtype)
    weights = path if path.suffix == ".safetensors" else directory / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"from_pretrained: no model.safetensors at {str(path)!r}")
    tensors = {_clean_key(k): v for k, v in load_file(str(weights)).items()}
    if meta is None and config is None:
        wrapped = _checkpoint_wrapper(directory, tensors)
        if wrapped is not None:
            return wrapped.to(device=device, dtype=dtype).eval()
    if config is None:
        config = _find_config(directory)
    if meta is not None:
        return load_wrapper(directory, meta, tensors, config).to(device=device, dtype=dtype).eval()
    model = build_model(config)
    if config.tie_embeddings:
        # Writers keep one name of a tied pair: ours keeps embed.weight, others may keep lm_head.weight.
        if "embed.weight" not in tensors and "lm_head.weight" in tensors:
            tensors["embed.weight"] = tensors["lm_head.weight"]
        tensors.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not (config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"from_pretrained({str(path)!r}): weights do not match the config: "
                         f"missing {missing}, unexpected {unexpected}")
    return model.to(device=device, dtype=dtype).eval()


def _checkpoint_wrapper(directory: Path, tensors: dict[str, torch.Tensor]) -> Any:
    """The wrapper a ``checkpoints/checkpoint_N`` folder was saved from (built as the trainer built it, then
    loaded with every weight of the checkpoint, strictly), or None when the run trained a bare model."""
    from ..models.wrappers.base import load_all_weights
    from .config import TrainConfig

    run = directory.parent.parent / "config.json"
    if not (_CKPT.match(directory.name) and run.is_file()):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # a run saved with the old hmt: / longmem: sections
        cfg = TrainConfig.from_dict(json.loads(run.read_text()))
    wrapper = cfg.resolved_wrapper()
    if wrapper is None:
        return None
    cls, wrapper_config = wrapper
    model = cls.build(cfg.model, wrapper_config, say=lambda msg: warnings.warn(msg, stacklevel=3))
    load_all_weights(model, tensors, cfg.model.tie_embeddings,
                     f"from_pretrained({str(directory)!r}), the run's {cls.name} model")
    return model


def _find_config(directory: Path) -> ModelConfig:
    own = directory / "config.json"
    if own.is_file():
        return ModelConfig.from_json(own.read_text())
    run = directory.parent.parent / "config.json"
    if _CKPT.match(directory.name) and run.is_file():
        return ModelConfig.from_dict(json.loads(run.read_text())["model"])
    raise FileNotFoundError(f"from_pretrained: no config.json in {str(directory)!r}; pass config=")
