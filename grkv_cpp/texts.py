"""Synthetic long contexts with facts to find (demo, tests, benchmarks)."""

from __future__ import annotations

import random
from dataclasses import dataclass

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


@dataclass
class Needle:
    sentence: str
    question: str
    answer: str


def passkey_needle(key: int) -> Needle:
    return Needle(f"The pass key is {key}. Remember it. {key} is the pass key. ",
                  "What is the pass key? Answer with the number only.", str(key))


def haystack(n_filler: int, needles: list[tuple[float, Needle]]) -> str:
    """`n_filler` filler blocks with each needle inserted at its relative depth in [0, 1]."""
    parts = [FILLER] * n_filler
    for depth, needle in sorted(needles, key=lambda x: -x[0]):
        parts.insert(int(round(depth * n_filler)), needle.sentence)
    return ("There is important information hidden in a lot of irrelevant text. "
            "Find it and memorize it. " + "".join(parts))


def demo_context(seed: int = 7) -> tuple[str, list[Needle]]:
    """A ~800-token context with three facts at different depths."""
    rng = random.Random(seed)
    needles = [
        passkey_needle(rng.randint(10000, 99999)),
        Needle(f"The secret city is {(c := rng.choice(['Lisbon', 'Oslo', 'Cairo', 'Lima']))}. ",
               "What is the secret city?", c),
        Needle(f"The magic number is {(n := rng.randint(100, 999))}. ", "What is the magic number?", str(n)),
    ]
    text = haystack(36, [(0.2, needles[0]), (0.5, needles[1]), (0.8, needles[2])])
    return text, needles
