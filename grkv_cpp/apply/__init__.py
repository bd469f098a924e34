"""Apply backends: how a compressed layout gets back into llama.cpp.

Both read the sequence into the same ``_native.SeqState`` (the view every
method scores) and write a compressed one back, so the math and the plan are
the same whichever runs:

* ``inplace``: the patched llama.cpp (``native/llama_patch``) reads and
  rewrites the cache's cells through ``llama_kv_ext_*``; no state blob.
* ``blob``: ``llama_state_seq_get/set_data`` on any llama-cpp-python build,
  including a user's own CUDA or Metal build without the patch.

``GRKV_APPLY=blob|inplace`` forces one; by default the in-place backend runs
wherever the loaded libllama has the extension."""

from __future__ import annotations

import os

from ..errors import BadRequestError
from .base import Backend
from .blob import BlobBackend
from .inplace import InplaceBackend, patched_library

__all__ = ["Backend", "BlobBackend", "InplaceBackend", "backend", "patched_library"]

_CHOICES = ("auto", "blob", "inplace")


def backend(name: str | Backend | None = None) -> Backend:
    """The backend called `name` (or GRKV_APPLY, or the best available); a
    Backend given is returned as it is."""
    if isinstance(name, Backend):
        return name
    name = (name or os.environ.get("GRKV_APPLY") or "auto").lower()
    if name not in _CHOICES:
        raise BadRequestError(f"apply backend must be one of {', '.join(_CHOICES)}, not {name!r}")
    if name == "blob" or (name == "auto" and not patched_library()):
        return BlobBackend()
    if not patched_library():
        raise BadRequestError("the in-place backend needs the patched llama.cpp (see README, 'The patched build'); "
                              "the loaded libllama has no llama_kv_ext_* functions")
    return InplaceBackend()
