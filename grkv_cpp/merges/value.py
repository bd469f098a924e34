from dataclasses import dataclass

from .base import Merge


@dataclass(frozen=True)
class ValueMerge(Merge):
    """kvpress-style: each evicted value folded into its most key-similar kept
    token (weights max(cos, 0), merged norm = weighted mean norm); keys untouched."""

    name = "merge"
