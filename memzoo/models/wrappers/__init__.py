"""Model-level memory that wraps a whole backbone: HMT (hierarchical memory segment recurrence) and LongMem
(a frozen backbone's cached keys/values read by a trainable SideNet)."""

from .hmt import HMT, HMTConfig, HMTState, recall
from .longmem import LongMem, LongMemConfig, LongMemState, SideNet

__all__ = ["HMT", "HMTConfig", "HMTState", "LongMem", "LongMemConfig", "LongMemState", "SideNet", "recall"]
