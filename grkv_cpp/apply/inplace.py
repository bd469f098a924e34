from __future__ import annotations

import contextlib
import ctypes
import functools
import os

import llama_cpp.llama_cpp as L
import numpy as np

from .. import _native
from ..errors import BadRequestError, CompressionError, NativeError
from .base import Backend

_NO_PART = -2  # inplace_read's rows_of that matches no part: cells and sizes only
_FUNCS = ("version", "n_parts", "get_part", "get_layer", "seq_cells", "read", "seq_apply", "seq_gather")


@functools.lru_cache(maxsize=1)
def _api():
    lib = L._lib
    try:
        fns = {f: ctypes.cast(getattr(lib, f"llama_kv_ext_{f}"), ctypes.c_void_p).value for f in _FUNCS}
    except AttributeError:
        return None
    return _native.KvExtApi(fns)


def patched_library() -> bool:
    """Whether the loaded libllama carries grkv-cpp's KV-cache extension."""
    return _api() is not None


def _addr(ctx) -> int:
    return ctypes.cast(ctx, ctypes.c_void_p).value


class InplaceBackend(Backend):
    """The patched llama.cpp: cells are read and rewritten where they live
    (llama_kv_ext_read / llama_kv_ext_seq_apply); the library checks the whole
    layout before its first write."""

    name = "inplace"

    def __init__(self, gather: bool | str | None = None):
        # gather: True (the library copies a host-memory cache on the host and
        # runs a ggml graph elsewhere), "graph" (the graph everywhere), False
        # (host rows through seq_apply). Default: GRKV_GATHER=1|graph|0, else True.
        if gather is None:
            env = os.environ.get("GRKV_GATHER", "1").strip().lower()
            gather = "graph" if env == "graph" else env != "0"
        if gather not in (True, False, "graph"):
            raise BadRequestError(f"gather must be True, False or 'graph', not {gather!r}")
        self.gathers = bool(gather)
        self.gather_graph = gather == "graph"

    def read(self, ctx, part: int | None = 0, rows: bool = True) -> _native.SeqState:
        """The rows of cache part `part` only (the compressed one; the others
        bring their cells and row sizes, for the byte counts), or of every
        part with part=None, or of none with rows=False."""
        rows_of = (-1 if part is None else part) if rows else _NO_PART
        try:
            return _native.inplace_read(_api(), _addr(ctx), rows_of=rows_of)
        except NativeError as e:
            raise CompressionError(str(e)) from e

    def snapshot(self, state: _native.SeqState):
        # Nothing to keep: every check runs before the single write
        # (compress_cache's in Python, llama_kv_ext_seq_apply's in the library,
        # which refuses a bad layout before touching a cell), so a failure
        # leaves the cache as it was without a copy of 2x its size.
        return None

    def write(self, ctx, state: _native.SeqState, part: int = 0):
        try:
            _native.inplace_apply(_api(), _addr(ctx), state, part)
        except NativeError as e:
            raise CompressionError(f"llama.cpp rejected the compressed layout: {e}") from e

    def gather(self, ctx, keep, positions, part: int = 0) -> bool:
        """llama_kv_ext_seq_gather: the kept rows are gathered where the cache
        lives (a ggml graph on its device, the library's own copies in host
        memory); only the indices cross."""
        if not self.gathers:
            return False
        try:
            return _native.inplace_gather(_api(), _addr(ctx), part, np.ascontiguousarray(keep, np.int32),
                                          np.ascontiguousarray(positions, np.int32), graph=self.gather_graph)
        except NativeError as e:
            raise CompressionError(f"llama.cpp rejected the compressed layout: {e}") from e

    @contextlib.contextmanager
    def rollback(self, ctx, snapshot=None, part: int = 0):
        """With a snapshot (a SeqState), put its part back on failure; without
        one there is nothing to undo (see snapshot())."""
        try:
            yield
        except BaseException:
            if snapshot is not None:
                try:
                    self.write(ctx, snapshot, part)
                except CompressionError as e:
                    raise CompressionError("compression failed and the original KV state could not be "
                                           "restored") from e
            raise
