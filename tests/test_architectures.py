"""Each supported architecture, as a tiny random GGUF that llama.cpp loads and
runs with its own graph, passes what the real models pass: captured queries
equal a recomputation from the weights, per-head attention after compression
equals the float64 reference, the blob round trip is byte-identical, the
budgeted prefill holds its budget, and GRKV's steps match the torch reference
on captured data."""

import numpy as np
import pytest

from grkv_cpp import _native, kvstate
from grkv_cpp.capture import QUERIES
from grkv_cpp.compressor import capture_positions, captured_queries, compress_cache
from grkv_cpp.errors import BadRequestError, UnsupportedModelError
from grkv_cpp.llm import CompressedLlama
from grkv_cpp.loader import quiet
from grkv_cpp.methods import parse_method
from reference_grkv import Problem
from test_attention_reference import check_layers, run_case
from tiny_model import TinySpec, reference_queries, write_tiny_model

# GQA ratios 1, 4 and 8; head dims 64 and 128; every RoPE variant the loader knows.
CASES = {
    "llama-gqa1-hd64": TinySpec("llama", n_embd=256, n_head=4, n_head_kv=4, n_ff=256),
    "llama31-rope_freqs-gqa8-hd128": TinySpec("llama", n_embd=1024, n_head=8, n_head_kv=1, n_ff=256,
                                              rope_freqs=True),
    "mistral-sliding_window-gqa4-hd128": TinySpec("llama", n_embd=512, n_head=4, n_head_kv=1, n_ff=256,
                                                  sliding_window=64),
    "qwen2-bias-gqa4-hd64": TinySpec("qwen2", n_embd=512, n_head=8, n_head_kv=2, n_ff=256),
    "qwen3-qknorm-gqa8-hd128": TinySpec("qwen3", n_embd=256, n_head=8, n_head_kv=1, head_dim=128, n_ff=256),
    "qwen3moe-gqa4-hd128": TinySpec("qwen3moe", n_embd=256, n_head=8, n_head_kv=2, head_dim=128, n_ff=128),
    "phi3-short-gqa1-hd64": TinySpec("phi3", n_embd=256, n_head=4, n_head_kv=4, n_ff=256),
    "phi3-long-gqa1-hd64": TinySpec("phi3", n_embd=256, n_head=4, n_head_kv=4, n_ff=256, orig_ctx=512),
    # a cap of 5 bends these random logits (std ~10) hard, so a missed cap fails loudly
    "gemma2-softcap-iswa-gqa2-hd128": TinySpec("gemma2", n_layer=4, n_embd=256, n_head=4, n_head_kv=2, head_dim=128,
                                               n_ff=256, sliding_window=64, softcap=5.0),
}
NEOX = {"llama": False, "qwen2": True, "qwen3": True, "qwen3moe": True, "phi3": True, "gemma2": True}
TEXT = "The grass is green. The sky is blue. The pass key is 4711. " * 6


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    spec = CASES[request.param]
    path = write_tiny_model(tmp_path_factory.mktemp("arch") / f"{request.param}.gguf", spec)
    return spec, path


def open_model(path, n_ctx=2048, **kw):
    with quiet():
        return CompressedLlama(path, n_ctx=n_ctx, **kw)


def test_describe_knows_the_layout_and_rope(case):
    spec, path = case
    info = open_model(path).info
    assert info.arch == spec.arch and info.head_dim == spec.hd
    assert (info.n_head, info.n_head_kv) == (spec.n_head, spec.n_head_kv)
    assert info.rope_neox == NEOX[spec.arch]
    assert info.attn_scale == pytest.approx(spec.hd ** -0.5)
    assert info.attn_softcap == spec.softcap
    if spec.arch == "gemma2":  # odd layers global (compressed), even ones sliding-window
        assert info.iswa and info.n_swa == spec.sliding_window
        assert info.cache_layers == list(range(1, spec.n_layer, 2))
    else:  # phi3's and llama's sliding_window metadata are ignored by this llama.cpp
        assert not info.iswa and info.n_swa == 0 and info.cache_layers == list(range(spec.n_layer))
    if spec.rope_freqs:
        np.testing.assert_allclose(info.rope_freq_factors, np.geomspace(1, 8, spec.hd // 2), rtol=1e-6)
    elif spec.arch == "phi3":  # n_ctx 2048 against the original 512 (long) or 4096 (short)
        top = 6.0 if spec.orig_ctx else 1.5
        np.testing.assert_allclose(info.rope_freq_factors, np.geomspace(1, top, spec.hd // 2), rtol=1e-6)
    else:
        assert info.rope_freq_factors is None


def _rotate(info, x, deltas, factors=True):
    p = info.rope_params()
    if not factors:
        p.freq_factors = []
    return _native.rope_rotate(np.ascontiguousarray(x, np.float32), p,
                               np.repeat(np.asarray(deltas, np.float64), info.n_head))


def test_captured_queries_equal_a_recomputation_from_the_weights(case):
    spec, path = case
    m = open_model(path)
    toks = m.tokenize(TEXT, bos=True)
    m.capture.set_targets([QUERIES])
    m.llm.reset()
    with m.capture.enabled():
        m.llm.eval(toks)
    info, n = m.info, len(toks)
    post = m.capture.rows(0, 0).reshape(n, info.n_head, info.head_dim)
    np.testing.assert_array_equal(m.capture.positions(0, 0), np.arange(n))
    pre = reference_queries(path, toks)
    want = _rotate(info, pre, np.arange(n))
    scale = np.abs(post).max()
    np.testing.assert_allclose(post, want, atol=2e-4 * scale)
    # moving a post-RoPE query from p to p + 40 equals RoPE at p + 40 (GRKV's stratified queries)
    np.testing.assert_allclose(_rotate(info, post[:10], np.full(10, 40.0)), _rotate(info, pre[:10], np.arange(40, 50)),
                               atol=2e-4 * scale)
    if info.rope_freq_factors:  # the factors matter: without them the rotation is measurably wrong
        assert np.abs(_rotate(info, pre, np.arange(n), factors=False) - post).max() > 100 * 2e-4 * scale


@pytest.mark.parametrize("flash_attn", [False, True])
def test_per_head_attention_after_compression_matches_reference(case, flash_attn):
    spec, path = case
    with quiet():
        m, toks, full, after, res, _ = run_case(path, flash_attn)
    errs, ctrl = check_layers(m, toks, full, after, res)
    assert len(errs) == len(m.info.cache_layers) * spec.n_head
    # CPU flash attention accumulates softmax(q.k) v in f16 (ggml's VKQ16): where attention spreads
    # (qwen3's q/k norms, gemma2's cap) that measures 2.0-2.7e-3, against 0.5-1.4e-4 without flash
    tol = 4e-3 if flash_attn else 2e-3
    assert np.median(errs) < tol and errs.max() < 2e-2, (np.median(errs), errs.max())
    # another head's kept set gives a measurably different output: the check can fail
    assert np.median(ctrl) > 20 * np.median(errs)
    if spec.softcap:  # so does a reference that forgets the cap
        uncapped, _ = check_layers(m, toks, full, after, res, softcap=0.0)
        assert np.median(uncapped) > 20 * np.median(errs)


@pytest.mark.parametrize("method", ["snapkv", "expected"])  # expected attention undoes this model's RoPE
def test_blob_round_trip_is_byte_identical(case, method):
    spec, path = case
    m = open_model(path)
    if method in m.info.refused_methods:  # gemma2's soft cap: refused before any work, the cache untouched
        m.compress(TEXT, method="snapkv", ratio=0.5)
        before = kvstate.get_blob(m.ctx)
        with pytest.raises(BadRequestError, match="'expected' is refused for gemma2: Expected Attention"):
            m.compress(TEXT + " More.", method=method, ratio=0.5)
        with pytest.raises(BadRequestError, match="refused for gemma2"):
            compress_cache(m.ctx, m.info, parse_method(method)[0], ratio=0.5, capture=m.capture)
        assert kvstate.get_blob(m.ctx) == before
        return
    m.compress(TEXT, method=method, ratio=0.5)
    blob = kvstate.get_blob(m.ctx)
    assert _native.SeqState(blob).serialize() == blob
    assert kvstate.set_blob(m.ctx, blob) and kvstate.get_blob(m.ctx) == blob


@pytest.mark.parametrize("method", ["snapkv", "gkv", "compactor"])
def test_budgeted_prefill_holds_the_budget(case, method):
    spec, path = case
    m = open_model(path, n_ctx=512, n_batch=128)
    st = m.compress_budgeted("abc def ghi jkl mno pqr " * 60, budget=256, chunk=128, method=method)
    assert st.context_tokens > 512
    assert max(m.budget_trace) <= 256 and m.budget_trace[-1] == 256
    assert kvstate.parse(kvstate.get_blob(m.ctx)).part_info(0)["n_cells"] == 256
    m.ask("abc", max_tokens=2)


def test_grkv_steps_match_reference_on_captured_data(case):
    spec, path = case
    m = open_model(path)
    toks = m._tokens_for(TEXT)
    method, merge = parse_method("snapkv+grkv", query_mode="stratified")
    pos_cap, whole = capture_positions(len(toks), method, merge)
    m._prefill(toks, pos_cap, whole)
    captured = captured_queries(m.capture, m.info)
    blob = kvstate.get_blob(m.ctx)
    info = m.info
    st = _native.SeqState(blob)
    pos = st.positions(0)
    layer, h, W = len(info.cache_layers) - 1, spec.n_head_kv - 1, 32  # the last compressed layer
    K = st.keys(0, layer).reshape(-1, info.n_head_kv, info.head_dim)[:, h].astype(np.float64)
    V = st.values(0, layer).reshape(-1, info.n_head_kv, info.head_dim)[:, h].astype(np.float64)
    q, qpos = captured[layer]
    G = info.n_head // info.n_head_kv
    # the exact reference builds J J^T, (R d)^2 doubles: 16 query rows keep it small at every GQA ratio
    n_q = 16 // G
    q, qpos = q[qpos >= len(toks) - n_q], qpos[qpos >= len(toks) - n_q]
    rows = np.concatenate([q[:, h * G + g] for g in range(G)]).astype(np.float64)
    rpos = np.concatenate([qpos] * G)
    rng = np.random.default_rng(0)
    keep = np.sort(np.concatenate([rng.choice(len(pos) - W, 60, replace=False), np.arange(len(pos) - W, len(pos))]))
    vis_full = pos[None, :] <= rpos[:, None]
    z = rows @ K.T * info.attn_scale
    if info.attn_softcap:
        z = info.attn_softcap * np.tanh(z / info.attn_softcap)
    lg = np.where(vis_full, z, -np.inf)
    A = np.exp(lg - lg.max(1, keepdims=True))
    ostar = (A / A.sum(1, keepdims=True)) @ V
    mut = np.ones(len(keep), bool)
    mut[-W:] = False
    ref = Problem(q=rows, w=np.ones(len(rows)), vis=vis_full[:, keep], ostar=ostar, k0=K[keep], v0=V[keep], mut=mut,
                  scale=info.attn_scale, softcap=info.attn_softcap)
    f32 = lambda x: np.ascontiguousarray(x, np.float32)  # noqa: E731
    p = _native.kernels.GrkvProblem(f32(rows), f32(np.ones(len(rows))), vis_full[:, keep].astype(np.uint8), f32(ostar),
                            f32(K[keep]), f32(V[keep]), mut.astype(np.uint8), info.attn_scale,
                            info.attn_softcap)
    want = ref.value_step(ref.k0, 0.01).numpy()
    got = _native.kernels.grkv_value_step(p, f32(K[keep]), 0.01)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-3
    V1 = ref.v0 + ref.value_step(ref.k0, 0.01)
    exact = ref.key_step(ref.k0, V1, 0.01).numpy()
    # random weights give far sharper attention than trained ones (logit std ~10), so J J^T is
    # ill-conditioned and CG needs more than the real models' 64 iterations to reach the exact step
    nat = _native.kernels.grkv_key_step(p, f32(K[keep]), f32(V1.numpy()), 0.01, 1024, 1e-9)
    assert (nat * exact).sum() / (np.linalg.norm(nat) * np.linalg.norm(exact)) > 0.999
    # the whole merge (stratified queries re-rotated with this model's RoPE) never makes a layer worse
    res = compress_cache(m.ctx, info, method, merge=merge, ratio=0.3, captured=captured)
    rep = res.merge_report
    objs = np.stack([rep["obj_none"], rep["obj_v"], rep["obj_kv"]], 1)
    chosen = objs[np.arange(len(rep["choice"])), rep["choice"]]
    assert (chosen <= objs[:, 0] * (1 + 1e-6)).all() and chosen.sum() < objs[:, 0].sum()


def test_refused_architecture_says_why(tmp_path):
    path = write_tiny_model(tmp_path / "smollm3.gguf", TinySpec("smollm3"))
    with pytest.raises(UnsupportedModelError, match="'smollm3' is not supported yet.*grkv-cpp models"):
        open_model(path, n_ctx=256)
