"""RULER's metrics (scripts/eval/synthetic/constants.py), on a 0-100 scale.

- ``string_match_all`` (niah, vt, cwe, fwe): the share of the reference strings
  that occur in the prediction, case-insensitively -- partial credit.
- ``string_match_part`` (qa): 100 if any reference occurs in the prediction.

RULER cleans a prediction before scoring (:func:`postprocess`): strip, control
characters to newlines, strip again; :func:`score` does the same.  Per-task
scores are means over samples, rounded to two decimals (:func:`mean_score`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(pred: str | None) -> str:
    """RULER's cleaning of a model's output (None -> "")."""
    if pred is None:
        return ""
    return _CONTROL.sub("\n", pred.strip()).strip()


def _hits(pred: str, refs: Sequence[str]) -> list[float]:
    if isinstance(refs, str):
        raise TypeError("refs must be a list of strings, not a string")
    if len(refs) == 0:
        raise ValueError("no reference strings")
    p = pred.lower()
    return [1.0 if r.lower() in p else 0.0 for r in refs]


def string_match_all(pred: str, refs: Sequence[str]) -> float:
    """100 x the fraction of ``refs`` found in ``pred`` (case-insensitive substring)."""
    hits = _hits(pred, refs)
    return 100.0 * sum(hits) / len(hits)


def string_match_part(pred: str, refs: Sequence[str]) -> float:
    """100 if any of ``refs`` is found in ``pred`` (case-insensitive substring), else 0."""
    return 100.0 * max(_hits(pred, refs))


METRICS = {"all": string_match_all, "part": string_match_part}


def score(pred: str | None, row: dict) -> float:
    """The score of one prediction against a generated row: its ``answers`` under its
    ``metric`` ("all" when the row names none)."""
    try:
        fn = METRICS[row.get("metric") or "all"]
    except KeyError:
        raise ValueError(f"unknown metric {row.get('metric')!r}; expected 'all' or 'part'") from None
    return fn(postprocess(pred), row["answers"])


def mean_score(preds: Iterable[str | None], rows: Iterable[dict]) -> float:
    """Mean of :func:`score` over paired predictions and rows, rounded to 2 decimals as RULER does."""
    scores = [score(p, r) for p, r in zip(preds, rows, strict=True)]
    if not scores:
        raise ValueError("no predictions")
    return round(sum(scores) / len(scores), 2)
