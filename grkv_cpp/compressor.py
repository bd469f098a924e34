"""capture -> score -> select -> merge -> apply, on a context whose cache is
filled. All math runs in the native core; this module wires the steps
together and owns rollback."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from . import _native, kvstate
from .capture import GraphCapture
from .errors import BadRequestError, CompressionError, NativeError
from .loader import ModelInfo
from .merges import Merge
from .methods import Method

PART = 0  # the compressed cache: the only cache, or an iSWA model's global-layer cache


def resolve_budget(n_tokens: int, ratio: float | None = None, budget: int | None = None) -> int:
    """Cells to keep, from a kept ratio of the context or a token count."""
    if (ratio is None) == (budget is None):
        raise BadRequestError("give exactly one of ratio (kept fraction) or budget (tokens)")
    if ratio is not None:
        if not 0.0 < ratio <= 1.0:
            raise BadRequestError(f"kv ratio must be in (0, 1], got {ratio}")
        return max(1, min(n_tokens, int(round(ratio * n_tokens))))
    if budget < 1:
        raise BadRequestError(f"kv budget must be >= 1 token, got {budget}")
    return min(budget, n_tokens)


def observation_window(method: Method, merge: Merge | None) -> int:
    """Trailing tokens whose queries are captured (SnapKV's window, or GRKV's)."""
    if method.needs_queries:
        return method.window
    return merge.window if merge is not None else 0


def capture_positions(n_tokens: int, method: Method, merge: Merge | None) -> tuple[list[int], bool]:
    """Positions whose queries must be captured, and whether any lies outside
    the trailing window (then the whole prefill runs with capture on)."""
    w = min(observation_window(method, merge), n_tokens)
    win = list(range(n_tokens - w, n_tokens))
    strata = merge.strata(n_tokens) if merge is not None else []
    return sorted(set(win) | set(strata)), bool(strata)


@dataclass
class CompressResult:
    cells_before: int
    cells_after: int
    bytes_before: int
    bytes_after: int
    seconds: float
    keep: np.ndarray | None  # [n_layer, n_head_kv, B] position-order indices
    positions: np.ndarray     # positions of the cache's tokens before compression, ascending
    bytes_per_cell: list = field(default_factory=list)  # per cache part (unchanged by compression)
    merge_report: dict = field(default_factory=dict)


def captured_queries(capture: GraphCapture, info: ModelInfo):
    """Per cache layer: (rows [n, n_head, head_dim], their positions)."""
    out = []
    for il in info.cache_layers:
        rows = capture.rows(0, il)
        pos = capture.positions(0, il)
        if len(pos) != len(rows):
            raise CompressionError(f"layer {il}: captured {len(rows)} query rows but {len(pos)} positions")
        out.append((rows.reshape(len(rows), info.n_head, info.head_dim), pos.astype(np.int32)))
    return out


def _surrogates(layers, info: ModelInfo, merge, window_start: int, last_pos: int):
    if merge.query_mode == "window":
        return [(q[p >= window_start], p[p >= window_start], True, 1.0) for q, p in layers]
    if info.rope_rerotation_refused:
        raise CompressionError(f"GRKV stratified queries are refused for this model: {info.rope_rerotation_refused}")
    sur = []
    for q, p in layers:
        strata = set(merge.strata(last_pos + 1))
        sel = np.array([int(x) in strata for x in p])
        qs, ps = q[sel], p[sel]
        if len(ps) != len(strata):  # fitting to a few of them would silently change the method
            raise CompressionError(f"GRKV stratified queries: {len(ps)} of the {len(strata)} strata positions were "
                                   "captured; prefill with capture_positions() for this merge")
        rot = _native.rope_rotate(np.ascontiguousarray(qs), info.rope_n_rot, info.rope_base, info.rope_scale,
                                  info.rope_neox, np.repeat((last_pos - ps).astype(np.float64), info.n_head))
        # queries at T-1 see every key: no causal mask; total weight 6 (spec §4.2)
        sur.append((rot, np.full(len(ps), last_pos, np.int32), False, 6.0 / max(1, len(ps))))
    return sur


def compress_cache(ctx, info: ModelInfo, method: Method, *, merge: Merge | None = None, ratio=None, budget=None,
                   shared=False, capture: GraphCapture | None = None, n_threads: int | None = None,
                   captured: list | None = None, history: np.ndarray | None = None) -> CompressResult:
    """Compress sequence 0's cache in place. On any failure the context is
    restored to its state before the call and CompressionError is raised.
    `captured` (per cache layer: query rows [n, n_head, head_dim] and their
    positions) replaces reading `capture`, e.g. to compress one prefill many ways.
    `history`: G-KV's global scores of the cells [n_layer, n_head_kv, n_cells]
    from the previous compression (0 for cells added since); the kept cells'
    new global scores come back in merge_report["global"]."""
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
    per_cell = kvstate.bytes_per_cell(state)
    positions = state.positions(PART)
    B = resolve_budget(n_cells, ratio, budget)
    if B >= n_cells:
        return CompressResult(n_cells, n_cells, bytes_before, bytes_before, time.perf_counter() - t0, None, positions,
                              per_cell)
    w = min(observation_window(method, merge), n_cells)
    window_start = int(positions[-w]) if w else int(positions[-1]) + 1
    layers = captured or []
    if not layers and (method.needs_queries or merge is not None and merge.name == "grkv"):
        if capture is None:
            raise CompressionError(f"{method.name} needs the queries captured during prefill")
        try:
            layers = captured_queries(capture, info)
        except NativeError as e:
            raise CompressionError(f"no captured queries: {e}") from e
    queries = [(q[p >= window_start], p[p >= window_start]) for q, p in layers] if method.needs_queries else []
    surrogate = []
    if merge is not None and merge.name == "grkv":
        surrogate = _surrogates(layers, info, merge, window_start, int(positions[-1]))
    threads = n_threads or os.cpu_count() or 1
    label_end = int(positions[-1])
    margs = merge.native_args() if merge is not None else {"merge": "none"}
    with kvstate.Rollback(ctx, blob):
        try:
            keep, report = state.compress(PART, n_head=info.n_head, n_head_kv=info.n_head_kv, scale=info.attn_scale,
                                          queries=queries, budget=B, shared=shared, label_end=label_end,
                                          surrogate=surrogate, window_start=window_start, n_threads=threads,
                                          history=history, **method.native_args(), **margs)
            new_blob = state.serialize()
        except NativeError as e:
            raise CompressionError(str(e)) from e
        if not kvstate.set_blob(ctx, new_blob):
            raise CompressionError("llama.cpp rejected the compressed state")
        pmin, pmax = kvstate.pos_range(ctx)
        if pmax != label_end:
            raise CompressionError(f"after compression the last position reads {pmax}, expected {label_end}")
    bytes_after = kvstate.kv_bytes(state)
    return CompressResult(n_cells, B, bytes_before, bytes_after, time.perf_counter() - t0, keep, positions,
                          per_cell, dict(report))
