"""Model-level memory that wraps a whole backbone: HMT (hierarchical memory segment recurrence), LongMem
(a frozen backbone's cached keys/values read by a trainable SideNet) and the Discrete Key-Value Bottleneck (a frozen
encoder's features snapped to frozen keys whose values are learned)."""

from .dkvb import DiscreteKVBottleneck, DKVBConfig, DKVBFeedForward
from .hmt import HMT, HMTConfig, HMTState, recall
from .longmem import LongMem, LongMemConfig, LongMemState, SideNet

__all__ = ["DKVBConfig", "DKVBFeedForward", "DiscreteKVBottleneck", "HMT", "HMTConfig", "HMTState", "LongMem",
           "LongMemConfig", "LongMemState", "SideNet", "recall"]
