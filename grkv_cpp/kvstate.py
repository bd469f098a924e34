"""The sequence's KV cache as a state blob: read, write back, roll back.

This is the "blob" apply backend: it works with any llama-cpp-python build
(CPU or GPU), at the cost of copying the sequence through host memory."""

from __future__ import annotations

import ctypes

import llama_cpp.llama_cpp as L

from . import _native
from .errors import CompressionError

SEQ = 0  # grkv-cpp drives one sequence per context


def get_blob(ctx) -> bytes:
    n = L.llama_state_seq_get_size(ctx, SEQ)
    buf = (ctypes.c_uint8 * n)()
    written = L.llama_state_seq_get_data(ctx, buf, n, SEQ)
    if written == 0:
        raise CompressionError("llama_state_seq_get_data returned nothing")
    return bytes(memoryview(buf)[:written])


def set_blob(ctx, blob: bytes) -> bool:
    buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
    return L.llama_state_seq_set_data(ctx, buf, len(blob), SEQ) > 0


def pos_range(ctx) -> tuple[int, int]:
    mem = L.llama_get_memory(ctx)
    return L.llama_memory_seq_pos_min(mem, SEQ), L.llama_memory_seq_pos_max(mem, SEQ)


def remove_from(ctx, pos: int):
    """Drop every cell at position >= pos (an answer's KV after a question)."""
    L.llama_memory_seq_rm(L.llama_get_memory(ctx), SEQ, pos, -1)


def parse(blob: bytes) -> _native.SeqState:
    return _native.SeqState(blob)


def kv_bytes(state: _native.SeqState) -> int:
    """K and V bytes held by the sequence over all cache parts."""
    total = 0
    for p in range(state.n_parts):
        info = state.part_info(p)
        total += info["n_cells"] * info["bytes_per_cell"]
    return total


def bytes_per_cell(state: _native.SeqState) -> list[int]:
    """K and V bytes one cell takes, per cache part."""
    return [state.part_info(p)["bytes_per_cell"] for p in range(state.n_parts)]


def kv_buffer_bytes(per_cell: list[int], sizes: list[int]) -> int:
    """Bytes of the K/V buffers allocated: `sizes[p]` cells of cache part p."""
    if len(sizes) != len(per_cell):
        raise ValueError(f"{len(per_cell)} cache parts but {len(sizes)} sizes")
    return sum(n * b for n, b in zip(sizes, per_cell))


def peak_rss_bytes() -> int:
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class Rollback:
    """Keeps the original blob; restores it if the body raises."""

    def __init__(self, ctx, original: bytes):
        self.ctx = ctx
        self.original = original

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            if not set_blob(self.ctx, self.original):
                raise CompressionError("compression failed and the original KV state could not be restored") from exc
        return False
