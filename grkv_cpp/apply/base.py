from __future__ import annotations

import abc
import contextlib

from .. import _native


class Backend(abc.ABC):
    """Reads sequence 0's cache into a SeqState and writes one back."""

    name = "base"

    @abc.abstractmethod
    def read(self, ctx) -> _native.SeqState:
        """The sequence's cells, as the state blob's parser gives them."""

    @abc.abstractmethod
    def snapshot(self, state: _native.SeqState):
        """What rollback() needs to put the state just read back."""

    @abc.abstractmethod
    def write(self, ctx, state: _native.SeqState, part: int = 0):
        """Replace the cells of cache part `part` with the state's. Raises
        CompressionError when llama.cpp refuses (the cache is then unchanged)."""

    @abc.abstractmethod
    def rollback(self, ctx, snapshot, part: int = 0) -> contextlib.AbstractContextManager:
        """A context manager: on an exception inside, put the snapshot's part back."""
