"""Model-level memory that wraps a whole backbone: HMT (hierarchical memory segment recurrence)."""

from .hmt import HMT, HMTConfig, HMTState, recall

__all__ = ["HMT", "HMTConfig", "HMTState", "recall"]
