from dataclasses import dataclass


@dataclass(frozen=True)
class Merge:
    """What the native merge step needs to know."""

    name = "none"

    @property
    def window(self) -> int:
        """Trailing context tokens whose queries the merge needs (0 = none)."""
        return 0

    def strata(self, n_tokens: int) -> list[int]:
        """Other context positions whose queries the merge needs."""
        return []

    def native_args(self) -> dict:
        return {"merge": self.name}
