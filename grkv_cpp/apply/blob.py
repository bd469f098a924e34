from __future__ import annotations

import contextlib

from .. import _native, kvstate
from ..errors import CompressionError
from .base import Backend


class BlobBackend(Backend):
    """Stock llama-cpp-python: the whole sequence goes through a state blob
    (llama_state_seq_get_data / set_data), host copies both ways."""

    name = "blob"

    def __init__(self):
        self._blob = b""

    def read(self, ctx, part: int | None = 0, rows: bool = True) -> _native.SeqState:
        # the blob always brings every row
        self._blob = kvstate.get_blob(ctx)
        return kvstate.parse(self._blob)

    def snapshot(self, state: _native.SeqState) -> bytes:
        return self._blob  # the blob just read is the original

    def write(self, ctx, state: _native.SeqState, part: int = 0):
        if not kvstate.set_blob(ctx, state.serialize()):
            raise CompressionError("llama.cpp rejected the compressed state")

    @contextlib.contextmanager
    def rollback(self, ctx, snapshot: bytes, part: int = 0):
        with kvstate.Rollback(ctx, snapshot):
            yield
