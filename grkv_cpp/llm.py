"""The user-facing model: a GGUF model whose context cache can be compressed."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from collections.abc import Iterator, Sequence

import numpy as np
import llama_cpp.llama_cpp as L

from . import budgeted, decode_compression, hook, kvstate, persist, reread
from .capture import QUERIES, GraphCapture
from .compressor import (capture_positions, captured_queries, check_method_supported, compress_cache,
                         observation_window, resolve_budget)
from .errors import BadRequestError, CompressionError, GrkvError
from .footprint import simulate
from .loader import describe, open_llama
from .apply import patched_library
from .checks import label as _label
from .checks import require_window_queries as _require_window_queries
from .methods.context import ALL_QUERIES
from .methods import Method, parse_method
from .progress import Tracker
from .prompt import PromptFormat, build_format
from .stats import Stats


def default_method(method, query_aware: bool):
    """No method given: Compactor scores a context best without its question
    (docs/results.md); with the question in the window, SnapKV."""
    if method is not None:
        return method
    return "snapkv" if query_aware else "compactor"


def _jsonable(params: dict) -> dict:
    """Method parameters as JSON values (a context file's header)."""
    return {k: (v if isinstance(v, (bool, int, float, str, type(None))) else repr(v)) for k, v in params.items()}


def _needs_reread(m: Method, merge) -> bool:
    return m.reread or getattr(merge, "query_mode", "") == "reread"


def _widen_to_question(m: Method, n_question: int) -> Method:
    """Query-aware: the whole question sits inside the observation window."""
    if n_question and m.needs_queries and not m.context_scorer and n_question > m.window:
        return dataclasses.replace(m, window_size=n_question)
    return m


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


class CompressedLlama:
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

    # ---------------------------------------------------------------- helpers
    @property
    def ctx(self):
        return self.llm._ctx.ctx

    @property
    def n_ctx(self) -> int:
        return self.llm.n_ctx()

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
        if not _needs_reread(m, merge):
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

    def _eval(self, tokens: Sequence[int], count: bool = True):
        """Decode tokens at the next positions. Unlike Llama.eval this keeps no
        token history sized by n_ctx, so positions may run past n_ctx (a
        budgeted cache holds fewer cells than positions). `count`: the tokens
        are part of the running progress phase's total."""
        llm = self.llm
        for i in range(0, len(tokens), llm.n_batch):
            piece = list(tokens[i: i + llm.n_batch])
            llm._batch.set_batch(batch=piece, n_past=llm.n_tokens, logits_all=False)
            llm._ctx.decode(llm._batch)
            llm.n_tokens += len(piece)
            self._live += len(piece)
            if count:
                self.progress.advance(len(piece))

    def _reset(self):
        self.llm.reset()
        kvstate.remove_from(self.ctx, 0)
        self._live = 0
        self._decode_since = 0
        self._gkv_hist = None
        self.decode_trace = []

    def _check_room(self, n: int):
        if n > self.n_ctx:
            raise GrkvError(
                f"{n} tokens do not fit the context of {self.n_ctx} cells; create the model with a larger n_ctx, "
                "or run a budgeted request (compress_budgeted / --kv-budget N --chunk C)"
            )

    @contextlib.contextmanager
    def _keep_context_on_failure(self):
        """compress() replaces the context: if it fails after the cache was
        wiped, put the previous context back (or none), so that ask() never
        answers from a half-made cache."""
        fields = ("_context_len", "_cells", "_live", "_format", "stats", "_gkv_hist", "_decode_since")
        saved = None
        if self._context_len:
            saved = (kvstate.get_blob(self.ctx), self.llm.n_tokens, {f: getattr(self, f) for f in fields})
        try:
            yield
        except BaseException:
            if saved is not None and kvstate.set_blob(self.ctx, saved[0]):
                self.llm.n_tokens = saved[1]
                for f, v in saved[2].items():
                    setattr(self, f, v)
            else:
                self._reset()
                self._context_len = self._cells = 0
                self._format = None
            raise

    def _prefill(self, tokens: Sequence[int], capture: int | Sequence[int] = 0, whole: bool = False):
        """Evaluate tokens from position 0, capturing the post-RoPE queries at
        `capture` (positions, or an int n for the last n). Queries confined to
        the tail are captured by evaluating the tail as its own batch; `whole`
        keeps capture on for the whole prefill (rows filtered natively)."""
        self._reset()
        positions = list(range(len(tokens) - capture, len(tokens))) if isinstance(capture, int) else list(capture)
        with self.progress.phase("prefill", len(tokens)):
            if not positions:
                self._eval(tokens)
                return
            self.capture.set_targets([(*QUERIES, positions)])
            head = 0 if whole else min(positions)
            if head > 0:
                self._eval(tokens[:head])
            with self.capture.enabled():
                self._eval(tokens[head:])

    # ------------------------------------------------------------- compression
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
        if question is not None and (m.context_scorer or _needs_reread(m, merge)):
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
        m = _widen_to_question(m, len(q))
        # Query-aware: the last token is decoded after compression, so the
        # first answer token comes from the compressed cache.
        body = tokens if not question else tokens[:-1]
        keep = resolve_budget(len(body), ratio, budget)  # bad arguments fail before the cache is wiped
        label = _label(m, merge, shared)
        if keep >= len(body) and not question:  # nothing to evict: keep the context whole, say so
            st = self._prefill_whole(tokens)
            self._settings = dict(method="full", requested=label, ratio=ratio, budget=budget, shared=shared,
                                  params=_jsonable(params))
            st.note = f"context of {len(body)} tokens fits the budget of {keep}: kept whole, not compressed"
            return st
        positions, whole = capture_positions(len(body), m, merge)
        t0 = time.perf_counter()
        self._prefill(body, positions, whole)
        t1 = time.perf_counter()
        # the re-read pass reuses the capture: keep GRKV's window queries from the prefill first
        grkv = merge is not None and merge.name == "grkv"
        captured = captured_queries(self.capture, self.info) if _needs_reread(m, merge) and grkv else None
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
                                  params=_jsonable(params))
            st.note = f"context of {len(body)} tokens is too short to compress with {label} ({e}): kept whole"
            return st
        self._live = res.cells_after
        t2 = time.perf_counter()
        if question:
            self._eval(tokens[-1:])
        self._context_len = self.llm.n_tokens
        self._cells = res.cells_after + (1 if question else 0)
        self._tokens = list(tokens)
        self._settings = dict(method=label, ratio=ratio, budget=budget, shared=shared, params=_jsonable(params))
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

    def kv_cache_sizes(self) -> list[int]:
        """Cells llama.cpp allocated per cache: n_ctx, and for an iSWA model
        its sliding-window cache (n_ctx with swa_full, else the window plus
        a micro-batch, padded to 256 as llama.cpp does)."""
        n = L.llama_n_ctx(self.ctx)
        if not self.info.iswa:
            return [n]
        swa = n if self.swa_full else min(n, -(-(self.info.n_swa + self.llm.context_params.n_ubatch) // 256) * 256)
        return [n, swa]

    # ------------------------------------------------------ prefill once, sweep
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
        m = _widen_to_question(m, st.question_tokens)
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

    def continuation_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Teacher-forced logits [len(tokens), n_vocab] (float32): row i is
        the next-token distribution after the current sequence + tokens[:i+1]
        (so rows predict tokens[1:] and one more). The tokens are evaluated in
        batches over the current cache and removed again."""
        if self._decode is not None:
            raise GrkvError("continuation_logits evaluates in batches; switch decode compression off first")
        llm = self.llm
        n_vocab = llm.n_vocab()
        self._check_room(self._live + len(tokens))
        out = np.empty((len(tokens), n_vocab), np.float32)
        start = llm.n_tokens
        try:
            body = list(tokens)
            for i in range(0, len(body), llm.n_batch):
                piece = body[i: i + llm.n_batch]
                llm._batch.set_batch(batch=piece, n_past=llm.n_tokens, logits_all=True)
                llm._ctx.decode(llm._batch)
                llm.n_tokens += len(piece)
                self._live += len(piece)
                z = np.ctypeslib.as_array(L.llama_get_logits(self.ctx), shape=(len(piece), n_vocab))
                out[i: i + len(piece)] = z
        finally:
            kvstate.remove_from(self.ctx, start)
            self._live -= llm.n_tokens - start
            llm.n_tokens = start
        return out

    def _memory_stats(self, per_cell: list[int], fp):
        self.stats.kv_buffer_bytes = kvstate.kv_buffer_bytes(per_cell, self.kv_cache_sizes())
        self.stats.kv_footprint, self.stats.kv_peak = fp.footprint, fp.peak
        self.stats.peak_rss_bytes = kvstate.peak_rss_bytes()

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

    # --------------------------------------------------------------- decoding
    def _next_token(self, temperature: float, top_p: float) -> int:
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, -1), shape=(self.llm.n_vocab(),))
        if temperature <= 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        if top_p < 1.0:
            order = np.argsort(-p)
            cut = np.searchsorted(np.cumsum(p[order]), top_p) + 1
            mask = np.zeros_like(p)
            mask[order[:cut]] = 1
            p = p * mask / (p * mask).sum()
        return int(self.rng.choice(len(p), p=p))

    def generate(self, max_tokens: int = 64, *, temperature: float = 0.0, top_p: float = 1.0,
                 stop: Sequence[str] = (), ignore_eos: bool = False) -> Iterator[str]:
        """Stream text pieces continuing the current sequence (`ignore_eos`:
        run to max_tokens, as decode benchmarks do)."""
        t0 = time.perf_counter()
        out = b""
        emitted = 0
        n = 0
        self.finish_reason = "length"
        policy = self._decode
        if policy:  # queries of every generated token are kept until the next compression
            self.capture.set_targets([QUERIES])
        try:
            for n in range(1, max_tokens + 1):
                tok = self._next_token(temperature, top_p)
                if not ignore_eos and L.llama_vocab_is_eog(self.vocab, tok):
                    n -= 1
                    self.finish_reason = "stop"
                    break
                out += self.llm.detokenize([tok])
                text = out.decode("utf-8", errors="ignore")
                hit = [text.find(s) for s in stop if s and s in text]
                if hit:
                    cut = min(hit)
                    if cut > emitted:
                        yield text[emitted:cut]
                    emitted = cut
                    self.finish_reason = "stop"
                    break
                if len(text) > emitted:  # a character split across tokens shows once complete
                    yield text[emitted:]
                    emitted = len(text)
                if n == max_tokens:
                    break
                self._step(tok)
        finally:
            self.stats.decode_s += time.perf_counter() - t0
            self.stats.generated_tokens += n

    # ------------------------------------------------------ decode-time (G-KV)
    def decode_compression(self, budget: int | None, *, every: int = 128, method: str | Method = "gkv",
                           **params):
        """Re-compress the cache to `budget` cells every `every` generated
        tokens (G-KV's schedule; None switches it off), so a long generation
        holds at most budget + every cells. The method scores with the last
        generated tokens' queries (`gkv`: global score with history, the
        default; `snapkv`, `knorm`, ... work too); its window is protected."""
        self._decode = decode_compression.policy(budget, every, method, **params)
        self._decode_since = 0

    def _maybe_compress_decode(self, p: "decode_compression.DecodePolicy"):
        decode_compression.maybe_compress(self, p)

    def logprobs(self, tokens: Sequence[int]) -> np.ndarray:
        """Teacher-forced: the log-probability of each of `tokens` continuing
        the current sequence, fed one at a time as generation would (so
        decode-time compression runs on its schedule). The tokens stay in
        the cache. Float64, one value per token."""
        out = np.empty(len(tokens))
        if self._decode:
            self.capture.set_targets([QUERIES])
        for i, tok in enumerate(tokens):
            z = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, -1), shape=(self.llm.n_vocab(),))
            z = z.astype(np.float64)
            m = z.max()
            out[i] = z[tok] - m - np.log(np.exp(z - m).sum())
            self._step(tok)
        return out

    def _step(self, tok: int):
        """Decode one generated token; with decode compression on, capture its
        queries and compress when the schedule says so."""
        self._check_room(self._live + 1)
        policy = self._decode
        if policy is None:
            self._eval([tok])
            return
        with self.capture.enabled(clear=self._decode_since == 0):
            self._eval([tok])
        self._decode_since += 1
        self._maybe_compress_decode(policy)

    def ask(self, question: str, *, max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
            stop: Sequence[str] | None = None, answer_prefix: str = "", stream: bool = False,
            ignore_eos: bool = False):
        """Answer `question` against the compressed context; the answer's KV is
        removed afterwards so the next question sees the same context.
        `answer_prefix` starts the answer (e.g. "The pass key is"). `stop`:
        strings that end the answer (default: the prompt format's, so a
        plain-text answer ends before a next "Question:")."""
        if self._context_len == 0:
            raise GrkvError("call compress() or prefill() with a context first")
        if stop is None:
            stop = self._format.stop if self._format is not None else ()
        q = self._question_tokens(question, answer_prefix)
        if self._decode is None:
            self._check_room(self._cells + len(q) + max_tokens)
        else:  # decode-time compression rewrites the context's cells: keep them to restore
            self._check_room(self._cells + len(q) + min(max_tokens, self._decode.every))
            saved = (kvstate.get_blob(self.ctx), self._gkv_hist)
        self.stats.question_tokens = len(q)
        self.stats.question_s = self.stats.decode_s = 0.0
        self.stats.generated_tokens = 0

        def run():
            try:
                t0 = time.perf_counter()
                self._eval(q)
                self.stats.question_s = time.perf_counter() - t0
                yield from self.generate(max_tokens, temperature=temperature, top_p=top_p, stop=stop,
                                         ignore_eos=ignore_eos)
            finally:
                if self._decode is None:
                    kvstate.remove_from(self.ctx, self._context_len)
                elif not kvstate.set_blob(self.ctx, saved[0]):
                    raise GrkvError("could not restore the context's cache after the answer")
                else:
                    self._gkv_hist = saved[1]
                self.llm.n_tokens = self._context_len
                self._live = self._cells
                self._decode_since = 0

        return run() if stream else "".join(run()).strip()

    def answer_query_aware(self, context: str, question: str, *, max_tokens: int = 64, temperature: float = 0.0,
                           stop: Sequence[str] = (), answer_prefix: str = "", **compress_kw) -> str:
        """Compress with the question inside the observation window, then answer it."""
        self.compress(context, question=question, answer_prefix=answer_prefix, **compress_kw)
        return "".join(self.generate(max_tokens, temperature=temperature, stop=stop)).strip()

    # ------------------------------------------------------------ persistence
    @property
    def identity(self) -> dict:
        """What a saved context must match to load here (persist.COMPATIBLE)."""
        if self._identity is None:
            self._identity = dict(model_sha256=persist.model_identity(self.model_path),
                                  llama_cpp=persist.LLAMA_CPP_COMMIT, type_k=self.cache_types[0],
                                  type_v=self.cache_types[1], flash_attn=self.flash_attn)
        return self._identity

    def snapshot(self) -> persist.SavedContext:
        """The current context (compressed or full) as a SavedContext."""
        if self._context_len == 0 or not self._tokens:
            raise GrkvError("no context to save: call compress() or prefill() first")
        if self._live != self._cells:
            raise GrkvError("the cache holds tokens past the context (a generation in progress); "
                            "save between questions")
        import llama_cpp

        blob = kvstate.get_blob(self.ctx)
        fmt = self._format
        header = dict(self.identity, format=persist.FORMAT_VERSION, llama_cpp_python=llama_cpp.__version__,
                      arch=self.info.arch, model=self.model_path.name, swa_full=self.swa_full,
                      context_tokens=len(self._tokens), next_pos=self._context_len, cells=self._cells,
                      n_prefix=self._n_prefix, compression=self._settings,
                      question_template=fmt.question_template if fmt is not None else None,
                      stop=list(fmt.stop) if fmt is not None else [],
                      kv_bytes=self.stats.kv_bytes_after, full_kv_bytes=self.stats.kv_bytes_before,
                      prefill_s=self.stats.prefill_s, compress_s=self.stats.compress_s)
        return persist.SavedContext(header, np.asarray(self._tokens, np.uint32), blob)

    def restore_context(self, saved: persist.SavedContext) -> Stats:
        """Put a SavedContext back as the current context (ask() works again
        if it was made from text). A context from another model, build or
        cache layout is refused before the cache is touched; if llama.cpp
        rejects the blob, the previous context stays."""
        persist.check(saved.header, self.identity)
        h = saved.header
        try:
            cells, next_pos, n_tok = int(h["cells"]), int(h["next_pos"]), int(h["context_tokens"])
        except (KeyError, TypeError, ValueError):
            raise persist.ContextFileError("context file header lacks cells/next_pos/context_tokens") from None
        if n_tok != len(saved.tokens) or not 0 < cells <= next_pos:
            raise persist.ContextFileError("context file header disagrees with its token list")
        self._check_room(cells + 1)
        with self._keep_context_on_failure():
            self._reset()
            if not kvstate.set_blob(self.ctx, saved.blob):
                raise persist.ContextFileError("llama.cpp rejected the saved cache (another n_ctx, cache layout "
                                               "or build?)")
            have = kvstate.parse(kvstate.get_blob(self.ctx)).part_info(0)["n_cells"]
            if have != cells:
                raise persist.ContextFileError(f"the restored cache holds {have} cells, the header says {cells}")
            self.llm.n_tokens = self._context_len = next_pos
            self._cells = self._live = cells
            self._tokens = [int(t) for t in saved.tokens]
            self._n_prefix = int(h.get("n_prefix", 0))
            qt = h.get("question_template")
            stop = tuple(x for x in h.get("stop") or () if isinstance(x, str))
            self._format = PromptFormat("", qt, stop) if isinstance(qt, str) else None
            self._settings = dict(h.get("compression") or {})
        self.stats = Stats(method=str(self._settings.get("method", "?")), context_tokens=n_tok,
                           kv_cells_before=n_tok, kv_cells_after=cells,
                           kv_bytes_before=int(h.get("full_kv_bytes", 0)), kv_bytes_after=int(h.get("kv_bytes", 0)))
        return self.stats

    def save(self, path: str | os.PathLike) -> int:
        """Write the current context to `path` (persist's format); returns its size in bytes."""
        self.snapshot().write(path)
        return Path(path).stat().st_size

    def load(self, path: str | os.PathLike) -> Stats:
        """Load a context saved by `save` (same model, build and cache types)."""
        return self.restore_context(persist.read(path))

    def begin(self, tokens: Sequence[int]):
        """A fresh sequence of raw tokens with the full cache and no saved
        context (a prompt too short to compress); continue with generate()."""
        self._check_room(len(tokens) + 1)
        self._reset()
        self._context_len = self._cells = 0
        self._tokens, self._format, self._settings = [], None, {}
        self._eval(list(tokens))

    def feed(self, tokens: Sequence[int]):
        """Evaluate tokens after the current sequence (a prompt's tail before
        `generate()`)."""
        self._check_room(self._live + len(tokens) + 1)
        self._eval(list(tokens))

    def close(self):
        with contextlib.suppress(Exception):
            self.llm.close()
