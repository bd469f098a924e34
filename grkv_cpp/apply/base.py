from __future__ import annotations

import abc
import contextlib

from .. import _native


class Backend(abc.ABC):
    """Reads sequence 0's cache into a SeqState and writes one back."""

    name = "base"
    gathers = False  # whether gather() can apply an eviction plan without host rows

    @abc.abstractmethod
    def read(self, ctx, part: int | None = 0, rows: bool = True) -> _native.SeqState:
        """The sequence's cells, as the state blob's parser gives them. A
        backend may leave out the K/V rows of parts other than `part` (None:
        every part), and of every part with rows=False (cells and sizes only)."""

    @abc.abstractmethod
    def snapshot(self, state: _native.SeqState):
        """What rollback() needs to put the state just read back."""

    @abc.abstractmethod
    def write(self, ctx, state: _native.SeqState, part: int = 0):
        """Replace the cells of cache part `part` with the state's. Raises
        CompressionError when llama.cpp refuses (the cache is then unchanged)."""

    def gather(self, ctx, keep, positions, part: int = 0) -> bool:
        """Apply an eviction plan (keep [n_layer, n_head_kv, n] position-order
        token indices, new positions [n]) by gathering the kept rows where
        the cache lives. False, the cache unchanged, where this backend or
        this cache cannot: then write() a rebuilt state."""
        return False

    @abc.abstractmethod
    def rollback(self, ctx, snapshot, part: int = 0) -> contextlib.AbstractContextManager:
        """A context manager: on an exception inside, put the snapshot's part back."""
