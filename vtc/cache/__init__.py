"""KV caches that store tokens at mixed precision or evict them (transformers' layered ``Cache`` API)."""
from .mixed_precision import MixedPrecisionCache, MixedPrecisionLayer

__all__ = ["MixedPrecisionCache", "MixedPrecisionLayer"]
