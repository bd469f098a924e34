"""Compressed contexts on disk: a versioned, checksummed file holding one
sequence's compressed KV cache and what is needed to trust it again.

Layout (little-endian)::

    magic      8 bytes   b"GRKVCTX\\0"
    version    u32       FORMAT_VERSION
    hlen       u32       length of the header
    header     hlen      UTF-8 JSON: model identity, llama.cpp build, cache
                         types, method and parameters, token count, layout
    ntok       u32       number of context tokens
    tokens     4*ntok    the context's token ids (u32): prefix matching
    blen       u64       length of the blob
    blob       blen      llama_state_seq_get_data of the compressed sequence
    sha256     32 bytes  over everything before it

The blob is llama.cpp's own sequence state, so a file loads only into the
build and cache types that wrote it; the header says which, and `check`
refuses a mismatch before llama.cpp sees a byte."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

from .errors import GrkvError

MAGIC = b"GRKVCTX\0"
FORMAT_VERSION = 1
LLAMA_CPP_COMMIT = "0c1e57098"  # vendored by llama-cpp-python 0.3.36; the blob layout is this commit's
_IDENTITY_BYTES = 64 << 20
_MAX_HEADER = 16 << 20
_MAX_TOKENS = 1 << 26


class ContextFileError(GrkvError):
    """A context file that is not one, is damaged, or belongs to another model or build."""


@dataclasses.dataclass
class SavedContext:
    """One compressed context: header (JSON-able), token ids, state blob."""

    header: dict
    tokens: np.ndarray  # uint32
    blob: bytes

    @property
    def nbytes(self) -> int:
        return len(self.blob) + self.tokens.nbytes

    def to_bytes(self) -> bytes:
        head = json.dumps(self.header, sort_keys=True).encode()
        toks = np.ascontiguousarray(self.tokens, dtype="<u4")
        body = b"".join([MAGIC, struct.pack("<II", FORMAT_VERSION, len(head)), head,
                         struct.pack("<I", len(toks)), toks.tobytes(),
                         struct.pack("<Q", len(self.blob)), self.blob])
        return body + hashlib.sha256(body).digest()

    def write(self, path: str | os.PathLike):
        """Write atomically: a crash leaves the old file or none, never half of one."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_bytes(self.to_bytes())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def from_bytes(data: bytes) -> SavedContext:
    """Parse a context file's bytes; any defect raises ContextFileError."""
    if len(data) < len(MAGIC) + 8 or data[: len(MAGIC)] != MAGIC:
        raise ContextFileError("not a grkv-cpp context file (bad magic)")
    version, hlen = struct.unpack_from("<II", data, len(MAGIC))
    if version != FORMAT_VERSION:
        raise ContextFileError(f"context file format version {version}; this grkv-cpp reads version "
                               f"{FORMAT_VERSION} (compress the context again)")
    if len(data) < 32:
        raise ContextFileError("truncated context file")
    body, digest = data[:-32], data[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise ContextFileError("context file is corrupt or truncated (checksum mismatch)")
    off = len(MAGIC) + 8
    if hlen > _MAX_HEADER or off + hlen + 4 > len(body):
        raise ContextFileError("context file header is truncated")
    try:
        header = json.loads(body[off: off + hlen].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ContextFileError(f"context file header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ContextFileError("context file header is not a JSON object")
    off += hlen
    (ntok,) = struct.unpack_from("<I", body, off)
    off += 4
    if ntok > _MAX_TOKENS or off + 4 * ntok + 8 > len(body):
        raise ContextFileError("context file token list is truncated")
    tokens = np.frombuffer(body, dtype="<u4", count=ntok, offset=off).astype(np.uint32)
    off += 4 * ntok
    (blen,) = struct.unpack_from("<Q", body, off)
    off += 8
    if off + blen != len(body):
        raise ContextFileError("context file state blob has the wrong length")
    return SavedContext(header, tokens, bytes(body[off:]))


def read(path: str | os.PathLike) -> SavedContext:
    path = Path(path)
    if not path.is_file():
        raise ContextFileError(f"context file not found: {path}")
    return from_bytes(path.read_bytes())


def model_identity(model_path: str | os.PathLike) -> str:
    """sha256 over the GGUF's size and its first 64 MiB: the whole header
    (metadata, tensor names, shapes, types, offsets) and the first tensors.
    Reading gguf's full metadata takes seconds for a 262K-token vocabulary;
    this takes milliseconds and changes whenever the model does."""
    path = Path(model_path)
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_IDENTITY_BYTES))
    return h.hexdigest()


# header fields that must equal the loading model's for its blob to mean the same
COMPATIBLE = ("model_sha256", "llama_cpp", "type_k", "type_v", "flash_attn")


def check(header: dict, expected: dict):
    """Refuse a context written by another model, build or cache layout."""
    for key in COMPATIBLE:
        if header.get(key) != expected.get(key):
            what = {"model_sha256": "another model", "llama_cpp": "another llama.cpp build",
                    "type_k": "another K cache type", "type_v": "another V cache type",
                    "flash_attn": "a context with flash attention set differently"}[key]
            raise ContextFileError(f"this context was saved by {what} ({key}: file {header.get(key)!r}, "
                                   f"loaded {expected.get(key)!r}); compress it again with this one")
