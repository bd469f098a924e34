from dataclasses import dataclass

from ..errors import BadRequestError
from .base import Method


@dataclass(frozen=True)
class GKV(Method):
    """G-KV (arXiv 2512.00504), for re-compressing during generation: the
    last ``window_size`` queries' attention (max over the GQA group, mean over
    the window, divided by its max) is folded into the decayed history of
    earlier compressions, global = max(alpha * history, local), and scored as
    ``mix_lambda * global - (1 - mix_lambda) * redundancy``, redundancy being
    R-KV's key-similarity term. The window is protected. Without a history
    (the first compression) the global score is the local one."""

    window_size: int = 16
    alpha: float = 0.8
    mix_lambda: float = 0.5
    sim_threshold: float = 0.5
    name = "gkv"
    needs_queries = True

    def __post_init__(self):
        if self.window_size < 1:
            raise BadRequestError("G-KV window must be >= 1")
        if not (0.0 <= self.alpha <= 1.0 and 0.0 <= self.mix_lambda <= 1.0):
            raise BadRequestError("G-KV alpha and mix_lambda must lie in [0, 1]")

    @property
    def window(self) -> int:
        return self.window_size

    def native_args(self) -> dict:
        return {"method": "gkv", "kernel": 1, "n_sink": 0, "alpha": self.alpha, "mix_lambda": self.mix_lambda,
                "sim_threshold": self.sim_threshold}
