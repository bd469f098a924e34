"""capture -> score -> select -> merge -> apply, on a context whose cache is
filled. All math runs in the native core; this module wires the steps
together and owns rollback."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from . import _native, kvstate
from .apply import backend as apply_backend
from .capture import GraphCapture
from .errors import BadRequestError, CompressionError, NativeError
from .loader import CACHE_TYPES, QUANTIZED_CACHE_TYPES, ModelInfo
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
    """Trailing tokens whose queries are captured (SnapKV's window, or GRKV's;
    a context scorer's whole context, or none for the re-read pass's)."""
    merge_w = merge.window if merge is not None else 0
    if method.context_scorer:
        return max(method.window, merge_w)
    if method.needs_queries:
        return method.window
    return merge_w


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


def _surrogates(layers, info: ModelInfo, merge, window_start: int, last_pos: int, reread=None):
    if merge.query_mode == "window":
        return [(q[p >= window_start], p[p >= window_start], True, 1.0) for q, p in layers]
    if merge.query_mode == "reread":
        if reread is None:
            raise CompressionError("GRKV's reread queries need the re-read pass (reread.run) first")
        sur = []
        for q, p, _, _ in reread.layers:
            idx = np.unique(np.linspace(0, len(p) - 1, min(merge.n_queries, len(p))).round().astype(int))
            # after the context they see all of it: no causal mask needed
            sur.append((np.ascontiguousarray(q[idx]), np.ascontiguousarray(p[idx]), False, 1.0))
        return sur
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
        rot = _native.rope_rotate(np.ascontiguousarray(qs), info.rope_params(),
                                  np.repeat((last_pos - ps).astype(np.float64), info.n_head))
        # queries at T-1 see every key: no causal mask; total weight 6 (spec §4.2)
        sur.append((rot, np.full(len(ps), last_pos, np.int32), False, 6.0 / max(1, len(ps))))
    return sur


def _context_inputs(method, info: ModelInfo, layers, positions, reread, n_prefix: int, carried: int = 0):
    """A context scorer's queries and settings for the native core. The first
    `carried` cells (compactor@budget) bring their score along; the queries
    cover the rest."""
    if method.reread:
        if reread is None:
            raise CompressionError(f"{method.name} needs the re-read pass (reread.run) first")
        queries, chunks = reread.layers, reread.chunks
    else:
        if info.rope_rerotation_refused:
            raise CompressionError(f"{method.name} undoes RoPE, which is refused for this model: "
                                   f"{info.rope_rerotation_refused}")
        queries, chunks = [], None
        need = positions[carried:]
        for q, p in layers:
            sel = np.isin(p, need)
            if int(sel.sum()) != len(need):
                raise CompressionError(f"{method.name} needs the queries of all {len(need)} cached tokens; "
                                       f"{int(sel.sum())} were captured")
            order = np.argsort(p[sel], kind="stable")
            queries.append((np.ascontiguousarray(q[sel][order]), np.ascontiguousarray(p[sel][order])))
    rope = info.rope_params()
    return queries, {"ctx": method.context_params(n_prefix), "rope": rope, "chunks": chunks}


def _set_rotation(state, info: ModelInfo, pi: dict) -> list[str]:
    """Tell the state which Walsh-Hadamard blocks llama.cpp rotated its
    quantised rows with, so that it reads them un-rotated; returns the
    quantised types found (empty for f16/bf16/f32 caches). `pi`: the
    compressed part's part_info."""
    kt, vt = pi.get("k_types", ["f16"])[0], pi.get("v_types", ["f16"])[0]
    found = [t for t in dict.fromkeys((kt, vt)) if t in QUANTIZED_CACHE_TYPES]
    if not found:
        return []
    flag = os.environ.get("LLAMA_ATTN_ROT_DISABLE", "").strip()
    off = flag.lstrip("+-").isdigit() and int(flag) != 0  # llama.cpp reads it with atoi
    # hadamard_block_* answer 0 for an unquantised type
    rk = 0 if off else _native.hadamard_block_k(CACHE_TYPES.get(kt, -1), info.head_dim)
    rv = 0 if off else _native.hadamard_block_v(CACHE_TYPES.get(vt, -1), info.head_dim)
    state.set_rotation(PART, rk, rv)
    return found


def check_method_supported(info: ModelInfo, method: Method) -> None:
    """Refuse, before any work, a method this architecture cannot run exactly."""
    why = info.refused_methods.get(method.name)
    if why:
        raise BadRequestError(f"method '{method.name}' is refused for {info.arch}: {why}")


def compress_request(info: ModelInfo, method: Method, merge: Merge | None, *, queries, budget: int, shared: bool,
                     label_end: int, surrogate=(), window_start: int = 0, n_threads: int = 1, history=None,
                     plan_only: bool = False, ctx=None, rope=None, chunks=None, key_pos=None) -> _native.CompressRequest:
    """The native core's CompressRequest (its parameter structs) for one compression."""
    args = dict(method.native_args())
    req = _native.CompressRequest()
    req.headwise = args.pop("headwise", "none")
    req.headwise_alpha = args.pop("headwise_alpha", 0.2)
    mp = _native.MethodParams(**args)
    if ctx is not None:
        mp.ctx = ctx
    if rope is not None:
        mp.rope = rope
    if chunks is not None:
        mp.chunks = chunks
    req.method = mp
    req.shape = _native.ModelShape(n_head=info.n_head, n_head_kv=info.n_head_kv, scale=info.attn_scale,
                                   softcap=info.attn_softcap)
    req.merge = _native.MergeParams(**merge.native_args()) if merge is not None else _native.MergeParams()
    req.budget, req.shared, req.label_end = budget, shared, label_end
    req.window_start, req.n_threads, req.plan_only = window_start, n_threads, plan_only
    req.set_queries(list(queries))
    if key_pos is not None:
        req.set_key_pos(np.ascontiguousarray(key_pos, np.int32))
    if history is not None:
        req.set_history(np.ascontiguousarray(history, np.float32))
    req.set_surrogate(list(surrogate))
    return req


GRAPH_METHODS = ("snapkv", "knorm", "streaming")


def _graph_select(ctx, be, info: ModelInfo, method: Method, merge, shared: bool, queries, budget: int, threads: int):
    """Keep indices from the graph path: the scorer and per-head top-k as ggml
    graphs on the cache's own backend, reading its K tensors in place."""
    from .apply.inplace import _addr, _api

    args = method.native_args()
    if args["method"] not in GRAPH_METHODS or merge is not None or shared or be.name != "inplace":
        raise CompressionError(f"the graph path runs per-head {', '.join(GRAPH_METHODS)} eviction (SnapKV with avg "
                               "pooling, no merge) on the in-place backend of the patched build; use math='core'")
    if not _native.graph_available():
        raise CompressionError("this build has no graph path (it needs the patched llama.cpp's ggml)")
    qs = [(np.ascontiguousarray(q, np.float32), p) for q, p in queries] if args["method"] == "snapkv" else []
    keep, name = _native.graph_select_cache(
        _api(), _addr(ctx), PART, args["method"], qs, info.n_head, info.n_head_kv, info.attn_scale,
        info.attn_softcap, args["kernel"], args["n_sink"], budget, threads, len(info.cache_layers))
    return keep, {"math": "graph", "graph_backend": name}


def compress_cache(ctx, info: ModelInfo, method: Method, *, merge: Merge | None = None, ratio=None, budget=None,
                   shared=False, capture: GraphCapture | None = None, n_threads: int | None = None,
                   captured: list | None = None, history: np.ndarray | None = None, reread=None,
                   n_prefix: int = 0, key_pos: np.ndarray | None = None, carried: int = 0,
                   backend: str | None = None, math: str = "core") -> CompressResult:
    """Compress sequence 0's cache in place. On any failure the context is
    restored to its state before the call and CompressionError is raised.
    `captured` (per cache layer: query rows [n, n_head, head_dim] and their
    positions) replaces reading `capture`, e.g. to compress one prefill many ways.
    `history`: G-KV's global scores of the cells [n_layer, n_head_kv, n_cells]
    from the previous compression (0 for cells added since); the kept cells'
    new global scores come back in merge_report["global"].
    Context scorers: `reread` (reread.Reread) holds the re-read pass's
    queries for reconstruct; `n_prefix` is the chat template's prefix length,
    the sinks they protect by default. compactor@budget: `history` holds
    the cells' tile attention (the first `carried` cells' from the previous
    compression) and `key_pos` their keys' true positions [n_layer,
    n_head_kv, n_cells]. `backend`: the apply backend (apply.backend(); by
    default in place where the patched llama.cpp is loaded, else the blob);
    merge_report["apply"] names it and splits the time into read, math, write.
    `math`: "core" (the C++ core on host copies) or "graph" (scores and
    selection as ggml graphs on the backend that holds the cache, reading its
    K tensors directly; snapkv, knorm and streaming eviction on the in-place
    backend so far)."""
    check_method_supported(info, method)
    if math not in ("core", "graph"):
        raise BadRequestError(f"math must be 'core' or 'graph', not {math!r}")
    t0 = time.perf_counter()
    be = apply_backend(backend)
    # eviction without a merge changes no row: a backend that gathers applies the
    # plan where the cache lives, and the graph path then needs no row on the host
    gather = merge is None and be.gathers
    state = be.read(ctx, rows=not (gather and math == "graph"))
    info0 = state.part_info(PART)
    _set_rotation(state, info, info0)  # merged rows are written back rotated and requantised
    t_read = time.perf_counter() - t0
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
    if method.context_scorer:  # the method reads the whole context; the window is GRKV's alone
        w = min(merge.window if merge is not None else 0, n_cells)
    window_start = int(positions[-w]) if w else int(positions[-1]) + 1
    layers = captured or []
    needs_prefill_queries = method.needs_queries and not method.reread
    if not layers and (needs_prefill_queries or merge is not None and merge.name == "grkv"):
        if capture is None:
            raise CompressionError(f"{method.name} needs the queries captured during prefill")
        try:
            layers = captured_queries(capture, info)
        except NativeError as e:
            raise CompressionError(f"no captured queries: {e}") from e
    ctx_args = {}
    if method.context_scorer:
        queries, ctx_args = _context_inputs(method, info, layers, positions, reread, n_prefix, carried)
        if key_pos is not None:
            ctx_args["key_pos"] = key_pos
    elif method.needs_queries:
        queries = [(q[p >= window_start], p[p >= window_start]) for q, p in layers]
    else:
        queries = []
    surrogate = []
    if merge is not None and merge.name == "grkv":
        surrogate = _surrogates(layers, info, merge, window_start, int(positions[-1]), reread)
    threads = n_threads or os.cpu_count() or 1
    label_end = int(positions[-1])
    t1 = time.perf_counter()
    original = be.snapshot(state)  # the rollback's copy counts as reading
    t_read += time.perf_counter() - t1
    with be.rollback(ctx, original, PART):
        try:
            t1 = time.perf_counter()
            if math == "graph":
                keep, report = _graph_select(ctx, be, info, method, merge, shared, queries, B, threads)
                report.update(positions=np.arange(label_end - keep.shape[2] + 1, label_end + 1, dtype=np.int32),
                              rebuilt=False)
            else:
                req = compress_request(info, method, merge, queries=queries, budget=B, shared=shared,
                                       label_end=label_end, surrogate=surrogate, window_start=window_start,
                                       n_threads=threads, history=history, plan_only=gather, **ctx_args)
                keep, report = state.compress(PART, req)
            t_math = time.perf_counter() - t1
        except NativeError as e:
            raise CompressionError(str(e)) from e
        report = dict(report)
        new_pos, rebuilt = report.pop("positions"), report.pop("rebuilt")
        # checked before the write: llama.cpp continues at the last position + 1
        if int(new_pos[-1]) != label_end:
            raise CompressionError(f"the compressed layout ends at position {int(new_pos[-1])}, expected {label_end}")
        t1 = time.perf_counter()
        written = "rows"
        if not rebuilt:
            if be.gather(ctx, keep, new_pos, PART):
                written = "gather:graph" if getattr(be, "gather_graph", False) else "gather"
            else:  # this cache cannot be gathered byte for byte (still unchanged): host rows
                if not state.has_rows(PART):
                    state = be.read(ctx)
                    _set_rotation(state, info, info0)
                state.apply_keep(PART, keep, label_end, positions=new_pos)
        if written == "rows":
            be.write(ctx, state, PART)
        t_write = time.perf_counter() - t1
        pmin, pmax = kvstate.pos_range(ctx)
        if pmax != label_end:
            raise CompressionError(f"after compression the last position reads {pmax}, expected {label_end}")
    # head-wise budgets keep as many cells as their busiest head's allocation
    bytes_after = bytes_before - per_cell[PART] * (n_cells - int(keep.shape[2]))
    report.setdefault("math", "core")
    report["apply"] = {"backend": be.name, "read_s": t_read, "math_s": t_math, "write_s": t_write,
                       "write": written}
    return CompressResult(n_cells, int(keep.shape[2]), bytes_before, bytes_after, time.perf_counter() - t0, keep,
                          positions, per_cell, report)
