"""Compression methods: tensor logic over features, scores and positions."""
from .base import Method, ScoreRequest, Selection, VisionInfo, VisualInput
from .baselines import PoolCompression, RandomPruning, UniformPruning
from .cls import ClsPruning
from .aim import AIM
from .compose import Compose
from .fastv import FastV
from .globalcom2 import GlobalCom2
from .zipvl import ZipVL
from .generation_kv import GenerationKVMethod, RandomKV, SnapKV, StreamingKV
from .hack import HACK

__all__ = [
    "Method", "ScoreRequest", "Selection", "VisionInfo", "VisualInput",
    "ClsPruning", "RandomPruning", "UniformPruning", "PoolCompression", "AIM", "FastV", "Compose", "GlobalCom2",
    "ZipVL", "GenerationKVMethod", "SnapKV", "StreamingKV", "RandomKV", "HACK",
]
