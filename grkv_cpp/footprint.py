"""KV footprint and KV peak as "Cache Me If You Can" (arXiv 2506.17121)
defines them (docs/grkv-spec.md §8.3).

For a request of N = P + R tokens, m_t is the number of KV entries stored and
attended when token t is processed:

    footprint = sum_t m_t / (N (N + 1) / 2)      peak = max_t m_t / N

A full cache gives 1 and 1. Chunked prefill processes a chunk [a, b) at
once: it adds (b-a)(b-a+1)/2 + past*(b-a) to the sum and past + (b-a) to the
peak candidates. The eviction policy decides `past` between steps.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Footprint:
    footprint: float
    peak: float
    area: int        # sum of m_t
    peak_entries: int
    n_tokens: int


def simulate(prompt: int, response: int = 0, *, chunk: int | None = None, budget: int | None = None,
             evict_during_prefill: bool = False, decode_every: int | None = None) -> Footprint:
    """Footprint of one request.

    chunk: prefill chunk size (None = the whole prompt in one step).
    budget: KV entries kept by eviction (None = full cache).
    evict_during_prefill: compress back to `budget` after every chunk (bounded
        memory); otherwise eviction happens once, after the prefill (post-fill).
    decode_every: during decoding, compress back to `budget` every this many
        generated tokens (decode-time eviction); None = no eviction while decoding.
    """
    if prompt < 1 or response < 0:
        raise ValueError("prompt must be >= 1 token and response >= 0")
    if budget is not None and budget < 1:
        raise ValueError("budget must be >= 1")
    step = chunk or prompt
    past = area = peak = 0
    for a in range(0, prompt, step):
        c = min(step, prompt - a)
        area += c * (c + 1) // 2 + past * c
        peak = max(peak, past + c)
        past += c
        if evict_during_prefill and budget is not None:
            past = min(past, budget)
    if budget is not None:
        past = min(past, budget)  # post-fill eviction (a no-op if already evicted)
    for i in range(1, response + 1):
        past += 1
        area += past
        peak = max(peak, past)
        if decode_every and budget is not None and i % decode_every == 0:
            past = min(past, budget)
    n = prompt + response
    return Footprint(area / (n * (n + 1) / 2), peak / n, area, peak, n)
