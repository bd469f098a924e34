from dataclasses import dataclass

from ..errors import BadRequestError
from .base import Method


@dataclass(frozen=True)
class StreamingLLM(Method):
    """Keep ``n_sink`` attention sinks and the most recent tokens (query-free)."""

    n_sink: int = 4
    name = "streaming"

    def __post_init__(self):
        if self.n_sink < 0:
            raise BadRequestError("n_sink must be >= 0")

    def native_args(self) -> dict:
        return {"method": "streaming", "kernel": 5, "n_sink": self.n_sink}
