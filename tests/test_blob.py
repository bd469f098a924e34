"""State blob codec and rollback, on the tiny model (seconds)."""

import numpy as np
import pytest

from grkv_cpp import kvstate
from grkv_cpp._native import SeqState
from grkv_cpp.compressor import compress_cache
from grkv_cpp.errors import CompressionError, NativeError, UnsupportedModelError
from grkv_cpp.llm import CompressedLlama
from grkv_cpp.methods import KNorm, SnapKV


def filled(tiny_gguf, n=200, **kw):
    m = CompressedLlama(tiny_gguf, n_ctx=512, **kw)
    toks = list(np.random.default_rng(0).integers(3, 300, n))
    m._prefill(toks, 32)
    return m, toks


CONFIGS = [dict(flash_attn=False), dict(flash_attn=True), dict(type_k="f32", type_v="f32"),
           dict(type_k="bf16", type_v="bf16", flash_attn=True)]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_parse_rebuild_is_byte_identical(tiny_gguf, cfg):
    m, toks = filled(tiny_gguf, **cfg)
    blob = kvstate.get_blob(m.ctx)
    st = SeqState(blob)
    assert st.serialize() == blob
    info = st.part_info(0)
    assert info["n_cells"] == len(toks)
    assert info["v_trans"] == (not cfg.get("flash_attn", False))
    assert info["n_layer"] == 3
    # llama.cpp takes the blob back and writes out the same bytes
    assert kvstate.set_blob(m.ctx, blob)
    assert kvstate.get_blob(m.ctx) == blob


def test_truncated_and_corrupted_blobs_are_rejected(tiny_gguf):
    m, _ = filled(tiny_gguf)
    blob = kvstate.get_blob(m.ctx)
    for cut in [0, 3, 7, 8, 12, 100, len(blob) // 2, len(blob) - 1]:
        with pytest.raises(NativeError, match="truncated|no memory part"):
            SeqState(blob[:cut])
    bad_magic = b"\x00\x00\x00\x00" + blob[4:]
    with pytest.raises(NativeError, match="magic"):
        SeqState(bad_magic)
    # n_stream of the first part set to an absurd value
    bad = bytearray(blob)
    bad[8:12] = (100000).to_bytes(4, "little")
    with pytest.raises(NativeError, match="n_stream"):
        SeqState(bytes(bad))
    # a plausible cell count the blob cannot hold is refused before anything is allocated for it
    # (the parser fuzz under ASan found 2 GB going to one such header)
    bad = bytearray(blob)
    bad[12:16] = ((1 << 26) - 1).to_bytes(4, "little")
    with pytest.raises(NativeError, match="needs more bytes than the blob has left"):
        SeqState(bytes(bad))
    # trailing garbage is a truncated extra part
    with pytest.raises(NativeError):
        SeqState(blob + b"\x01\x00\x00\x00\xff")


def test_failed_apply_rolls_back_and_context_stays_usable(tiny_gguf, monkeypatch):
    m, toks = filled(tiny_gguf)
    before = kvstate.get_blob(m.ctx)
    # budget below SnapKV's window: refused before anything is written
    with pytest.raises(CompressionError, match="smaller than"):
        compress_cache(m.ctx, m.info, SnapKV(), budget=10, capture=m.capture)
    assert kvstate.get_blob(m.ctx) == before
    # llama.cpp rejecting the new state (which wipes the sequence) is rolled back too
    def rejecting(ctx, blob, _orig=kvstate.set_blob):
        if blob == before:
            return _orig(ctx, blob)
        kvstate.remove_from(ctx, 0)  # as llama.cpp does when it rejects a state: the sequence is gone
        return False

    monkeypatch.setattr(kvstate, "set_blob", rejecting)
    with pytest.raises(CompressionError, match="rejected"):
        compress_cache(m.ctx, m.info, KNorm(), ratio=0.5, backend="blob")
    monkeypatch.undo()
    assert kvstate.get_blob(m.ctx) == before
    assert kvstate.pos_range(m.ctx) == (0, len(toks) - 1)
    m.llm.eval([5, 6, 7])  # still decodes at the next position
    assert kvstate.pos_range(m.ctx)[1] == len(toks) + 2


def test_compress_keeps_budget_and_positions(tiny_gguf):
    m, toks = filled(tiny_gguf)
    res = compress_cache(m.ctx, m.info, SnapKV(), budget=64, capture=m.capture)
    assert res.cells_after == 64 and res.keep.shape == (3, 2, 64)
    assert kvstate.pos_range(m.ctx) == (len(toks) - 64, len(toks) - 1)
    st = SeqState(kvstate.get_blob(m.ctx))
    assert st.part_info(0)["n_cells"] == 64
    m.llm.eval([5])  # decoding continues at n_past
    assert kvstate.pos_range(m.ctx)[1] == len(toks)


def test_unsupported_cache_type_is_named(tiny_gguf):
    with pytest.raises(UnsupportedModelError, match="q5_0.*f16, bf16, f32, q8_0 and q4_0"):
        CompressedLlama(tiny_gguf, n_ctx=256, type_k="q5_0")
