from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """What the native scorer needs to know about an eviction method."""

    name = "base"
    needs_queries = False  # does scoring need the observation window's queries?

    @property
    def window(self) -> int:
        """Tokens at the end of the context whose queries are captured."""
        return 0

    def native_args(self) -> dict:
        return {"method": self.name, "kernel": 5, "n_sink": 0}
