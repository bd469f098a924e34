from dataclasses import dataclass

from .base import Merge


@dataclass(frozen=True)
class PivotMerge(Merge):
    """KVMerger-style pivot merge of K and V: each evicted token routed to its
    most cosine-similar kept key; k_c <- mean of k_c and the midpoints."""

    name = "pivot"


@dataclass(frozen=True)
class WeightedMerge(Merge):
    """Nearest-neighbour weighted merge of K and V with w = (cos + 1) / 2."""

    name = "weighted"
