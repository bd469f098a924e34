"""Fuzz the context-file parser (grkv_cpp.persist.from_bytes) with atheris:
any input must parse or raise ContextFileError. The checksum stops most
mutations at the door, so half the inputs get a valid checksum appended
to reach the header, token and blob checks behind it. Seeds:
tests/fuzz_corpus/context.

    python scripts/fuzz_context_file.py tests/fuzz_corpus/context -atheris_runs=100000
"""

import hashlib
import sys

import atheris

import fuzz_native  # noqa: F401  (GRKV_NATIVE_SO: a sanitizer build of the native module)

with atheris.instrument_imports():
    from grkv_cpp import persist


def one(data: bytes):
    if data and data[-1] & 1:
        data = data + hashlib.sha256(data).digest()
    try:
        persist.from_bytes(data)
    except persist.ContextFileError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
