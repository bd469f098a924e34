"""Merge steps that rewrite the kept slots after selection, one per file.
The math runs in the native core (native/src/merge/)."""

from .base import Merge
from .grkv import GRKV
from .nearest import PivotMerge, WeightedMerge
from .value import ValueMerge

REGISTRY = {"merge": ValueMerge, "pivot": PivotMerge, "weighted": WeightedMerge, "grkv": GRKV}

__all__ = ["Merge", "GRKV", "ValueMerge", "PivotMerge", "WeightedMerge", "REGISTRY"]
