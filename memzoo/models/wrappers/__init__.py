"""Model-level memory that wraps a whole backbone (HMT, LongMem); empty until those land."""
