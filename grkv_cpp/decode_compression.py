"""Decode-time compression (G-KV's schedule): while generating, the cache is
compressed back to a budget every `every` tokens, scored by the latest
generated tokens' queries (CompressedLlama.decode_compression)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from .checks import require_window_fits, require_window_queries
from .compressor import captured_queries, compress_cache, observation_window
from .errors import BadRequestError, GrkvError
from .methods import Method, parse_method


@dataclasses.dataclass(frozen=True)
class DecodePolicy:
    budget: int
    every: int
    method: Method
    merge: object
    window: int


def policy(budget: int | None, every: int, method, **params) -> DecodePolicy | None:
    """The checked schedule, or None (switched off) when budget is None."""
    if budget is None:
        return None
    m, merge = parse_method(method, **params)
    if m.context_scorer:
        raise BadRequestError(f"{m.name} scores a whole context; decode-time compression uses gkv, snapkv, ...")
    w = observation_window(m, merge)
    if budget < 1 or every < 1:
        raise GrkvError("decode compression budget and interval must be >= 1 token")
    require_window_fits(w, budget)
    require_window_queries(merge, "decode-time compression")
    return DecodePolicy(budget, every, m, merge, w)


def maybe_compress(model, p: DecodePolicy):
    """After a generated token: compress when the schedule says so."""
    # every `every` tokens, or at once (after a full window) when the cache
    # started above budget + every, as G-KV compresses an oversized prompt
    due = model._decode_since >= p.every or (model._live >= p.budget + p.every and model._decode_since >= p.window)
    if not due or model._live <= p.budget:
        return
    layers = [(q[-p.window:], pos[-p.window:]) for q, pos in captured_queries(model.capture, model.info)]
    hist = None
    if p.method.name == "gkv" and model._gkv_hist is not None:
        old = model._gkv_hist
        if old.shape[2] <= model._live:  # tokens decoded since have no history yet
            hist = np.zeros((*old.shape[:2], model._live), np.float32)
            hist[:, :, : old.shape[2]] = old
    t0 = time.perf_counter()
    res = compress_cache(model.ctx, model.info, p.method, merge=p.merge, budget=p.budget, captured=layers,
                         n_threads=model.n_threads, history=hist)
    model._gkv_hist = res.merge_report.get("global")
    model._live = res.cells_after
    model._decode_since = 0
    model.capture.clear()
    model.stats.decode_compressions += 1
    model.stats.decode_compress_s += time.perf_counter() - t0
    model.decode_trace.append(res.cells_before)
