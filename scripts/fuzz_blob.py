"""Fuzz the state-blob parser (native SeqState) with atheris: any input must
parse or raise NativeError, never crash. Seeds: tests/fuzz_corpus/blob.

    python scripts/fuzz_blob.py tests/fuzz_corpus/blob -atheris_runs=100000
"""

import sys

import atheris

import fuzz_native  # noqa: F401  (GRKV_NATIVE_SO: a sanitizer build of the native module)

with atheris.instrument_imports():
    from grkv_cpp import _native
    from grkv_cpp.errors import NativeError


def one(data: bytes):
    try:
        st = _native.SeqState(data)
    except NativeError:
        return
    for p in range(st.n_parts):  # a blob that parses must describe itself consistently
        info = st.part_info(p)
        assert info["n_cells"] >= 0 and info["bytes_per_cell"] >= 0


if __name__ == "__main__":
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
