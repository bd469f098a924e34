from dataclasses import dataclass

from ..errors import BadRequestError
from .base import Method


@dataclass(frozen=True)
class SnapKV(Method):
    """SnapKV as in kvpress: attention of the last ``window`` queries, averaged
    over the window, avg-pooled with ``kernel``, mean over each GQA group. The
    window itself is always kept."""

    window_size: int = 32
    kernel: int = 5
    pooling: str = "avg"  # "avg" (kvpress) or "max" (original SnapKV option)
    name = "snapkv"
    needs_queries = True

    def __post_init__(self):
        if self.window_size < 1:
            raise BadRequestError("SnapKV window must be >= 1")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise BadRequestError("SnapKV kernel must be odd and >= 1")
        if self.pooling not in ("avg", "max"):
            raise BadRequestError("SnapKV pooling must be 'avg' or 'max'")

    @property
    def window(self) -> int:
        return self.window_size

    def native_args(self) -> dict:
        name = "snapkv" if self.pooling == "avg" else "snapkv-max"
        return {"method": name, "kernel": self.kernel, "n_sink": 0}
