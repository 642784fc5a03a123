"""Evaluation: recall / needle-in-a-haystack tasks behind ``memzoo-bench`` (lands with the benchmarks issue)."""
