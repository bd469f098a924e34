from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """What the native scorer needs to know about an eviction method."""

    name = "base"
    needs_queries = False  # does scoring need the observation window's queries?
    context_scorer = False  # scores the whole context (methods/context.py)
    reread = False          # needs the re-read pass of context reconstruction

    @property
    def window(self) -> int:
        """Tokens at the end of the context whose queries are captured."""
        return 0

    def native_args(self) -> dict:
        return {"method": self.name, "kernel": 5, "n_sink": 0}
