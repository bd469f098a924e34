"""capture -> score -> select -> apply, on a context whose cache is filled.

All math runs in the native core; this module only wires the steps together
and owns rollback."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from . import kvstate
from .capture import GraphCapture
from .errors import CompressionError, NativeError
from .loader import ModelInfo
from .methods import Method

PART = 0  # the compressed cache: the only cache, or an iSWA model's global-layer cache


def resolve_budget(n_tokens: int, ratio: float | None = None, budget: int | None = None) -> int:
    """Cells to keep, from a kept ratio of the context or a token count."""
    if (ratio is None) == (budget is None):
        raise ValueError("give exactly one of ratio (kept fraction) or budget (tokens)")
    if ratio is not None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"kv ratio must be in (0, 1], got {ratio}")
        return max(1, min(n_tokens, int(round(ratio * n_tokens))))
    if budget < 1:
        raise ValueError(f"kv budget must be >= 1 token, got {budget}")
    return min(budget, n_tokens)


@dataclass
class CompressResult:
    cells_before: int
    cells_after: int
    bytes_before: int
    bytes_after: int
    seconds: float
    keep: np.ndarray | None  # [n_layer, n_head_kv, B] per-head, or [B] shared (position-order indices)
    positions: np.ndarray     # positions of the cache's tokens before compression, ascending


def window_queries(capture: GraphCapture, info: ModelInfo, positions: np.ndarray, target: int = 0) -> list:
    """Per cache layer: (q [w, n_head, head_dim], positions [w]) of the captured
    window; the window is the last w tokens in the cache."""
    out = []
    for il in info.cache_layers:
        rows = capture.rows(target, il)
        w = rows.shape[0]
        out.append((rows.reshape(w, info.n_head, info.head_dim), positions[-w:].astype(np.int32)))
    return out


def compress_cache(ctx, info: ModelInfo, method: Method, *, ratio=None, budget=None, shared=False,
                   capture: GraphCapture | None = None, n_threads: int | None = None) -> CompressResult:
    """Compress sequence 0's cache in place. On any failure the context is
    restored to its state before the call and CompressionError is raised."""
    t0 = time.perf_counter()
    blob = kvstate.get_blob(ctx)
    state = kvstate.parse(blob)
    info0 = state.part_info(PART)
    n_cells = info0["n_cells"]
    if info0["n_layer"] != len(info.cache_layers):
        raise CompressionError(
            f"the cache holds {info0['n_layer']} layers but the model description expects {len(info.cache_layers)}"
        )
    bytes_before = kvstate.kv_bytes(state)
    positions = state.positions(PART)
    B = resolve_budget(n_cells, ratio, budget)
    if B >= n_cells:
        return CompressResult(n_cells, n_cells, bytes_before, bytes_before, time.perf_counter() - t0, None, positions)
    queries = []
    if method.needs_queries:
        if capture is None:
            raise CompressionError(f"{method.name} needs the window queries captured during prefill")
        queries = window_queries(capture, info, positions)
    threads = n_threads or os.cpu_count() or 1
    label_end = int(positions[-1])
    with kvstate.Rollback(ctx, blob):
        try:
            keep = state.select(PART, n_head=info.n_head, n_head_kv=info.n_head_kv, scale=info.attn_scale,
                                queries=queries, budget=B, shared=shared, n_threads=threads,
                                **method.native_args())
            if shared:
                state.apply_shared(PART, keep)
            else:
                state.apply_per_head(PART, keep, label_end)
            new_blob = state.serialize()
        except NativeError as e:
            raise CompressionError(str(e)) from e
        if not kvstate.set_blob(ctx, new_blob):
            raise CompressionError("llama.cpp rejected the compressed state")
        pmin, pmax = kvstate.pos_range(ctx)
        if pmax != label_end:
            raise CompressionError(f"after compression the last position reads {pmax}, expected {label_end}")
    bytes_after = kvstate.kv_bytes(state)
    return CompressResult(n_cells, B, bytes_before, bytes_after, time.perf_counter() - t0, keep, positions)
