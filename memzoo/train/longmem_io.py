"""Moved: LongMem's export files live in ``memzoo.models.wrappers.longmem_io`` (the wrapper's own package)."""

from ..models.wrappers.longmem_io import LONGMEM_FILE, load_longmem, save_backbone, weights_hash

__all__ = ["LONGMEM_FILE", "load_longmem", "save_backbone", "weights_hash"]
