"""Fuzz the state-blob parser (native SeqState) with atheris: any input must
parse or raise NativeError, never crash. Seeds: tests/fuzz_corpus/blob.

Half the inputs go to the parser as they are; the other half are recipes
applied to a real seed blob (overwrite a few bytes or 32-bit fields with
values such as 0, -1 or 2^31, truncate or extend), so that inputs get past
the header into the cell, layer and row checks even where coverage feedback
is unavailable (the ASan build: README, "Fuzzing"). At exit it prints how
inputs ended: parsed, or which check refused them.

    python scripts/fuzz_blob.py tests/fuzz_corpus/blob -atheris_runs=100000
"""

import atexit
import collections
import hashlib
import random
import re
import struct
import sys
from pathlib import Path

import atheris

import fuzz_native  # noqa: F401  (GRKV_NATIVE_SO: a sanitizer build of the native module)

with atheris.instrument_imports():
    from grkv_cpp import _native
    from grkv_cpp.errors import NativeError

SEEDS = [p.read_bytes() for p in sorted((Path(__file__).parent.parent / "tests/fuzz_corpus/blob").glob("*.bin"))]
FIELDS = (0, 1, 2, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFF, 31, 32, 64)
OUTCOMES = collections.Counter()


def mutate(data: bytes) -> bytes:
    """A recipe drawn from a generator seeded by the input: deterministic per
    input, and spread over the whole blob however short the input is."""
    rng = random.Random(hashlib.sha256(data).digest())
    blob = bytearray(rng.choice(SEEDS))
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(4, len(blob) - 4)  # past the magic, which the first check guards alone
        kind = rng.randrange(3)
        if kind == 0:
            blob[at] = rng.randrange(256)
        elif kind == 1:
            blob[at:at + 4] = struct.pack("<I", rng.choice(FIELDS))
        else:
            blob[at:at + 4] = struct.pack("<I", rng.getrandbits(32))
    cut = rng.randrange(4)
    if cut == 1:
        del blob[rng.randrange(len(blob)):]
    elif cut == 2:
        blob += data[:64]
    return bytes(blob)


def one(data: bytes):
    if data and data[0] & 1 and SEEDS:
        data = mutate(data)
    try:
        st = _native.SeqState(data)
    except NativeError as e:
        OUTCOMES[re.sub(r"\d+", "N", str(e))[:60]] += 1
        if sum(OUTCOMES.values()) % 25000 == 0:
            report()
        return
    OUTCOMES["parsed"] += 1
    if sum(OUTCOMES.values()) % 25000 == 0:  # libFuzzer may exit without running atexit
        report()
    for p in range(st.n_parts):  # a blob that parses must describe itself consistently
        info = st.part_info(p)
        assert info["n_cells"] >= 0 and info["bytes_per_cell"] >= 0
    assert st.serialize() == data  # and rebuilds byte for byte


def report():
    total = sum(OUTCOMES.values())
    print(f"\n{total} inputs: " + "; ".join(f"{n} {what}" for what, n in OUTCOMES.most_common(12)), file=sys.stderr)


if __name__ == "__main__":
    atexit.register(report)
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
