"""The user-facing model: a GGUF model whose context cache can be compressed.

CompressedLlama is assembled from files named for their jobs: this one loads
the model and compresses a context (whole, or budgeted through budgeted.py
and hook.py); sequence.py keeps the llama.cpp sequence (positions, cells,
room, prefill with query capture, rollback); prefilled.py prefills once and
compresses many ways; generation.py asks, generates and scores tokens, with
decode-time compression's schedule in decode_compression.py; saved_contexts.py
saves and loads contexts (persist.py's format)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from collections.abc import Sequence

import numpy as np
import llama_cpp.llama_cpp as L

from . import budgeted, decode_compression, hook, kvstate, reread
from .capture import QUERIES, GraphCapture
from .compressor import (capture_positions, captured_queries, check_method_supported, compress_cache,
                         resolve_budget)
from .errors import BadRequestError, CompressionError, GrkvError
from .footprint import simulate
from .loader import describe, open_llama
from .apply import patched_library
from .checks import default_method, jsonable_params, label as _label, needs_reread, widen_to_question
from .methods import Method, parse_method
from .progress import Tracker
from .prompt import build_format
from .stats import Stats
from .sequence import CacheSequence
from .prefilled import PrefilledStates
from .generation import Generation
from .saved_contexts import SavedContexts


class CompressedLlama(CacheSequence, PrefilledStates, Generation, SavedContexts):
    """A GGUF model with a compressible KV cache.

    >>> m = CompressedLlama("model.gguf", n_ctx=4096)
    >>> m.compress(long_text, method="snapkv", ratio=0.25)   # query-agnostic
    >>> m.ask("Who wrote it?"), m.ask("When?")               # reuse the compressed context
    >>> m.answer_query_aware(long_text, "Who wrote it?", ratio=0.25)
    """

    def __init__(self, model_path: str | os.PathLike, *, n_ctx: int = 4096, n_batch: int = 512,
                 n_threads: int | None = None, flash_attn: bool = False, type_k: str = "f16",
                 type_v: str = "f16", seed: int = 0, swa_full: bool = True, n_gpu_layers: int = 0,
                 verbose: bool = False):
        self.model_path = Path(model_path)
        self.cache_types = (type_k, type_v)
        self.flash_attn = bool(flash_attn)
        self._identity = None
        self.capture = GraphCapture()
        self.capture.set_targets([QUERIES])
        self.n_threads = n_threads or max(1, os.cpu_count() or 1)
        # the patched llama.cpp switches the eval callback on only while capturing
        toggle = patched_library()
        self.llm = open_llama(model_path, callback=None if toggle else self.capture.c_callback,
                              user_data=self.capture.user_data,
                              type_k=type_k, type_v=type_v, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                              n_threads=self.n_threads, flash_attn=flash_attn, seed=seed, swa_full=swa_full,
                              n_gpu_layers=n_gpu_layers, verbose=verbose)
        # where the layers (and their KV cache) run: the state blob reads and writes either
        self.device = "gpu" if n_gpu_layers != 0 and L.llama_supports_gpu_offload() else "cpu"
        if toggle:
            self.capture.attach(self.llm._ctx.ctx)
        self.swa_full = swa_full
        self.info = describe(self.llm)
        self.vocab = L.llama_model_get_vocab(self.llm._model.model)
        self.rng = np.random.default_rng(seed)
        self.stats = Stats()
        self._context_len = 0        # tokens of the compressed context (its next position)
        self._cells = 0              # cells the compressed context occupies
        self._live = 0               # cells the sequence occupies now (context + question/answer)
        self._format = None
        self._n_prefix = 0           # template prefix tokens of the current context (the sinks)
        self._tokens: list[int] = []  # the current context's tokens (a context file keeps them)
        self._settings: dict = {}    # how the current context was compressed (a context file's header)
        self._reread_cache = None    # (state, settings, Reread): one re-read pass per prefilled state
        self._decode: decode_compression.DecodePolicy | None = None
        self._decode_since = 0       # tokens generated since the last decode-time compression
        self._gkv_hist = None        # G-KV history: kept cells' global scores [L, Hkv, cells]
        self.budget_trace: list[int] = []  # budgeted prefill: cells after each chunk
        self.decode_trace: list[int] = []  # decode-time compression: cells before each one
        self.finish_reason = ""      # the last generate(): "stop" (end of turn or a stop string) or "length"
        # progress of long work: set `progress.callback = fn(phase, done, total)` (the CLI's bar)
        self.progress = Tracker()

    @classmethod
    def for_budget(cls, model_path: str | os.PathLike, *, budget: int, chunk: int = 512, headroom: int = 256,
                   **kw) -> "CompressedLlama":
        """A model whose context holds budget + chunk + headroom cells and no
        more, for `compress_budgeted` (headroom: the question and the answer,
        or N tokens of decode-time compression). An iSWA model's
        sliding-window cache is sized for its window, not for n_ctx."""
        if budget < 1 or chunk < 1 or headroom < 1:
            raise GrkvError("budget, chunk and headroom must be >= 1 token")
        kw.setdefault("n_batch", min(chunk, 512))
        kw.setdefault("swa_full", False)
        return cls(model_path, n_ctx=budget + chunk + headroom, **kw)

    def tokenize(self, text: str, bos: bool) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=bos, special=True)

    def _tokens_for(self, context: str) -> list[int]:
        if not isinstance(context, str) or not context.strip():
            raise BadRequestError("the context is empty (or whitespace only): nothing to compress")
        bos = self.llm._model.token_get_text(self.llm.token_bos()) if self.llm.token_bos() >= 0 else ""
        eos = self.llm._model.token_get_text(self.llm.token_eos()) if self.llm.token_eos() >= 0 else ""
        self._format = build_format(context, self.info.chat_template, bos=bos, eos=eos)
        text = self._format.context_text
        # Templates emit the BOS text themselves; tokenize it as a special token then.
        add_bos = not (bos and text.startswith(bos))
        cut = text.find(context) if context else -1
        self._n_prefix = len(self.tokenize(text[:cut], bos=add_bos)) if cut > 0 else int(add_bos)
        return self.tokenize(text, bos=add_bos)

    def _reread(self, m: Method, merge, tokens: Sequence[int], n_prefix: int, state=None):
        """The re-read pass for reconstruct or GRKV's reread queries (None
        otherwise), run on the context that fills the cache now; a prefilled
        state's pass is kept for the next compression of the same state."""
        if not needs_reread(m, merge):
            return None
        key = (getattr(m, "chunk", 2048), getattr(m, "overlap", 8)) if m.reread else (2048, 8)
        c = self._reread_cache
        if state is not None and c is not None and c[0] is state and c[1] == key:
            return c[2]
        rr = reread.run(self, list(tokens), n_prefix, chunk=key[0], overlap=key[1])
        self._reread_cache = (state, key, rr) if state is not None else None
        return rr

    def _question_tokens(self, question: str, answer_prefix: str = "") -> list[int]:
        if self._format is None:
            raise GrkvError("call compress() with a context first")
        text = self._format.question_template.format(question=question) + answer_prefix
        return self.tokenize(text, bos=False)

    def compress(self, context: str, *, method: str | Method | None = None, ratio: float | None = None,
                 budget: int | None = None, shared: bool = False, question: str | None = None,
                 answer_prefix: str = "", math: str = "core", **params) -> Stats:
        """Prefill `context` and compress its cache to a kept `ratio` or `budget` tokens.

        Query-agnostic by default: the question is not seen, and any number of
        `ask()` calls reuse the compressed cache. With `question`, compression
        is query-aware: the question sits inside the observation window and
        becomes part of the compressed sequence; continue with `generate()`.
        `shared=True` keeps one token set for all layers and heads instead of
        one per (layer, KV head). `method` may name a merge after a plus sign
        (`snapkv+grkv`, `snapkv+merge`, `knorm+grkv`); `params` go to the
        eviction method or the merge, whichever declares them. The default
        method is Compactor query-agnostic (the best measured, docs/results.md)
        and SnapKV query-aware. `math="graph"` scores and selects on the
        cache's own ggml backend (snapkv, knorm, streaming eviction on the
        patched build; see compressor.compress_cache)."""
        m, merge = parse_method(default_method(method, question is not None), **params)
        check_method_supported(self.info, m)
        if question is not None and (m.context_scorer or needs_reread(m, merge)):
            raise BadRequestError(f"{_label(m, merge, shared)} works on the context without its question; "
                                  "compress without question=")
        with self._keep_context_on_failure():
            tokens = self._tokens_for(context)
            q = self._question_tokens(question, answer_prefix) if question is not None else []
            return self._compress(tokens, q, m, merge, ratio=ratio, budget=budget, shared=shared, params=params,
                                  math=math)

    def compress_tokens(self, tokens: Sequence[int], *, n_prefix: int = 0, method: str | Method | None = None,
                        ratio: float | None = None, budget: int | None = None, shared: bool = False,
                        **params) -> Stats:
        """`compress` on raw token ids (no chat template, query-agnostic):
        the server's path. `n_prefix` leading tokens are the template's
        prefix (protected as sinks). Continue with `feed()` and `generate()`;
        `ask()` needs a context given as text."""
        m, merge = parse_method(default_method(method, False), **params)
        check_method_supported(self.info, m)
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise BadRequestError("no tokens to compress")
        if not 0 <= n_prefix < len(tokens):
            raise BadRequestError(f"n_prefix must be in [0, {len(tokens)}), got {n_prefix}")
        with self._keep_context_on_failure():
            self._format = None
            self._n_prefix = n_prefix
            return self._compress(tokens, [], m, merge, ratio=ratio, budget=budget, shared=shared, params=params)

    def _compress(self, tokens: list[int], q: list[int], m: Method, merge, *, ratio, budget, shared,
                  params, math: str = "core") -> Stats:
        """Prefill context `tokens` (+ question `q`, query-aware) and compress."""
        n_ctx_tokens = len(tokens)
        question = bool(q)
        tokens = tokens + q
        self._tokens = []
        self._check_room(len(tokens) + 1)
        m = widen_to_question(m, len(q))
        # Query-aware: the last token is decoded after compression, so the
        # first answer token comes from the compressed cache.
        body = tokens if not question else tokens[:-1]
        keep = resolve_budget(len(body), ratio, budget)  # bad arguments fail before the cache is wiped
        label = _label(m, merge, shared)
        if keep >= len(body) and not question:  # nothing to evict: keep the context whole, say so
            st = self._prefill_whole(tokens)
            self._settings = dict(method="full", requested=label, ratio=ratio, budget=budget, shared=shared,
                                  params=jsonable_params(params))
            st.note = f"context of {len(body)} tokens fits the budget of {keep}: kept whole, not compressed"
            return st
        positions, whole = capture_positions(len(body), m, merge)
        t0 = time.perf_counter()
        self._prefill(body, positions, whole)
        t1 = time.perf_counter()
        # the re-read pass reuses the capture: keep GRKV's window queries from the prefill first
        grkv = merge is not None and merge.name == "grkv"
        captured = captured_queries(self.capture, self.info) if needs_reread(m, merge) and grkv else None
        rr = self._reread(m, merge, body, self._n_prefix)
        try:
            self.progress.event("compress", 0, self._live)
            res = compress_cache(self.ctx, self.info, m, merge=merge, ratio=ratio, budget=budget, shared=shared,
                                 capture=self.capture, n_threads=self.n_threads, reread=rr, n_prefix=self._n_prefix,
                                 captured=captured, math=math)
            self.progress.event("compress", self._live, self._live)
        except CompressionError as e:
            # A ratio of a short context falls below what the method always keeps (its
            # sinks and window): the cache is as the prefill left it, so keep it whole.
            if ratio is None or question or "must keep" not in str(e):
                raise
            st = self._full_stats(body, t1 - t0)
            self._settings = dict(method="full", requested=label, ratio=ratio, shared=shared,
                                  params=jsonable_params(params))
            st.note = f"context of {len(body)} tokens is too short to compress with {label} ({e}): kept whole"
            return st
        self._live = res.cells_after
        t2 = time.perf_counter()
        if question:
            self._eval(tokens[-1:])
        self._context_len = self.llm.n_tokens
        self._cells = res.cells_after + (1 if question else 0)
        self._tokens = list(tokens)
        self._settings = dict(method=label, ratio=ratio, budget=budget, shared=shared, params=jsonable_params(params))
        self.stats = Stats(method=label, context_tokens=n_ctx_tokens, merge_report=res.merge_report,
                           apply_backend=res.merge_report.get("apply", {}).get("backend", ""),
                           math=res.merge_report.get("math", "core"),
                           question_tokens=len(tokens) - n_ctx_tokens,
                           kv_cells_before=res.cells_before, kv_cells_after=res.cells_after,
                           kv_bytes_before=res.bytes_before, kv_bytes_after=res.bytes_after,
                           prefill_s=t1 - t0, compress_s=t2 - t1, reread_s=rr.seconds if rr else 0.0)
        self._memory_stats(res.bytes_per_cell, simulate(len(body), budget=res.cells_after))  # post-fill eviction
        return self.stats

    def compress_budgeted(self, context: str, *, budget: int, chunk: int = 512, method: str | Method = "snapkv",
                          shared: bool = False, question: str | None = None, prefixes: dict | None = None,
                          driver: str = "loop", **params) -> Stats:
        """Bounded-memory prefill: feed the context in chunks of `chunk` tokens
        and compress the cache back to `budget` cells after each chunk, so a
        context many times n_ctx runs in a cache of budget + chunk cells.
        Each chunk's last window scores the cache (compressed past + chunk);
        a GRKV merge fits to attention over that same cache.
        `question`: score with the question's queries instead (query-aware,
        as LASER-KV): after each chunk the question is evaluated right after
        it, its queries captured and its cells removed again. `method="laser"`
        selects LASER-KV's anchors + local window + global memory.
        `prefixes` (a dict, query-agnostic only): until the first compression
        the cache is the same for every method and budget, so the state just
        before it is kept there (a `ChunkPrefix`) and a later call on the same
        context resumes from the longest one that fits its budget; the result
        is the same as a prefill from the start, and prefill_s counts the
        prefix's time as if it had been prefilled again (the caller's wall
        clock does not). The dict holds one state blob per distinct first
        compression: drop it when the context changes.
        `driver="hook"` (patched llama.cpp): the compressions run from
        llama_decode's after-decode hook, one decode per chunk (grkv_cpp/hook.py)."""
        if driver == "hook":
            if question is not None or prefixes is not None:
                raise BadRequestError("the hook-driven budgeted prefill is query-agnostic and keeps no prefixes")
            return hook.budgeted_through_hook(self, context, budget=budget, chunk=chunk, method=method,
                                              shared=shared, **params)
        if driver != "loop":
            raise BadRequestError(f"driver must be 'loop' or 'hook', not {driver!r}")
        return budgeted.run(self, context, budget=budget, chunk=chunk, method=method, shared=shared,
                            question=question, prefixes=prefixes, **params)

    def prefill(self, context: str) -> Stats:
        """Prefill `context` with the full cache (no compression), for comparison."""
        with self._keep_context_on_failure():
            tokens = self._tokens_for(context)
            self._check_room(len(tokens) + 1)
            st = self._prefill_whole(tokens)
        self._settings = dict(method="full")
        return st

    def _prefill_whole(self, tokens: list[int]) -> Stats:
        t0 = time.perf_counter()
        self._prefill(tokens)
        return self._full_stats(tokens, time.perf_counter() - t0)

    def _full_stats(self, tokens: list[int], prefill_s: float) -> Stats:
        """Bookkeeping and Stats of a context whose whole cache is kept."""
        state = kvstate.parse(kvstate.get_blob(self.ctx))
        cells, nbytes = state.part_info(0)["n_cells"], kvstate.kv_bytes(state)
        self._context_len = self.llm.n_tokens
        self._cells = cells
        self._tokens = list(tokens)
        self.stats = Stats(method="full", context_tokens=len(tokens), kv_cells_before=cells, kv_cells_after=cells,
                           kv_bytes_before=nbytes, kv_bytes_after=nbytes, prefill_s=prefill_s)
        self._memory_stats(kvstate.bytes_per_cell(state), simulate(len(tokens)))
        return self.stats

    def close(self):
        with contextlib.suppress(Exception):
            self.llm.close()
