from dataclasses import dataclass

from ..errors import BadRequestError
from .context import ContextMethod


@dataclass(frozen=True)
class Reconstruct(ContextMethod):
    """Context reconstruction (KVzip, Kim et al. 2025): after the prefill the
    model re-reads the context behind a "repeat the previous context"
    prompt, in chunks of ``chunk`` tokens (``overlap`` tokens of the previous
    chunk quoted in the prompt); a context token scores the largest attention
    a re-reading query pays it, the softmax restricted to the sinks, the
    chunk and the re-read tokens. The re-read cells are removed afterwards."""

    chunk: int = 2048
    overlap: int = 8
    name = "reconstruct"
    reread = True

    def __post_init__(self):
        super().__post_init__()
        if self.chunk < 1 or self.overlap < 0:
            raise BadRequestError("reconstruct needs chunk >= 1 and overlap >= 0")
