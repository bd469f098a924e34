"""The in-place backend's gather (llama_kv_ext_seq_gather): an eviction plan
applied by a ggml graph on the backend that holds the cache, with only the
indices crossing from the host. It must leave the same cache, byte for byte,
as writing the host-built rows (llama_kv_ext_seq_apply), for every layout and
cache type; refuse a bad plan before any write; and fall back to host rows
where a head slice cannot move as raw words. Skipped without the patched
build."""

import ctypes

import numpy as np
import pytest

from grkv_cpp import CompressedLlama, _native, kvstate
from grkv_cpp.apply import InplaceBackend, patched_library
from grkv_cpp.apply.inplace import _addr, _api
from grkv_cpp.compressor import compress_cache
from grkv_cpp.errors import CompressionError
from grkv_cpp.loader import quiet
from grkv_cpp.methods import KNorm
from grkv_cpp.methods.context import ALL_QUERIES
from tiny_model import TinySpec, write_tiny_model

pytestmark = pytest.mark.skipif(not patched_library(), reason="needs the patched llama.cpp (LLAMA_CPP_LIB_PATH)")

CONTEXT = "abc def ghi jkl mno pqr " * 25
PROBE = [5, 9, 13, 21]


def _gather_and_rows(m, monkeypatch, context=CONTEXT, **kw):
    """The same prefill compressed in place three ways: gathered by the
    library's host copy ("1", what a CPU cache gets), by its ggml graph on the
    CPU backend ("graph", what a GPU cache gets), and written as host rows ("0")."""
    st = m.prefill_state(context, window=ALL_QUERIES)
    out = {}
    monkeypatch.setenv("GRKV_APPLY", "inplace")
    for gather in ("1", "graph", "0"):
        monkeypatch.setenv("GRKV_GATHER", gather)
        stats = m.compress_state(st, **kw)
        out[gather] = (kvstate.get_blob(m.ctx), m.continuation_logits(PROBE), stats.merge_report["apply"]["write"])
    return out


@pytest.mark.parametrize("flash", [False, True])  # V transposed without flash attention
@pytest.mark.parametrize("kw", [dict(method="snapkv", ratio=0.5), dict(method="knorm", ratio=0.3, shared=True),
                                dict(method="streaming", ratio=0.4), dict(method="compactor", ratio=0.4),
                                dict(method="compactor-adakv", ratio=0.5), dict(method="laser", ratio=0.5)])
def test_gather_equals_host_rows(tiny_gguf, monkeypatch, flash, kw):
    m = CompressedLlama(tiny_gguf, n_ctx=1024, flash_attn=flash)
    out = _gather_and_rows(m, monkeypatch, **kw)
    assert (out["1"][2], out["graph"][2], out["0"][2]) == ("gather", "gather:graph", "rows")
    assert out["1"][0] == out["graph"][0] == out["0"][0]
    np.testing.assert_array_equal(out["1"][1], out["0"][1])
    np.testing.assert_array_equal(out["graph"][1], out["0"][1])


@pytest.mark.parametrize("types", [("f32", "f32"), ("bf16", "bf16")])
def test_gather_float_caches(tiny_gguf, monkeypatch, types):
    m = CompressedLlama(tiny_gguf, n_ctx=1024, type_k=types[0], type_v=types[1])  # V transposed: through f32
    out = _gather_and_rows(m, monkeypatch, method="snapkv", ratio=0.5)
    assert out["graph"][2] == "gather:graph"
    assert out["1"][0] == out["graph"][0] == out["0"][0]


@pytest.mark.parametrize("types", [("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "f16")])
def test_gather_quantised_caches(tmp_path, monkeypatch, types):
    """head_dim 64: two 32-value blocks per head slice (68 / 36 bytes), raw words."""
    path = write_tiny_model(tmp_path / "m.gguf", TinySpec("llama", n_embd=256, n_head=4, n_head_kv=2, n_ff=128))
    with quiet():
        m = CompressedLlama(path, n_ctx=1024, flash_attn=True, type_k=types[0], type_v=types[1])
    out = _gather_and_rows(m, monkeypatch, method="snapkv", ratio=0.4)
    assert out["graph"][2] == "gather:graph"
    assert out["1"][0] == out["graph"][0] == out["0"][0]


def test_head_slices_that_are_not_words_fall_back_to_rows(tmp_path, monkeypatch):
    """head_dim 32 on a q8_0 K cache: one 34-byte block per head slice, which
    cannot move as 4-byte words. The library refuses before touching the
    cache and the compressor writes host rows instead: the same cache."""
    path = write_tiny_model(tmp_path / "m.gguf", TinySpec("llama", n_embd=128, n_head=4, n_head_kv=2, n_ff=128))
    with quiet():
        m = CompressedLlama(path, n_ctx=1024, flash_attn=True, type_k="q8_0", type_v="f16")
    out = _gather_and_rows(m, monkeypatch, method="snapkv", ratio=0.5)
    assert out["1"][2] == out["graph"][2] == "rows"  # refused, then host rows
    assert out["1"][0] == out["graph"][0] == out["0"][0]
    m.prefill(CONTEXT)
    before = kvstate.get_blob(m.ctx)
    keep = np.tile(np.arange(10, dtype=np.int32), (m.info.n_layer, m.info.n_head_kv, 1))
    for graph in (False, True):
        assert not _native.inplace_gather(_api(), _addr(m.ctx), 0, keep, np.arange(10, dtype=np.int32), graph=graph)
        assert kvstate.get_blob(m.ctx) == before


def test_merges_write_rows(tiny_gguf, monkeypatch):
    m = CompressedLlama(tiny_gguf, n_ctx=1024)
    out = _gather_and_rows(m, monkeypatch, method="snapkv+grkv", ratio=0.5)
    assert out["1"][2] == out["graph"][2] == out["0"][2] == "rows"  # a merge rewrites every kept row: they come from the host
    assert out["1"][0] == out["0"][0]


def test_graph_math_reads_no_rows(tiny_gguf, monkeypatch):
    """Graph scoring + gather: the host sees cells and sizes, never a K/V row,
    and the cache equals the core's."""
    m = CompressedLlama(tiny_gguf, n_ctx=1024)
    m.prefill(CONTEXT)
    before = kvstate.get_blob(m.ctx)
    seen = []
    real = _native.inplace_read

    def spy(api, ctx, seq=0, rows_of=-1):
        seen.append(rows_of)
        return real(api, ctx, seq=seq, rows_of=rows_of)

    monkeypatch.setattr(_native, "inplace_read", spy)
    res = compress_cache(m.ctx, m.info, KNorm(), ratio=0.4, backend=InplaceBackend(gather="graph"), math="graph")
    assert res.merge_report["apply"]["write"] == "gather:graph" and res.merge_report["math"] == "graph"
    assert seen and all(r not in (-1, 0) for r in seen)  # no part's rows
    graph = kvstate.get_blob(m.ctx)
    assert kvstate.set_blob(m.ctx, before)
    compress_cache(m.ctx, m.info, KNorm(), ratio=0.4, backend=InplaceBackend(gather=False))
    assert kvstate.get_blob(m.ctx) == graph


def _gather_c(m, n, pos, src_rows, flags=0):
    """llama_kv_ext_seq_gather called directly: every layer takes src_rows ([n_head_kv][n] cells)."""
    import llama_cpp.llama_cpp as L

    fn = L._lib.llama_kv_ext_seq_gather
    fn.restype = ctypes.c_int32
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,
                   ctypes.POINTER(ctypes.c_int32), ctypes.c_int32, ctypes.POINTER(ctypes.POINTER(ctypes.c_int32)),
                   ctypes.c_int32]
    src = np.ascontiguousarray(src_rows, np.int32)
    pos = np.ascontiguousarray(pos, np.int32)
    per = (ctypes.POINTER(ctypes.c_int32) * m.info.n_layer)(
        *[src.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))] * m.info.n_layer)
    return fn(_addr(m.ctx), 0, 0, n, pos.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), src.shape[0], per, flags)


def test_bad_plans_are_refused_before_any_write(tiny_gguf):
    m = CompressedLlama(tiny_gguf, n_ctx=1024)
    m.prefill(CONTEXT)
    before = kvstate.get_blob(m.ctx)
    Hkv, n = m.info.n_head_kv, 8
    cells = np.arange(n)
    ok = np.tile(cells, (Hkv, 1))
    held = m.stats.context_tokens
    cases = {
        "positions repeat": (np.r_[0, 0, 2:n], ok),
        "a cell the sequence does not hold": (cells, np.tile(np.r_[0:n - 1, held + 5], (Hkv, 1))),
        "a cell index past the cache": (cells, np.tile(np.r_[0:n - 1, 1 << 20], (Hkv, 1))),
    }
    for flags in (0, 1):  # host copy, graph (LLAMA_KV_EXT_GATHER_GRAPH)
        for why, (pos, src) in cases.items():
            assert _gather_c(m, n, pos, src, flags) == -5, why  # LLAMA_KV_EXT_E_ARG
            assert kvstate.get_blob(m.ctx) == before, why
        assert _gather_c(m, n, cells, np.tile(cells, (3, 1)), flags) == -7  # 3 KV heads do not split the rows evenly
        assert kvstate.get_blob(m.ctx) == before
    with pytest.raises(CompressionError, match="seq_gather failed with code -5"):
        InplaceBackend().gather(m.ctx, np.zeros((m.info.n_layer, Hkv, 4), np.int32), np.array([3, 2, 1, 0]))
    assert kvstate.get_blob(m.ctx) == before


@pytest.mark.parametrize("flash", [False, True])
@pytest.mark.parametrize("gather", [True, "graph"])
def test_gathered_cells_hold_the_kept_tokens(tiny_gguf, flash, gather):
    """A hand-made plan: new cell i of head h holds the token at index
    src[h][i], at the given position; checked against the rows read before."""
    m = CompressedLlama(tiny_gguf, n_ctx=1024, flash_attn=flash)
    m.prefill(CONTEXT)
    st0 = InplaceBackend().read(m.ctx)
    Hkv, d = m.info.n_head_kv, m.info.head_dim
    T = m.stats.context_tokens
    rng = np.random.default_rng(1)
    n = 12
    keep = np.stack([np.stack([np.sort(rng.choice(T, n, replace=False)) for _ in range(Hkv)])
                     for _ in range(m.info.n_layer)]).astype(np.int32)
    pos = np.arange(T - n, T, dtype=np.int32)
    assert InplaceBackend(gather=gather).gather(m.ctx, keep, pos)
    st1 = InplaceBackend().read(m.ctx)
    np.testing.assert_array_equal(st1.positions(0), pos)
    for l in range(m.info.n_layer):
        for get in ("keys", "values"):
            before = getattr(st0, get)(0, l).reshape(T, Hkv, d)
            after = getattr(st1, get)(0, l).reshape(n, Hkv, d)
            for h in range(Hkv):
                np.testing.assert_array_equal(after[:, h], before[keep[l, h], h])


def test_graph_math_falls_back_to_rows_read_after_the_plan(tmp_path, monkeypatch):
    """Graph scoring reads no row; when the gather is then refused (head_dim
    32 on q8_0 K), the rows are read after the plan and written as host rows:
    the same cache as the core's."""
    path = write_tiny_model(tmp_path / "m.gguf", TinySpec("llama", n_embd=128, n_head=4, n_head_kv=2, n_ff=128))
    with quiet():
        m = CompressedLlama(path, n_ctx=1024, flash_attn=True, type_k="q8_0", type_v="f16")
    m.prefill(CONTEXT)
    before = kvstate.get_blob(m.ctx)
    res = compress_cache(m.ctx, m.info, KNorm(), ratio=0.5, backend="inplace", math="graph")
    assert res.merge_report["apply"]["write"] == "rows" and res.merge_report["math"] == "graph"
    graph = kvstate.get_blob(m.ctx)
    assert kvstate.set_blob(m.ctx, before)
    compress_cache(m.ctx, m.info, KNorm(), ratio=0.5, backend=InplaceBackend(gather=False))
    assert kvstate.get_blob(m.ctx) == graph
