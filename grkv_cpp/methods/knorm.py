from dataclasses import dataclass

from .base import Method


@dataclass(frozen=True)
class KNorm(Method):
    """Keep the keys with the lowest L2 norm (query-free)."""

    name = "knorm"

    def native_args(self) -> dict:
        return {"method": "knorm", "kernel": 5, "n_sink": 0}
