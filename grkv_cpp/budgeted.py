"""Bounded-memory prefill: the context goes in chunks and the cache is
compressed back to the budget after each, so a prompt many times n_ctx runs
in a cache of budget + chunk cells (CompressedLlama.compress_budgeted)."""

from __future__ import annotations

import contextlib

import dataclasses
import time

import numpy as np

from . import kvstate
from .capture import QUERIES
from .compressor import captured_queries, check_method_supported, compress_cache, observation_window
from .errors import BadRequestError, CompressionError, GrkvError, NativeError
from .footprint import simulate
from .methods import parse_method
from .stats import Stats
from .checks import label as _label, require_window_fits as _require_window_fits
from .checks import require_window_queries as _require_window_queries


def _join_layers(parts: list) -> list:
    """Per cache layer, the query rows and positions of several captures, in order."""
    return [(np.concatenate([p[l][0] for p in parts]), np.concatenate([p[l][1] for p in parts]))
            for l in range(len(parts[0]))]


@dataclasses.dataclass(frozen=True)
class ChunkPrefix:
    """A budgeted prefill stopped right before its first compression: the
    cache of its first `n_chunks` chunks, all uncompressed, and the last
    chunk's window queries. Every method and budget with the same tokens,
    chunk and window passes through this state, so a sweep resumes here
    instead of prefilling again (`compress_budgeted(prefixes=...)`)."""

    blob: bytes
    n_chunks: int
    n_tokens: int
    captured: list
    prefill_s: float


def run(model, context: str, *, budget: int, chunk: int = 512, method="snapkv", shared: bool = False,
        question: str | None = None, prefixes: dict | None = None, **params) -> Stats:
    """CompressedLlama.compress_budgeted (see there)."""
    m, merge = parse_method(method, **params)
    check_method_supported(model.info, m)
    _require_window_queries(merge, "budgeted prefill")
    # Compactor's tile attention depends on its own tile only, so each
    # chunk's queries score the chunk once and its score travels with the
    # kept cells; the other context scorers need every token's queries
    # (or a re-read) at once.
    carry = m.name == "compactor"
    if m.context_scorer and not carry:
        raise BadRequestError(f"{m.name} is not available in the budgeted prefill; use compactor, snapkv, gkv, "
                              "laser, knorm or streaming there")
    if carry and (shared or question is not None or merge is not None or m.headwise != "none"):
        raise BadRequestError("compactor@budget runs per head, query-agnostic, without a merge or head-wise "
                              "budgets")
    if budget < 1 or chunk < 1:
        raise BadRequestError("budget and chunk must be >= 1 token")
    with model._keep_context_on_failure(), contextlib.ExitStack() as progress:
        tokens = model._tokens_for(context)
        progress.enter_context(model.progress.phase("prefill", len(tokens)))
        # room for the budget, a chunk, and the question and answer that follow (1 at least)
        model._check_room(budget + chunk + 1)
        q_tokens = model._question_tokens(question) if question is not None else None
        if q_tokens is not None:
            model._check_room(budget + chunk + len(q_tokens) + 1)
        w_max = 0 if carry else observation_window(m, merge)
        _require_window_fits(w_max, budget)
        n_prefix = model._n_prefix if carry else 0
        # compactor: kept cells' tile attention and true positions; queries of the cells added since
        tile = {"hist": None, "kpos": None, "pending": []}
        model._reset()
        t = {"prefill": 0.0, "compress": 0.0, "n": 0}
        model.budget_trace = []  # cells held after each chunk (after its compression)

        def after_chunk(captured):
            t0 = time.perf_counter()
            if model._live > budget:
                extra = _carried_inputs(model, tile) if carry else {}
                if carry:  # the queries of every cell added since the last compression
                    captured = _join_layers(tile["pending"])
                res = compress_cache(model.ctx, model.info, m, merge=merge, budget=budget, shared=shared,
                                     capture=model.capture, n_threads=model.n_threads, captured=captured,
                                     n_prefix=n_prefix, **extra)
                model._live = res.cells_after
                t["n"] += 1
                t["backend"] = res.merge_report.get("apply", {}).get("backend", "")
                if carry:
                    tile["hist"] = res.merge_report["global"]
                    tile["kpos"] = np.take_along_axis(extra["key_pos"], res.keep, axis=2)
                    tile["pending"] = []
            model.budget_trace.append(model._live)
            t["compress"] += time.perf_counter() - t0

        starts = list(range(0, len(tokens), chunk))
        # Until the first compression every chunk is kept whole, so the cache is the same for
        # any method and budget; it comes after chunk `first`, the first to end past the budget.
        first = next((i for i, a in enumerate(starts) if min(a + chunk, len(tokens)) > budget), None)
        key = None
        if prefixes is not None and q_tokens is None and first is not None:
            key = (id(model), tuple(tokens), chunk, w_max, carry)  # a blob fits only the model that wrote it
        i0 = 0
        fits = [p for (k, _), p in prefixes.items() if k == key and p.n_chunks <= first + 1] if key else []
        if fits:
            p = max(fits, key=lambda p: p.n_chunks)
            if not kvstate.set_blob(model.ctx, p.blob):
                raise GrkvError("llama.cpp rejected the saved chunk prefix")
            model.llm.n_tokens = model._live = p.n_tokens
            model.budget_trace = [min((j + 1) * chunk, len(tokens)) for j in range(p.n_chunks - 1)]
            t["prefill"], i0 = p.prefill_s, p.n_chunks
            model.progress.advance(p.n_tokens)  # the resumed prefix counts as evaluated
            tile["pending"] = [p.captured] if carry else []
            after_chunk(p.captured)  # compresses when the prefix stopped right before the first compression
        for i in range(i0, len(starts)):
            a = starts[i]
            piece = tokens[a: a + chunk]
            w = min(w_max, len(piece))
            t0 = time.perf_counter()
            captured = None
            if q_tokens is not None:
                model._eval(piece)
                end = model.llm.n_tokens
                model.capture.set_targets([(*QUERIES, list(range(end, end + len(q_tokens))))])
                with model.capture.enabled():
                    model._eval(q_tokens, count=False)
                captured = captured_queries(model.capture, model.info)
                kvstate.remove_from(model.ctx, end)  # the question's cells go; its queries stay
                model.llm.n_tokens = end
                model._live -= len(q_tokens)
            elif carry:  # every token's queries, kept until the next compression
                if i == i0:
                    model.capture.set_targets([(*QUERIES, list(range(len(tokens))))])
                with model.capture.enabled():
                    model._eval(piece)
                tile["pending"].append(captured_queries(model.capture, model.info))
            elif w:
                model.capture.set_targets([(*QUERIES, list(range(a + len(piece) - w, a + len(piece))))])
                model._eval(piece[: len(piece) - w])
                with model.capture.enabled():
                    model._eval(piece[len(piece) - w:])
            else:
                model._eval(piece)
            t["prefill"] += time.perf_counter() - t0
            if key is not None and i == first and (key, i + 1) not in prefixes:
                try:
                    if carry:
                        captured = _join_layers(tile["pending"])
                    else:
                        captured = captured_queries(model.capture, model.info) if w else []
                except NativeError as e:  # as compress_cache reports it on the fresh path
                    raise CompressionError(f"no captured queries: {e}") from e
                prefixes[(key, i + 1)] = ChunkPrefix(kvstate.get_blob(model.ctx), i + 1, model.llm.n_tokens,
                                                     captured, t["prefill"])
            after_chunk(captured)
    return finish(model, tokens, _label(m, merge, shared), t, chunk=chunk, budget=budget)


def finish(model, tokens, label: str, t: dict, *, chunk: int, budget: int) -> Stats:
    """The context's bookkeeping and Stats after a budgeted prefill."""
    state = kvstate.parse(kvstate.get_blob(model.ctx))
    model._context_len = model.llm.n_tokens
    model._cells = state.part_info(0)["n_cells"]
    model._tokens = list(tokens)
    model._settings = dict(method=f"{label}-budgeted", budget=budget, chunk=chunk)
    per_cell = state.part_info(0)["bytes_per_cell"]
    model.stats = Stats(method=f"{label}-budgeted", context_tokens=len(tokens), kv_cells_before=len(tokens),
                        kv_cells_after=model._cells, kv_bytes_after=kvstate.kv_bytes(state),
                        # the compressed part as if it held every token; other parts (an iSWA
                        # model's window cache) are not compressed and count as they are
                        kv_bytes_before=kvstate.kv_bytes(state) + (len(tokens) - model._cells) * per_cell,
                        prefill_s=t["prefill"], compress_s=t["compress"], compressions=t["n"],
                        apply_backend=t.get("backend", ""))
    model._memory_stats(kvstate.bytes_per_cell(state),
                        simulate(len(tokens), chunk=chunk, budget=budget, evict_during_prefill=True))
    return model.stats


def _carried_inputs(model, tile: dict) -> dict:
    """compactor@budget: the kept cells' tile attention and true positions,
    then the cells added since (their queries are in the capture)."""
    # The cells' positions run without a gap up to the last one: the per-head
    # layout labels the kept cells up to it, and the chunks since follow. (Only
    # the last position is read: an iSWA model reports the first of its SWA cache.)
    last = kvstate.pos_range(model.ctx)[1]
    if last + 1 < model._live:
        raise CompressionError(f"compactor@budget: {model._live} cells cannot end at position {last}")
    pos = np.arange(last + 1 - model._live, last + 1, dtype=np.int32)
    L, hkv, n = len(model.info.cache_layers), model.info.n_head_kv, len(pos)
    hist = np.zeros((L, hkv, n), np.float32)
    kpos = np.broadcast_to(pos, (L, hkv, n)).copy()
    old = 0 if tile["hist"] is None else tile["hist"].shape[2]
    if old:
        hist[:, :, :old] = tile["hist"]
        kpos[:, :, :old] = tile["kpos"]
    return {"history": hist, "key_pos": kpos, "carried": old}
