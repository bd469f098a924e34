"""Compression inside llama.cpp's own decode loop, through the patched
build's after-decode hook (llama_kv_ext_set_hook): llama_decode calls back
once a batch is in the cache, and the callback may compress it there."""

from __future__ import annotations

import ctypes
import time

import llama_cpp.llama_cpp as L

from .apply import patched_library
from .budgeted import finish
from .capture import QUERIES
from .checks import label, require_window_fits, require_window_queries
from .compressor import compress_cache, observation_window
from .errors import BadRequestError
from .methods import parse_method

HOOK_T = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p)


class DecodeHook:
    """While inside, fn(seq, p0, p1) runs after every successful llama_decode
    of `ctx`. An exception in fn is kept (ctypes would swallow it) and raised
    by raise_pending() and on leaving."""

    def __init__(self, ctx, fn):
        if not patched_library():
            raise BadRequestError("the decode hook needs the patched llama.cpp (the default build)")
        self.ctx, self.fn, self.error = ctx, fn, None
        self._c = HOOK_T(self._call)  # kept alive as long as the hook is installed
        L._lib.llama_kv_ext_set_hook.argtypes = [ctypes.c_void_p, HOOK_T, ctypes.c_void_p]
        L._lib.llama_kv_ext_set_hook.restype = None

    def _call(self, ctx, seq, p0, p1, user_data):
        if self.error is None:
            try:
                self.fn(seq, p0, p1)
            except BaseException as e:  # noqa: BLE001 (re-raised outside the C frame)
                self.error = e

    def raise_pending(self):
        if self.error is not None:
            e, self.error = self.error, None
            raise e

    def __enter__(self):
        L._lib.llama_kv_ext_set_hook(self.ctx, self._c, None)
        return self

    def __exit__(self, *exc):
        L._lib.llama_kv_ext_set_hook(self.ctx, HOOK_T(), None)
        if exc[0] is None:
            self.raise_pending()
        return False


def budgeted_through_hook(model, context: str, *, budget: int, chunk: int, method="snapkv", shared: bool = False,
                          **params):
    """compress_budgeted, with each compression run by the hook from inside
    llama_decode instead of by the loop between decodes: one llama_decode per
    chunk (chunk <= n_batch), query-agnostic. A window scorer's queries are
    captured for every chunk's window while the chunks go in."""
    m, merge = parse_method(method, **params)
    require_window_queries(merge, "budgeted prefill")
    if m.context_scorer:
        raise BadRequestError(f"{m.name} is not available in the hook-driven budgeted prefill")
    if budget < 1 or chunk < 1:
        raise BadRequestError("budget and chunk must be >= 1 token")
    if chunk > model.llm.n_batch:
        raise BadRequestError(f"the hook sees one batch at a time: chunk ({chunk}) must not exceed n_batch "
                              f"({model.llm.n_batch})")
    llm = model.llm
    with model._keep_context_on_failure():
        tokens = model._tokens_for(context)
        model._check_room(budget + chunk + 1)
        w = observation_window(m, merge)
        require_window_fits(w, budget)
        model._reset()
        starts = list(range(0, len(tokens), chunk))
        if w:
            win = [p for a in starts for p in range(max(a, min(a + chunk, len(tokens)) - w), min(a + chunk, len(tokens)))]
            model.capture.set_targets([(*QUERIES, win)])
        t = {"prefill": 0.0, "compress": 0.0, "n": 0}
        model.budget_trace = []

        def on_decode(seq, p0, p1):
            t0 = time.perf_counter()
            if model._live > budget:
                res = compress_cache(model.ctx, model.info, m, merge=merge, budget=budget, shared=shared,
                                     capture=model.capture, n_threads=model.n_threads)
                model._live = res.cells_after
                t["n"] += 1
                t["backend"] = res.merge_report.get("apply", {}).get("backend", "")
                model.capture.clear()
            model.budget_trace.append(model._live)
            t["compress"] += time.perf_counter() - t0

        with DecodeHook(model.ctx, on_decode) as hook:
            for a in starts:
                piece = tokens[a: a + chunk]
                model._live += len(piece)  # what the cache holds once the hook runs
                t0 = time.perf_counter()
                llm._batch.set_batch(batch=piece, n_past=llm.n_tokens, logits_all=False)
                if w:
                    with model.capture.enabled(clear=False):
                        llm._ctx.decode(llm._batch)
                else:
                    llm._ctx.decode(llm._batch)
                llm.n_tokens += len(piece)
                hook.raise_pending()
                t["prefill"] += time.perf_counter() - t0
        t["prefill"] -= t["compress"]  # the hook's compressions ran inside the decodes
    return finish(model, tokens, label(m, merge, shared) + "-hook", t, chunk=chunk, budget=budget)
