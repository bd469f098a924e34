"""The graph path (ggml graphs on the cache's backend) against the C++ core
and the float64 torch reference: SnapKV, KNorm and StreamingLLM scores and
per-head selections, on random GQA tensors and on K/queries captured from
SmolLM2 and Gemma-3. Runs on ggml's CPU backend here; the same graphs run on
CUDA or Metal builds."""

import numpy as np
import pytest

from grkv_cpp import _native
import reference as ref

pytestmark = pytest.mark.skipif(not _native.graph_available(), reason="the graph path needs the patched build's ggml")


def random_layer(seed, T=97, Hkv=2, G=3, d=16, w=8):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((T, Hkv, d)).astype(np.float32)
    q = rng.standard_normal((w, Hkv * G, d)).astype(np.float32) * 2
    pos = np.arange(T, dtype=np.int32) + 5
    qpos = pos[-w:].copy()
    return k, q, pos, qpos, Hkv * G


def check_against_core(k, pos, q, qpos, H, scale, budget, softcap=0.0, kernel=5, n_threads=1, method="snapkv",
                       n_sink=4):
    """The graph's scores and kept sets equal the core's score_layer + select_per_head."""
    s_core, prot = _native.kernels.score_layer(method, k, pos, q, qpos, n_head=H, scale=scale, kernel=kernel,
                                       n_sink=n_sink, softcap=softcap)
    s_graph, keep, backend = _native.kernels.graph_select(method, k, pos, q, qpos, n_head=H, scale=scale, budget=budget,
                                                  kernel=kernel, n_sink=n_sink, n_threads=n_threads,
                                                  softcap=softcap)
    assert backend == "CPU"
    free = ~prot.astype(bool)  # protected tokens: the core ranks them on top, the graph lifts them by a bonus
    np.testing.assert_allclose(s_graph[:, free], s_core[:, free], rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(keep, _native.kernels.select_per_head(s_core, prot, budget))
    return s_graph, keep, prot


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("softcap", [0.0, 2.0])
@pytest.mark.parametrize("shape", [dict(Hkv=2, G=3, d=16), dict(Hkv=1, G=4, d=32), dict(Hkv=3, G=1, d=8)])
def test_snapkv_graph_matches_core_and_reference(seed, softcap, shape):
    k, q, pos, qpos, H = random_layer(seed, **shape)
    scale = 1 / np.sqrt(k.shape[-1])
    s, keep, prot = check_against_core(k, pos, q, qpos, H, scale, 40, softcap=softcap)
    rs, rprot = ref.snapkv_scores(k, pos, q, qpos, H, scale, 5, "avg", softcap=softcap)
    prefix = int((~rprot).sum())
    np.testing.assert_allclose(s[:, :prefix], rs.numpy()[:, :prefix], rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(keep, ref.select(rs, rprot, 40).numpy())


def test_snapkv_graph_window_only_and_whole_budget():
    k, q, pos, qpos, H = random_layer(0)
    T, w = len(pos), len(qpos)
    _, keep, _ = check_against_core(k, pos, q, qpos, H, 0.25, w)  # just the window
    assert (keep == np.arange(T - w, T)).all()
    _, keep, _ = check_against_core(k, pos, q, qpos, H, 0.25, T)  # everything
    assert (keep == np.arange(T)).all()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape", [dict(Hkv=2, G=3, d=16), dict(Hkv=1, G=4, d=32)])
def test_knorm_and_streaming_graphs_match_core_and_reference(seed, shape):
    k, _, pos, _, H = random_layer(seed, **shape)
    T, Hkv = k.shape[0], k.shape[1]
    s, keep, _ = check_against_core(k, pos, None, None, H, 1.0, 30, method="knorm")
    rs, rprot = ref.knorm_scores(k)
    np.testing.assert_allclose(s, rs.numpy(), rtol=1e-5)
    np.testing.assert_array_equal(keep, ref.select(rs, rprot, 30).numpy())
    _, keep, _ = check_against_core(k, pos, None, None, H, 1.0, 20, method="streaming", n_sink=4)
    rs, rprot = ref.streaming_scores(T, Hkv, 4)
    np.testing.assert_array_equal(keep, ref.select(rs, rprot, 20).numpy())
    assert (keep == np.r_[0:4, T - 16:T]).all()  # sinks and the most recent tokens


def test_graph_errors():
    k, q, pos, qpos, H = random_layer(0)
    sel = _native.kernels.graph_select
    with pytest.raises(_native.NativeError, match="protected tokens are always kept"):
        sel("snapkv", k, pos, q, qpos, n_head=H, scale=0.25, budget=len(qpos) - 1)
    with pytest.raises(_native.NativeError, match="no ggml backend named"):
        sel("snapkv", k, pos, q, qpos, n_head=H, scale=0.25, budget=40, backend="NoSuchGPU0")
    with pytest.raises(_native.NativeError, match="odd and positive"):
        sel("snapkv", k, pos, q, qpos, n_head=H, scale=0.25, budget=40, kernel=4)
    with pytest.raises(_native.NativeError, match="inconsistent shapes"):
        sel("snapkv", k, pos, q[:, :-1], qpos, n_head=H, scale=0.25, budget=40)
    with pytest.raises(_native.NativeError, match="observation window"):
        sel("snapkv", k, pos, n_head=H, scale=0.25, budget=40)
    with pytest.raises(_native.NativeError, match="not 'expected'"):
        sel("expected", k, pos, budget=40)
    with pytest.raises(_native.NativeError, match="outside"):
        sel("knorm", k, pos, budget=len(pos) + 1)


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_snapkv_graph_on_captured_model_data(model, request):
    """K and window queries of a real prefill: the graph keeps what the core keeps."""
    from grkv_cpp import kvstate
    from grkv_cpp._native import SeqState
    from grkv_cpp.compressor import capture_positions, captured_queries
    from grkv_cpp.llm import CompressedLlama
    from grkv_cpp.loader import quiet
    from grkv_cpp.methods import parse_method
    from grkv_cpp.texts import haystack, passkey_needle

    path = request.getfixturevalue(f"{model}_gguf")
    with quiet():
        m = CompressedLlama(path, n_ctx=1024, n_threads=2)
    try:
        info = m.info
        toks = m._tokens_for(haystack(30, [(0.5, passkey_needle(4242))]))
        method, _ = parse_method("snapkv")
        positions, _ = capture_positions(len(toks), method, None)
        m._prefill(toks, positions, whole=True)
        captured = captured_queries(m.capture, info)
        state = SeqState(kvstate.get_blob(m.ctx))
        part = 0  # the compressed cache (Gemma-3: its global-attention layers), layers as info.cache_layers
        pos = state.positions(part).astype(np.int32)
        T, Hkv, d = len(pos), info.n_head_kv, info.head_dim
        budget = T // 2
        n_layers = state.part_info(part)["n_layer"]
        for ci in range(0, n_layers, max(1, n_layers // 4)):
            k = np.ascontiguousarray(state.keys(part, ci).reshape(T, Hkv, d), dtype=np.float32)
            q, qp = captured[ci]
            win = qp >= pos[-64]
            q = np.ascontiguousarray(q.reshape(-1, info.n_head, d)[win], dtype=np.float32)
            check_against_core(k, pos, q, qp[win].astype(np.int32), info.n_head, info.attn_scale, budget,
                               softcap=info.attn_softcap, n_threads=2)
    finally:
        m.close()


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_graph_path_compression_writes_what_the_core_writes(model, request):
    """compress_cache(math="graph"): SnapKV, KNorm and StreamingLLM selected on
    the cache's backend from its K tensors give the core's kept sets and a
    byte-identical cache; a request the graph path cannot run is refused with
    the context unchanged."""
    from grkv_cpp import kvstate
    from grkv_cpp.compressor import capture_positions, captured_queries, compress_cache
    from grkv_cpp.errors import CompressionError
    from grkv_cpp.llm import CompressedLlama
    from grkv_cpp.loader import quiet
    from grkv_cpp.methods import parse_method
    from grkv_cpp.texts import haystack, passkey_needle

    path = request.getfixturevalue(f"{model}_gguf")
    with quiet():
        m = CompressedLlama(path, n_ctx=1024, n_threads=2)
    try:
        toks = m._tokens_for(haystack(30, [(0.5, passkey_needle(777))]))
        T = len(toks)
        method, _ = parse_method("snapkv")
        positions, _ = capture_positions(T, method, None)
        m._prefill(toks, positions, whole=True)
        captured = captured_queries(m.capture, m.info)
        full = kvstate.get_blob(m.ctx)
        for name in ("snapkv", "knorm", "streaming"):
            meth, _ = parse_method(name)
            results = {}
            for math in ("core", "graph"):
                assert kvstate.set_blob(m.ctx, full)
                res = compress_cache(m.ctx, m.info, meth, ratio=0.5, captured=captured, n_threads=2, math=math)
                assert res.merge_report["math"] == math
                results[math] = (res.keep, kvstate.get_blob(m.ctx))
            assert results["graph"][0].shape == results["core"][0].shape
            np.testing.assert_array_equal(results["graph"][0], results["core"][0])
            assert results["graph"][1] == results["core"][1], name
        max_pool, _ = parse_method("snapkv", pooling="max")  # not in the graph path
        assert kvstate.set_blob(m.ctx, full)
        with pytest.raises(CompressionError, match="graph path"):
            compress_cache(m.ctx, m.info, max_pool, ratio=0.5, captured=captured, math="graph")
        assert kvstate.get_blob(m.ctx) == full
        # refused: a merge, with the cache left as it was
        _, grkv = parse_method("snapkv+grkv")
        assert kvstate.set_blob(m.ctx, full)
        with pytest.raises(CompressionError, match="graph path"):
            compress_cache(m.ctx, m.info, method, merge=grkv, ratio=0.5, captured=captured, math="graph")
        assert kvstate.get_blob(m.ctx) == full
    finally:
        m.close()


def test_math_graph_through_the_api_and_cli(smollm2_gguf, tmp_path):
    """compress(math="graph") and `ask --math graph`: the same kept cells and
    answer as the core, and the stats say where the math ran."""
    import json

    from click.testing import CliRunner

    from grkv_cpp.cli import main
    from grkv_cpp.llm import CompressedLlama
    from grkv_cpp.loader import quiet
    from grkv_cpp.texts import haystack, passkey_needle

    needle = passkey_needle(60427)
    context = haystack(12, [(0.5, needle)])
    with quiet():
        m = CompressedLlama(smollm2_gguf, n_ctx=1024, n_threads=2)
    try:
        answers = {}
        for math in ("core", "graph"):
            st = m.compress(context, method="snapkv", ratio=0.5, math=math)
            assert st.math == math
            answers[math] = (st.kv_cells_after, m.ask(needle.question, max_tokens=8))
        assert answers["graph"] == answers["core"]
    finally:
        m.close()
    f = tmp_path / "ctx.txt"
    f.write_text(context)
    r = CliRunner().invoke(main, ["ask", "--model", str(smollm2_gguf), "--context-file", str(f), "--question",
                                  needle.question, "--method", "knorm", "--math", "graph", "--json", "--max-tokens", "4"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.index("{"):])["results"][0]["stats"]["math"] == "graph"
    r = CliRunner().invoke(main, ["ask", "--model", str(smollm2_gguf), "--context-file", str(f), "--question", "q",
                                  "--method", "snapkv", "--math", "graph", "--query-aware"])
    assert r.exit_code != 0 and "--math graph runs a plain compression" in r.output
