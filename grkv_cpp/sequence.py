"""The model's one llama.cpp sequence: decoding at the next positions, the
cells it holds, the room left, full prefills with query capture, and putting
the previous context back when a compression fails."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import llama_cpp.llama_cpp as L

from . import kvstate
from .capture import QUERIES
from .errors import GrkvError


class CacheSequence:
    """The sequence's positions and cells (a mixin of CompressedLlama)."""

    @property
    def ctx(self):
        return self.llm._ctx.ctx

    @property
    def n_ctx(self) -> int:
        return self.llm.n_ctx()

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

    def kv_cache_sizes(self) -> list[int]:
        """Cells llama.cpp allocated per cache: n_ctx, and for an iSWA model
        its sliding-window cache (n_ctx with swa_full, else the window plus
        a micro-batch, padded to 256 as llama.cpp does)."""
        n = L.llama_n_ctx(self.ctx)
        if not self.info.iswa:
            return [n]
        swa = n if self.swa_full else min(n, -(-(self.info.n_swa + self.llm.context_params.n_ubatch) // 256) * 256)
        return [n, swa]

    def _memory_stats(self, per_cell: list[int], fp):
        self.stats.kv_buffer_bytes = kvstate.kv_buffer_bytes(per_cell, self.kv_cache_sizes())
        self.stats.kv_footprint, self.stats.kv_peak = fp.footprint, fp.peak
        self.stats.peak_rss_bytes = kvstate.peak_rss_bytes()
