"""Compression methods: tensor logic over features, scores and positions."""
from .base import Method, ScoreRequest, Selection, VisionInfo, VisualInput
from .baselines import PoolCompression, RandomPruning, UniformPruning
from .cls import ClsPruning

__all__ = [
    "Method", "ScoreRequest", "Selection", "VisionInfo", "VisualInput",
    "ClsPruning", "RandomPruning", "UniformPruning", "PoolCompression",
]
