"""The two apply backends give the same cache: the in-place one (the patched
llama.cpp's llama_kv_ext_*) and the state blob. Skipped unless the loaded
libllama is the patched build (LLAMA_CPP_LIB_PATH, see README)."""

import numpy as np
import pytest

from grkv_cpp import CompressedLlama, _native, kvstate
from grkv_cpp.apply import BlobBackend, InplaceBackend, backend, patched_library
from grkv_cpp.errors import BadRequestError, CompressionError, NativeError
from grkv_cpp.hook import DecodeHook
from grkv_cpp.methods.context import ALL_QUERIES
from grkv_cpp.texts import haystack, passkey_needle

pytestmark = pytest.mark.skipif(not patched_library(), reason="needs the patched llama.cpp (LLAMA_CPP_LIB_PATH)")

CONTEXT = "abc def ghi jkl mno pqr " * 25
PROBE = [5, 9, 13, 21]


def _compress_both(m, context, monkeypatch, **kw):
    """The same prefill compressed by each backend: (blob, logits) per backend."""
    st = m.prefill_state(context, window=ALL_QUERIES)
    out = {}
    for name in ("blob", "inplace"):
        monkeypatch.setenv("GRKV_APPLY", name)
        stats = m.compress_state(st, **kw)
        assert stats.apply_backend == name
        out[name] = (kvstate.get_blob(m.ctx), m.continuation_logits(PROBE))
    return out


@pytest.mark.parametrize("flash", [False, True])
@pytest.mark.parametrize("kw", [dict(method="snapkv", ratio=0.5), dict(method="knorm", ratio=0.3, shared=True),
                                dict(method="snapkv+grkv", ratio=0.5), dict(method="compactor", ratio=0.4),
                                dict(method="compactor-adakv", ratio=0.5)])
def test_backends_give_identical_caches(tiny_gguf, monkeypatch, flash, kw):
    m = CompressedLlama(tiny_gguf, n_ctx=1024, flash_attn=flash)
    out = _compress_both(m, CONTEXT, monkeypatch, **kw)
    assert out["inplace"][0] == out["blob"][0]
    np.testing.assert_array_equal(out["inplace"][1], out["blob"][1])


def test_f32_cache(tiny_gguf, monkeypatch):
    m = CompressedLlama(tiny_gguf, n_ctx=1024, type_k="f32", type_v="f32")
    out = _compress_both(m, CONTEXT, monkeypatch, method="snapkv", ratio=0.5)
    assert out["inplace"][0] == out["blob"][0]
    np.testing.assert_array_equal(out["inplace"][1], out["blob"][1])


def test_read_equals_the_parsed_blob(tiny_gguf):
    m = CompressedLlama(tiny_gguf, n_ctx=1024)
    m.prefill(CONTEXT)
    via_blob = BlobBackend().read(m.ctx)
    in_place = InplaceBackend().read(m.ctx, part=None)
    assert in_place.serialize() == via_blob.serialize()


@pytest.mark.slow
def test_sliding_window_part_reads_as_the_blob(gemma3_gguf, monkeypatch):
    """Gemma-3's SWA cache (swa_full: every cell stays allocated) holds cells
    that slid out of the window; llama.cpp reuses them and the blob leaves
    them out, and so does the in-place read: the same cells, bytes and
    kv_bytes from either backend, before and after a compression."""
    m = CompressedLlama(gemma3_gguf, n_ctx=2048)
    # a real prefill, not a restored blob: only decoding leaves slid-out cells resident
    m.prefill(haystack(60, [(0.4, passkey_needle(73914))]))
    assert m.stats.context_tokens > 2 * m.info.n_swa
    via_blob = BlobBackend().read(m.ctx)
    in_place = InplaceBackend().read(m.ctx, part=None)
    assert in_place.part_info(1)["n_cells"] == via_blob.part_info(1)["n_cells"] < m.stats.context_tokens
    assert in_place.serialize() == via_blob.serialize()
    st = m.prefill_state(haystack(60, [(0.4, passkey_needle(73914))]), window=ALL_QUERIES)
    after = {}
    for name in ("blob", "inplace"):
        monkeypatch.setenv("GRKV_APPLY", name)
        s = m.compress_state(st, method="compactor", ratio=0.5)
        after[name] = (s.kv_bytes_before, s.kv_bytes_after)
    assert after["inplace"] == after["blob"]
    assert after["blob"][1] < after["blob"][0]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_real_models(which, request, monkeypatch):
    path = request.getfixturevalue(f"{which}_gguf")
    m = CompressedLlama(path, n_ctx=2048)
    ctx = haystack(30, [(0.4, passkey_needle(73914))])
    for kw in (dict(method="snapkv", ratio=0.5), dict(method="compactor", ratio=0.5)):
        out = _compress_both(m, ctx, monkeypatch, **kw)
        assert out["inplace"][0] == out["blob"][0]  # Gemma-3: its SWA cache is untouched by both
        np.testing.assert_array_equal(out["inplace"][1], out["blob"][1])


def test_refused_layout_leaves_the_cache(tiny_gguf):
    m = CompressedLlama(tiny_gguf, n_ctx=1024)
    m.prefill(CONTEXT)
    before = kvstate.get_blob(m.ctx)
    be = InplaceBackend()
    st = be.read(m.ctx)
    bad = _native.SeqState(kvstate.get_blob(m.ctx))
    # positions must rise: a state whose cells repeat a position is refused before any write
    blob = bytearray(bad.serialize())
    first_pos = 4 + 4 + 4 + 4  # magic, seq, n_stream, cell_count
    second_pos = first_pos + 4 + 4 + 4  # pos, n_seq, seq of cell 0
    blob[second_pos:second_pos + 4] = blob[first_pos:first_pos + 4]
    with pytest.raises(CompressionError, match="seq_apply failed with code -5"):
        be.write(m.ctx, _native.SeqState(bytes(blob)))
    assert kvstate.get_blob(m.ctx) == before
    with pytest.raises(CompressionError):  # a failure inside the rollback puts the original back
        with be.rollback(m.ctx, st):
            be.write(m.ctx, _native.SeqState(kvstate.get_blob(m.ctx)))  # fine
            raise CompressionError("later step failed")
    assert kvstate.get_blob(m.ctx) == before


def test_backend_choice(monkeypatch):
    assert backend().name == "inplace"
    assert backend("blob").name == "blob"
    monkeypatch.setenv("GRKV_APPLY", "blob")
    assert backend().name == "blob"
    with pytest.raises(BadRequestError):
        backend("gpu")




def test_hook_fires_once_per_batch_with_the_positions(tiny_gguf):
    m = CompressedLlama(tiny_gguf, n_ctx=1024, n_batch=64)
    calls = []
    m._reset()
    with DecodeHook(m.ctx, lambda seq, p0, p1: calls.append((seq, p0, p1))):
        m._eval(list(range(1, 201)))  # 200 tokens in batches of 64
    assert calls == [(0, 0, 63), (0, 0, 127), (0, 0, 191), (0, 0, 199)]
    m._eval([5])
    assert len(calls) == 4  # removed


def test_eval_callback_only_while_capturing(tiny_gguf):
    """The patched build creates the context without an eval callback and
    installs the capture's only inside enabled(): captures still work."""
    m = CompressedLlama(tiny_gguf, n_ctx=1024)
    assert m.capture._ctx is not None
    m.prefill_state(CONTEXT, window=16)
    m.capture.set_targets([("Qcur", "ROPE", 2)])
    m._eval([7, 8, 9])  # not capturing: nothing recorded
    with pytest.raises(NativeError, match="nothing captured"):
        m.capture.rows(0, m.info.cache_layers[0])
    with m.capture.enabled():
        m._eval([10, 11])
    assert all(len(m.capture.rows(0, il)) == 2 for il in m.info.cache_layers)


BUDGET_CTX = "abc def ghi jkl mno pqr " * 200


@pytest.mark.parametrize("method", ["knorm", "streaming", "snapkv", "snapkv+grkv"])
def test_budgeted_prefill_through_the_hook(tiny_gguf, method):
    """The hook (compressing from inside llama_decode) and the loop (between
    decodes) give the same trace and kept positions; byte-identical caches
    where both decode each chunk in one batch (no query window)."""
    m = CompressedLlama(tiny_gguf, n_ctx=512, n_batch=128)
    loop = m.compress_budgeted(BUDGET_CTX, budget=200, chunk=128, method=method)
    blob_loop, trace_loop = kvstate.get_blob(m.ctx), list(m.budget_trace)
    hooked = m.compress_budgeted(BUDGET_CTX, budget=200, chunk=128, method=method, driver="hook")
    blob_hook = kvstate.get_blob(m.ctx)
    assert list(m.budget_trace) == trace_loop and hooked.compressions == loop.compressions > 3
    assert max(m.budget_trace) <= 200 and hooked.kv_cells_after == 200
    a, b = _native.SeqState(blob_loop), _native.SeqState(blob_hook)
    assert list(a.positions(0)) == list(b.positions(0))
    if method in ("knorm", "streaming"):
        assert blob_hook == blob_loop
    with pytest.raises(BadRequestError, match="n_batch"):
        m.compress_budgeted(BUDGET_CTX, budget=200, chunk=256, method=method, driver="hook")
