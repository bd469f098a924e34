"""Saved contexts: the current context as a SavedContext (persist.py's file
format) and back, refused when it was made by another model, build or cache
layout."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import kvstate, persist
from .errors import GrkvError
from .prompt import PromptFormat
from .stats import Stats


class SavedContexts:
    """snapshot / restore_context / save / load (a mixin of CompressedLlama)."""

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
