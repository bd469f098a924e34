from dataclasses import dataclass

from ..errors import BadRequestError
from .base import Method


@dataclass(frozen=True)
class LaserKV(Method):
    """LASER-KV-style budgeting (arXiv 2602.02199), for budgeted prefill: of a
    budget B, the first B/n tokens (anchors) and the last B/n (local window)
    are kept, and the remaining B - 2B/n are the global memory, chosen among
    the other tokens by the attention the scoring queries pay them, summed over
    all layers and heads (LASER-KV's "exact" ranking). One token set serves
    every layer. The scoring queries are the chunk's last ``window_size``
    tokens, or the question when one is given (compress_budgeted(question=)).
    Not implemented: the LSH (SimHash) quarter of the global memory."""

    window_size: int = 32
    protect_divisor: int = 4
    name = "laser"
    needs_queries = True

    def __post_init__(self):
        if self.window_size < 1:
            raise BadRequestError("LASER-KV scoring window must be >= 1")
        if self.protect_divisor < 2:
            raise BadRequestError("LASER-KV protection divisor must be >= 2")

    @property
    def window(self) -> int:
        return self.window_size

    def native_args(self) -> dict:
        return {"method": "laser", "kernel": 1, "n_sink": 0, "protect_divisor": self.protect_divisor}
