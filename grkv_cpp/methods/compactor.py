from dataclasses import dataclass

from ..errors import BadRequestError
from .context import ContextMethod


@dataclass(frozen=True)
class Compactor(ContextMethod):
    """Compactor (Chari & Van Durme 2025): non-causal attention inside
    ``chunk``-token tiles times the value norm, blended with the ridge
    leverage of the de-rotated keys (weight: the fraction removed), each
    z-scored over the layer. No extra pass."""

    chunk: int = 256
    ridge: float = 1e-2
    chunk_scale: bool = False  # kvpress leaves the tile logits unscaled
    name = "compactor"

    def __post_init__(self):
        super().__post_init__()
        if self.chunk < 1 or self.ridge <= 0:
            raise BadRequestError("compactor needs chunk >= 1 and ridge > 0")

    def context_params(self, n_prefix: int):
        p = super().context_params(n_prefix)
        p.chunk, p.ridge, p.chunk_scale = self.chunk, self.ridge, self.chunk_scale
        return p
