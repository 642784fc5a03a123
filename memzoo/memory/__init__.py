"""Transient memories shared by the memory-augmented models: ``KVMemoryBank`` (LongMem-style chunked K/V cache)."""

from .bank import KVMemoryBank, Retrieved

__all__ = ["KVMemoryBank", "Retrieved"]
