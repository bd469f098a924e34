"""Prefill once, compress many ways: a context's full-cache state and its
captured queries, restored for each method and ratio (the evaluation
harness's sweep)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence


from . import kvstate
from .compressor import (captured_queries, check_method_supported, compress_cache, observation_window,
                         resolve_budget)
from .errors import BadRequestError, GrkvError
from .footprint import simulate
from .checks import default_method, label as _label, widen_to_question
from .checks import require_window_queries as _require_window_queries
from .methods.context import ALL_QUERIES
from .methods import Method, parse_method
from .stats import Stats


@dataclasses.dataclass(frozen=True)
class PrefilledState:
    """A context prefilled once with the full cache: its KV state and the
    last `window` tokens' queries, so that many methods and ratios can be
    applied to restored copies (`CompressedLlama.compress_state`)."""

    blob: bytes
    captured: list          # per cache layer: (queries [n, n_head, head_dim], positions)
    window: int
    context_tokens: int
    cells: int
    fmt: object
    prefill_s: float
    per_cell: list
    kv_bytes: int           # K/V bytes the full cache holds (all cache parts)
    # Query-aware: the question's token count (its tokens, but the last, are in
    # the cache and in the window) and that last token, decoded after
    # compression so the answer's first token comes from the compressed cache.
    question_tokens: int = 0
    pending: tuple = ()
    tokens: tuple = ()      # the context's tokens (the re-read pass repeats them)
    n_prefix: int = 0       # of which the chat template's prefix

    @property
    def cached_tokens(self) -> int:
        """Positions the saved cache holds."""
        return self.context_tokens + self.question_tokens - len(self.pending)



class PrefilledStates:
    """prefill_state / restore / compress_state (a mixin of CompressedLlama)."""

    def prefill_state(self, context: str | None = None, *, tokens: Sequence[int] | None = None,
                      window: int = 64, question: str | None = None, answer_prefix: str = "") -> PrefilledState:
        """Prefill `context` (with the chat template) or raw `tokens` (none)
        with the full cache and keep its state and the last `window` tokens'
        queries: `compress_state` then applies any method whose observation
        window is at most `window` to a restored copy, without prefilling
        again.

        With `question` the state is query-aware, as `compress(...,
        question=...)` prefills it: the question follows the context and
        the window widens to hold all of it; `compress_state` and `restore`
        then leave the model ready for `generate()`, not `ask()`."""
        if (context is None) == (tokens is None):
            raise GrkvError("give a context or tokens")
        if question is not None and context is None:
            raise GrkvError("a query-aware state needs the context as text (the question follows its chat template)")
        if context is not None:
            tokens = self._tokens_for(context)
        else:
            tokens = list(tokens)
            self._format = None
        n_context = len(tokens)
        pending: tuple = ()
        if question is not None:
            tokens = tokens + self._question_tokens(question, answer_prefix)
            window = max(window, len(tokens) - n_context)
            pending = (tokens.pop(),)
        self._check_room(len(tokens) + len(pending) + 1)
        # The cache is about to be overwritten: no context until restore() or
        # compress_state() (ask() would otherwise trust the last one's lengths).
        self._context_len = self._cells = 0
        self.stats = Stats()
        t0 = time.perf_counter()
        self._prefill(tokens, capture=min(window, len(tokens)))
        dt = time.perf_counter() - t0
        captured = captured_queries(self.capture, self.info)
        blob = kvstate.get_blob(self.ctx)
        state = kvstate.parse(blob)
        return PrefilledState(blob, captured, window, n_context, state.part_info(0)["n_cells"], self._format, dt,
                              kvstate.bytes_per_cell(state), kvstate.kv_bytes(state),
                              question_tokens=len(tokens) + len(pending) - n_context, pending=pending,
                              tokens=tuple(tokens[:n_context]), n_prefix=self._n_prefix if context is not None else 0)

    def _put_state(self, st: PrefilledState):
        if not kvstate.set_blob(self.ctx, st.blob):
            raise GrkvError("llama.cpp rejected the saved state")
        self.llm.n_tokens = self._context_len = st.cached_tokens
        self._cells = self._live = st.cells
        self._format = st.fmt
        self._tokens = list(st.tokens) if not st.question_tokens else []
        self._settings = dict(method="full")
        self._decode_since = 0
        self._gkv_hist = None
        self.decode_trace = []

    def _decode_pending(self, st: PrefilledState):
        """A query-aware state's last prompt token, after any compression."""
        if st.pending:
            self._eval(st.pending)
            self._context_len = self.llm.n_tokens
            self._cells += len(st.pending)

    def restore(self, st: PrefilledState) -> Stats:
        """Put a prefilled state back (the full cache), ready for ask() (a
        query-aware state: for generate())."""
        self._put_state(st)
        self._decode_pending(st)
        self.stats = Stats(method="full", context_tokens=st.context_tokens, question_tokens=st.question_tokens,
                           kv_cells_before=st.cells, kv_cells_after=st.cells, kv_bytes_before=st.kv_bytes,
                           kv_bytes_after=st.kv_bytes, prefill_s=st.prefill_s)
        self._memory_stats(st.per_cell, simulate(st.cached_tokens))
        return self.stats

    def compress_state(self, st: PrefilledState, *, method: str | Method | None = None, ratio: float | None = None,
                       budget: int | None = None, shared: bool = False, **params) -> Stats:
        """Restore `st` and compress it, as `compress` would after its own
        prefill (query-aware if the state is: the whole question inside the
        observation window); prefill_s reports the shared prefill's time."""
        m, merge = parse_method(default_method(method, bool(st.question_tokens)), **params)
        check_method_supported(self.info, m)
        _require_window_queries(merge, "compress_state (stratified needs its own prefill)", reread_ok=True)
        if st.question_tokens and m.context_scorer:
            raise BadRequestError(f"{m.name} scores the context without its question; this state is query-aware")
        m = widen_to_question(m, st.question_tokens)
        need = observation_window(m, merge)
        if need > st.window:
            what = "every context token's queries" if need >= ALL_QUERIES else f"the last {need} queries"
            raise GrkvError(f"{m.name} needs {what}; the state kept {st.window} (prefill_state(window=...))")
        resolve_budget(st.cached_tokens, ratio, budget)  # bad arguments fail before the cache is replaced
        with self._keep_context_on_failure():
            self._put_state(st)
            t0 = time.perf_counter()
            rr = self._reread(m, merge, st.tokens, st.n_prefix, state=st)
            self.progress.event("compress", 0, self._live)
            res = compress_cache(self.ctx, self.info, m, merge=merge, ratio=ratio, budget=budget, shared=shared,
                                 captured=st.captured, n_threads=self.n_threads, reread=rr, n_prefix=st.n_prefix)
            self.progress.event("compress", self._live, self._live)
            self._cells = self._live = res.cells_after
            t1 = time.perf_counter()
            self._decode_pending(st)
        label = _label(m, merge, shared)
        self.stats = Stats(method=label, context_tokens=st.context_tokens, question_tokens=st.question_tokens,
                           merge_report=res.merge_report,
                           apply_backend=res.merge_report.get("apply", {}).get("backend", ""),
                           kv_cells_before=res.cells_before, kv_cells_after=res.cells_after,
                           kv_bytes_before=res.bytes_before, kv_bytes_after=res.bytes_after,
                           prefill_s=st.prefill_s, compress_s=t1 - t0, reread_s=rr.seconds if rr else 0.0)
        self._memory_stats(res.bytes_per_cell, simulate(st.cached_tokens, budget=res.cells_after))
        return self.stats
