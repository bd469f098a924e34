"""The context scorers end to end: the re-read pass leaves the cache byte for
byte as it was (SmolLM2; Gemma-3's two caches), scores on queries and K/V
captured from both real models equal the float64 reference (Gemma-3's query
scale and NEOX pairing included), and the API's errors."""

import numpy as np
import pytest

from grkv_cpp import CompressedLlama, _native, kvstate, reread
from grkv_cpp.compressor import compress_cache
from grkv_cpp.errors import BadRequestError, CompressionError
from grkv_cpp.loader import quiet
from grkv_cpp.methods import parse_method
from grkv_cpp.methods.context import ALL_QUERIES
from grkv_cpp.texts import haystack, passkey_needle
import reference as ref
import reference_context as rc

CONTEXT = "abc def ghi jkl mno " * 30


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    return CompressedLlama(tiny_gguf, n_ctx=1024)


def _rope(info):
    return (info.rope_n_rot, info.rope_base, info.rope_scale, info.rope_neox)


def _native_rope(info):
    return info.rope_params()


def test_reread_chunks_and_prompts(tiny):
    toks = tiny._tokens_for(CONTEXT)
    n_prefix = tiny._n_prefix
    tiny._prefill(toks)
    before = kvstate.get_blob(tiny.ctx)
    rr = reread.run(tiny, toks, n_prefix, chunk=64, overlap=8)
    assert kvstate.get_blob(tiny.ctx) == before
    assert rr.chunks[0][0] == n_prefix and rr.chunks[-1][1] == len(toks)
    assert all(a[1] == b[0] for a, b in zip(rr.chunks, rr.chunks[1:]))
    inputs = reread.chunk_inputs(tiny, toks, n_prefix, 64, 8)
    # a later chunk's prompt quotes the previous chunk's last 8 tokens, then re-reads its own
    (lo, hi), ids = inputs[1]
    assert ids[-(hi - lo):] == toks[lo:hi]
    assert toks[lo - 8: lo] == ids[len(ids) - (hi - lo) - 8 - len(tiny.tokenize("\nAnswer:", bos=False)):][:8]
    q, qpos, rk, qchunk = rr.layers[0]
    assert len(q) == len(qpos) == len(rk) == len(qchunk) == rr.tokens == sum(len(x) for _, x in inputs)
    assert qpos.min() == len(toks) and (np.diff(qchunk) >= 0).all()


def test_context_methods_compress_and_answer(tiny):
    for name in ("reconstruct", "expected", "compactor", "reconstruct+grkv", "expected+grkv"):
        st = tiny.compress(CONTEXT, method=name, ratio=0.5)
        assert st.kv_cells_after == round(0.5 * st.context_tokens)
        assert kvstate.pos_range(tiny.ctx)[1] == st.context_tokens - 1
        assert isinstance(tiny.ask("abc", max_tokens=4), str)
    assert tiny.stats.method == "expected+grkv"


def test_prefilled_state_runs_one_reread(tiny, monkeypatch):
    st = tiny.prefill_state(CONTEXT, window=ALL_QUERIES)
    calls = []
    real = reread.run
    monkeypatch.setattr(reread, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    a = tiny.compress_state(st, method="reconstruct", ratio=0.5)
    blob_a = kvstate.get_blob(tiny.ctx)
    tiny.compress_state(st, method="reconstruct", ratio=0.25)
    b = tiny.compress_state(st, method="reconstruct", ratio=0.5)
    assert len(calls) == 1 and a.reread_s == b.reread_s > 0
    assert kvstate.get_blob(tiny.ctx) == blob_a  # same state, same scores, same cache
    fresh = tiny.compress(CONTEXT, method="reconstruct", ratio=0.5)
    assert kvstate.get_blob(tiny.ctx) == blob_a and fresh.kv_cells_after == a.kv_cells_after


def test_context_method_errors_keep_the_context(tiny):
    tiny.compress(CONTEXT, method="knorm", ratio=0.5)
    before, answer = kvstate.get_blob(tiny.ctx), tiny.ask("abc", max_tokens=5)
    with pytest.raises(BadRequestError, match="without its question"):
        tiny.compress(CONTEXT, method="reconstruct", ratio=0.5, question="abc")
    with pytest.raises(BadRequestError, match="budgeted prefill"):
        tiny.compress_budgeted(CONTEXT, method="expected", budget=64, chunk=64)
    with pytest.raises(BadRequestError, match="decode-time"):
        tiny.decode_compression(64, method="compactor")
    with pytest.raises(BadRequestError, match="n_sink"):
        parse_method("reconstruct", n_sink=-1)
    # n_ctx too small for the re-read pass: refused after the prefill, the old context comes back
    with pytest.raises(CompressionError, match="re-read pass needs"):
        tiny.compress(CONTEXT * 2, method="reconstruct", ratio=0.5)
    with pytest.raises(CompressionError, match="must keep"):
        tiny.compress(CONTEXT, method="expected", budget=8, n_recent=32)
    assert kvstate.get_blob(tiny.ctx) == before and tiny.ask("abc", max_tokens=5) == answer


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    with quiet():
        return CompressedLlama(smollm2_gguf, n_ctx=2048)


@pytest.fixture(scope="module")
def gemma3(gemma3_gguf):
    with quiet():
        return CompressedLlama(gemma3_gguf, n_ctx=2048)


def _context():
    return haystack(8, [(0.4, passkey_needle(27182))])


@pytest.mark.slow
@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_reread_leaves_the_cache_byte_identical(which, request):
    m = request.getfixturevalue(which)
    toks = m._tokens_for(_context())
    m._prefill(toks)
    before = kvstate.get_blob(m.ctx)
    state = kvstate.parse(before)
    assert state.n_parts == (2 if which == "gemma3" else 1)  # Gemma-3: global and sliding-window caches
    rr = reread.run(m, toks, m._n_prefix, chunk=160)
    assert len(rr.chunks) >= 2
    assert kvstate.get_blob(m.ctx) == before


@pytest.mark.slow
def test_reread_restores_a_window_sized_swa_cache(gemma3_gguf):
    with quiet():
        m = CompressedLlama(gemma3_gguf, n_ctx=2048, swa_full=False)
    toks = m._tokens_for(haystack(20, [(0.4, passkey_needle(27182))]))
    m._prefill(toks)
    before = kvstate.get_blob(m.ctx)
    reread.run(m, toks, m._n_prefix)
    assert kvstate.get_blob(m.ctx) == before


def _layer_kv(state, layer, info):
    k = state.keys(0, layer).reshape(-1, info.n_head_kv, info.head_dim)
    v = state.values(0, layer).reshape(-1, info.n_head_kv, info.head_dim)
    return k, v


@pytest.mark.slow
@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_scores_on_captured_data_match_reference(which, request):
    m = request.getfixturevalue(which)
    info = m.info
    st = m.prefill_state(_context(), window=ALL_QUERIES)
    state = kvstate.parse(st.blob)
    pos = state.positions(0)
    li = len(info.cache_layers) // 2  # a middle cache layer (Gemma-3: global layer 11)
    k, v = _layer_kv(state, li, info)
    q, qpos = st.captured[li]
    assert len(qpos) == len(pos)
    p = _native.ContextParams()
    p.n_sink, p.n_future = st.n_prefix, 512
    s, prot = _native.kernels.score_context_layer("expected", k, pos, q, qpos, info.n_head, info.attn_scale, p,
                                          _native_rope(info), v=v)
    rs, rprot = rc.expected_scores(k, v, pos, q, qpos, info.n_head, info.attn_scale, _rope(info), n_sink=st.n_prefix)
    np.testing.assert_allclose(s, rs.numpy(), rtol=2e-3, atol=1e-6)
    B = len(pos) // 2
    sel = _native.kernels.select_per_head(s, prot, B)
    rsel = ref.select(rs, rprot, B).numpy()
    assert np.mean([len(set(a) & set(b)) / B for a, b in zip(sel, rsel)]) > 0.99
    p = _native.ContextParams()
    p.n_sink, p.n_recent, p.beta = 8, 4, 0.5
    s, _ = _native.kernels.score_context_layer("compactor", k, pos, q, qpos, info.n_head, info.attn_scale, p,
                                       _native_rope(info), v=v)
    rs, _ = rc.compactor_scores(k, v, pos, q, info.n_head, info.attn_scale, _rope(info), beta=0.5)
    np.testing.assert_allclose(s, rs.numpy(), rtol=1e-3, atol=2e-3)
    # the re-read pass on the same cache
    m._put_state(st)
    rr = reread.run(m, list(st.tokens), st.n_prefix, chunk=200)
    q, qpos, rk, qchunk = rr.layers[li]
    p = _native.ContextParams()
    p.n_sink = st.n_prefix
    s, _ = _native.kernels.score_context_layer("reconstruct", k, pos, q, qpos, info.n_head, info.attn_scale, p,
                                       _native_rope(info), rk=rk, qchunk=qchunk, chunks=rr.chunks)
    rs, _ = rc.reconstruct_scores(k, q, rk, qchunk, rr.chunks, info.n_head, info.attn_scale, n_sink=st.n_prefix)
    np.testing.assert_allclose(s, rs.numpy(), rtol=1e-3, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_captured_queries_undo_to_the_pre_rope_projection(which, request):
    """De-rotating a captured post-RoPE query must give a vector that no
    longer depends on position: the same token at two positions (the second
    copy of a repeated text) has the same pre-RoPE query up to the context
    difference, so compare against the rotation of the wrong pairing."""
    m = request.getfixturevalue(which)
    info = m.info
    st = m.prefill_state(_context(), window=ALL_QUERIES)
    q, qpos = st.captured[-1]
    d = info.head_dim
    rope = _rope(info)
    x = rc.derotate(q[:, :1], qpos, rope)[:, 0]              # [n, d] head 0 pre-RoPE
    wrong = rc.derotate(q[:, :1], qpos, (rope[0], rope[1], rope[2], not rope[3]))[:, 0]
    # pre-RoPE queries of a layer cluster around their mean; wrongly undone ones spin with position
    spread = lambda y: float(((y - y.mean(0)) ** 2).sum(1).mean() / (y ** 2).sum(1).mean())  # noqa: E731
    assert spread(x) < spread(wrong)
    assert x.shape[1] == d


def test_grkv_reread_queries(tiny):
    """GRKV fitted to the re-read pass's queries: they sit after the context
    (non-causal surrogates), and the pass is shared with reconstruct."""
    from grkv_cpp.compressor import _surrogates

    st = tiny.prefill_state(CONTEXT, window=ALL_QUERIES)
    s = tiny.compress_state(st, method="reconstruct+grkv", ratio=0.5, query_mode="reread", n_queries=16)
    assert s.reread_s > 0 and s.merge_report["choice"]
    s2 = tiny.compress_state(st, method="compactor+grkv", ratio=0.5, query_mode="reread", n_queries=16)
    assert s2.reread_s == s.reread_s  # the same state's pass, run once
    rr = tiny._reread_cache[2]
    _, merge = parse_method("compactor+grkv", query_mode="reread", n_queries=16)
    sur = _surrogates([], tiny.info, merge, 0, st.context_tokens - 1, rr)
    q, qpos, causal, w = sur[0]
    assert len(qpos) == 16 and not causal and qpos.min() >= st.context_tokens
    with pytest.raises(BadRequestError, match="without its question"):
        tiny.compress(CONTEXT, method="snapkv+grkv", ratio=0.5, question="abc", query_mode="reread")
