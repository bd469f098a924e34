"""What the context scorers (expected, compactor, reconstruct) share: they
score the whole context without its question, and protect its ends."""

from dataclasses import dataclass

from .. import _native
from ..errors import BadRequestError
from .base import Method

ALL_QUERIES = 1 << 30  # an observation window that covers every context token
HEADWISE = ("none", "adakv", "global")


@dataclass(frozen=True)
class ContextMethod(Method):
    """n_sink: leading tokens always kept; None keeps the chat template's
    prefix (at least 4 tokens). n_recent: trailing tokens always kept.
    headwise: "none" (every layer and KV head keeps the budget), "adakv"
    (heads of a layer compete for its slots after a floor of
    headwise_alpha x budget each) or "global" (one threshold over every
    layer and head, after the same floor). In llama.cpp's cells every head
    shares the slots, so a head-wise allocation costs its busiest head's
    count in cells, and every head fills those with its own best tokens."""

    n_sink: int | None = None
    n_recent: int = 0
    headwise: str = "none"
    headwise_alpha: float = 0.2
    needs_queries = True
    context_scorer = True
    reread = False  # needs the re-read pass (reconstruct) instead of the prefill's queries

    def __post_init__(self):
        if self.n_sink is not None and self.n_sink < 0:
            raise BadRequestError(f"{self.name}: n_sink must be >= 0")
        if self.n_recent < 0:
            raise BadRequestError(f"{self.name}: n_recent must be >= 0")
        if self.headwise not in HEADWISE:
            raise BadRequestError(f"{self.name}: headwise must be one of {', '.join(HEADWISE)}")
        if not 0.0 <= self.headwise_alpha <= 1.0:
            raise BadRequestError(f"{self.name}: headwise_alpha must lie in [0, 1]")

    @property
    def window(self) -> int:
        return 0 if self.reread else ALL_QUERIES

    def sinks(self, n_prefix: int) -> int:
        return max(4, n_prefix) if self.n_sink is None else self.n_sink

    def context_params(self, n_prefix: int) -> "_native.ContextParams":
        p = _native.ContextParams()
        p.n_sink = self.sinks(n_prefix)
        p.n_recent = self.n_recent
        return p

    @property
    def label(self) -> str:
        return self.name + ("" if self.headwise == "none" else f"-{self.headwise}")

    def native_args(self) -> dict:
        return {"method": self.name, "kernel": 5, "n_sink": 0, "headwise": self.headwise,
                "headwise_alpha": self.headwise_alpha}
