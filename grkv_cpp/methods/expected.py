from dataclasses import dataclass

from ..errors import BadRequestError
from .context import ContextMethod


@dataclass(frozen=True)
class ExpectedAttention(ContextMethod):
    """Expected Attention (Devoto et al. 2025): the context's de-rotated
    queries as a Gaussian, RoPE averaged over the next ``n_future``
    positions, closed-form expected softmax per key, times its value norm
    (``eps`` added to the attention first). No extra pass."""

    n_future: int = 512
    eps: float = 1e-2  # the leaderboard's setting; 0 lost every needle on SmolLM2 (scripts/sweep_scorers.py)
    use_cov: bool = True
    name = "expected"

    def __post_init__(self):
        super().__post_init__()
        if self.n_future < 1 or self.eps < 0:
            raise BadRequestError("expected attention needs n_future >= 1 and eps >= 0")

    def context_params(self, n_prefix: int):
        p = super().context_params(n_prefix)
        p.n_future, p.eps, p.use_cov = self.n_future, self.eps, self.use_cov
        return p
