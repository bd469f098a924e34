from __future__ import annotations

import contextlib

from .. import _native, kvstate
from ..errors import CompressionError
from .base import Backend


class BlobBackend(Backend):
    """Stock llama-cpp-python: the whole sequence goes through a state blob
    (llama_state_seq_get_data / set_data), host copies both ways."""

    name = "blob"

    def read(self, ctx) -> _native.SeqState:
        return kvstate.parse(kvstate.get_blob(ctx))

    def write(self, ctx, state: _native.SeqState, part: int = 0):
        if not kvstate.set_blob(ctx, state.serialize()):
            raise CompressionError("llama.cpp rejected the compressed state")

    @contextlib.contextmanager
    def rollback(self, ctx, original: _native.SeqState, part: int = 0):
        blob = original.serialize()
        with kvstate.Rollback(ctx, blob):
            yield
