from __future__ import annotations

import contextlib

from .. import _native


class Backend:
    """Reads sequence 0's cache into a SeqState and writes one back."""

    name = "base"

    def read(self, ctx) -> _native.SeqState:
        raise NotImplementedError

    def snapshot(self, state: _native.SeqState):
        """What rollback() needs to put the state just read back."""
        raise NotImplementedError

    def write(self, ctx, state: _native.SeqState, part: int = 0):
        """Replace the cells of cache part `part` with the state's. Raises
        CompressionError when llama.cpp refuses (the cache is then unchanged)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def rollback(self, ctx, snapshot, part: int = 0):
        """On an exception inside, put the snapshot's part back."""
        raise NotImplementedError
        yield
