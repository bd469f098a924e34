"""Bounded-memory prefill on the tiny model: a prompt several times n_ctx runs
in a cache that never exceeds budget + chunk cells."""

import dataclasses
import json

import pytest
from click.testing import CliRunner

from grkv_cpp import CompressedLlama, kvstate
from grkv_cpp.cli import main
from grkv_cpp.errors import GrkvError

CONTEXT = "abc def ghi jkl mno pqr " * 400  # ~2,400+ tokens with the byte-level tiny vocabulary


@pytest.mark.parametrize("method", ["snapkv", "knorm", "snapkv+grkv", "compactor"])
def test_prompt_longer_than_the_context_runs_in_budget(tiny_gguf, method):
    m = CompressedLlama(tiny_gguf, n_ctx=512, n_batch=128)
    with pytest.raises(GrkvError, match="budgeted request"):
        m.compress(CONTEXT, method="knorm", ratio=0.5)
    st = m.compress_budgeted(CONTEXT, budget=256, chunk=128, method=method)
    assert st.context_tokens > 4 * m.n_ctx
    assert max(m.budget_trace) <= 256 and m.budget_trace[-1] == 256
    assert st.compressions == len(m.budget_trace) - 2  # the first two chunks fit the budget
    assert kvstate.pos_range(m.ctx) == (st.context_tokens - 256, st.context_tokens - 1)
    st2 = kvstate.parse(kvstate.get_blob(m.ctx))
    assert st2.part_info(0)["n_cells"] == 256
    m.ask("abc", max_tokens=4)  # decoding continues past n_ctx positions
    assert kvstate.pos_range(m.ctx)[1] == st.context_tokens - 1


def test_compactor_budgeted_one_compression_equals_compress(tiny_gguf):
    """With one chunk the budgeted compactor compresses once, from the same
    queries as compress(): the caches are byte-identical. With several chunks
    the carried tile scores differ from a whole-context scoring, and the
    cache keeps every head's sinks."""
    m = CompressedLlama(tiny_gguf, n_ctx=2048, n_batch=128)
    ctx = CONTEXT[:1500]
    n = len(m._tokens_for(ctx))
    m.compress(ctx, method="compactor", budget=n // 2)
    whole = kvstate.get_blob(m.ctx)
    st = m.compress_budgeted(ctx, budget=n // 2, chunk=n, method="compactor")
    assert st.compressions == 1 and kvstate.get_blob(m.ctx) == whole
    st = m.compress_budgeted(ctx, budget=n // 2, chunk=96, method="compactor")
    assert st.compressions > 1 and max(m.budget_trace) <= n // 2
    assert kvstate.get_blob(m.ctx) != whole
    with pytest.raises(GrkvError, match="per head"):
        m.compress_budgeted(ctx, budget=n // 2, chunk=96, method="compactor", shared=True)


def test_cli_budgeted(tiny_gguf, tmp_path):
    f = tmp_path / "ctx.txt"
    f.write_text(CONTEXT)
    r = CliRunner().invoke(main, ["ask", "--model", str(tiny_gguf), "--context-file", str(f), "--question", "abc",
                                  "--method", "snapkv", "--kv-budget", "200", "--chunk", "100", "--json",
                                  "--max-tokens", "3"])
    assert r.exit_code == 0, r.output
    st = json.loads(r.output[r.output.index("{"):])["results"][0]["stats"]
    assert st["kv_cells_after"] == 200 and st["context_tokens"] > 2000


def test_memory_stats(tiny_gguf):
    from grkv_cpp.footprint import simulate

    m = CompressedLlama(tiny_gguf, n_ctx=512, n_batch=128)
    st = m.compress_budgeted(CONTEXT, budget=256, chunk=128, method="knorm")
    fp = simulate(st.context_tokens, chunk=128, budget=256, evict_during_prefill=True)
    assert (st.kv_footprint, st.kv_peak) == (fp.footprint, fp.peak)
    assert st.kv_peak == pytest.approx((256 + 128) / st.context_tokens)
    # tiny model: 3 layers, K and V of 2 KV heads x 16 dims in f16 = 384 bytes per cell; 512 cells allocated
    assert st.kv_buffer_bytes == 512 * 3 * 2 * (2 * 16) * 2
    assert st.peak_rss_bytes > 10 * 2**20
    full = m.prefill(CONTEXT[:600])
    assert (full.kv_footprint, full.kv_peak) == (1.0, 1.0)
    post = m.compress(CONTEXT[:600], method="knorm", ratio=0.5)
    assert post.kv_peak == 1.0  # post-fill eviction: the whole prompt was cached first


def test_laser_budget_split_matches_reference(tiny_gguf):
    """One compression of a filled cache with method="laser": the kept set is
    shared by all layers and equals the reference anchors + local + global."""
    import numpy as np
    import reference as ref

    from grkv_cpp.compressor import captured_queries, compress_cache
    from grkv_cpp.methods import LaserKV

    m = CompressedLlama(tiny_gguf, n_ctx=512, n_batch=128)
    toks = m._tokens_for(CONTEXT[:500])
    m._prefill(toks, capture=32)
    layers = captured_queries(m.capture, m.info)
    state = kvstate.parse(kvstate.get_blob(m.ctx))
    pos = state.positions(0)
    per_layer = []
    for il, (q, qp) in enumerate(layers):
        k = state.keys(0, il).reshape(len(pos), m.info.n_head_kv, m.info.head_dim)
        per_layer.append(ref.laser_scores(k, pos, q, qp, m.info.n_head, m.info.attn_scale))
    budget = 120
    want = np.asarray(pos)[ref.laser_select(per_layer, budget)]
    res = compress_cache(m.ctx, m.info, LaserKV(), budget=budget, captured=layers)
    assert res.keep.shape == (m.info.n_layer, m.info.n_head_kv, budget)
    assert (res.keep == res.keep[0, 0]).all()  # one set for all layers and heads
    got = kvstate.parse(kvstate.get_blob(m.ctx)).positions(0)
    assert list(got) == list(want)  # original positions kept
    assert set(range(30)) <= set(got) and set(range(len(pos) - 30, len(pos))) <= set(got)


@pytest.mark.parametrize("method", ["laser", "snapkv"])
def test_query_aware_budgeted_prefill(tiny_gguf, method):
    m = CompressedLlama(tiny_gguf, n_ctx=512, n_batch=128)
    st = m.compress_budgeted(CONTEXT, budget=200, chunk=128, method=method, question="abc def")
    assert max(m.budget_trace) <= 200 and m.budget_trace[-1] == 200
    assert kvstate.pos_range(m.ctx)[1] == st.context_tokens - 1  # the question's cells are gone
    assert kvstate.parse(kvstate.get_blob(m.ctx)).part_info(0)["n_cells"] == 200
    m.ask("abc def", max_tokens=3)


def _resumed_sweep(m, ctx, runs):
    """Each run from the start, then the sweep again sharing prefixes: same
    cache, trace, compressions and answer, fewer tokens evaluated."""
    n = len(m._tokens_for(ctx))
    fresh = []
    for method, budget in runs:
        st = m.compress_budgeted(ctx, budget=budget, chunk=128, method=method)
        fresh.append((kvstate.get_blob(m.ctx), list(m.budget_trace), st.compressions, m.ask("abc", max_tokens=4)))
    evaluated = []
    orig = m._eval

    def counting(tokens):
        evaluated.append(len(tokens))
        return orig(tokens)

    m._eval = counting
    prefixes = {}
    for (method, budget), (blob, trace, n_comp, answer) in zip(runs, fresh):
        evaluated.clear()
        st = m.compress_budgeted(ctx, budget=budget, chunk=128, method=method, prefixes=prefixes)
        assert sum(evaluated) < n or (method, budget) == runs[0]
        assert kvstate.get_blob(m.ctx) == blob
        assert (list(m.budget_trace), st.compressions) == (trace, n_comp)
        assert st.prefill_s > 0 and m.ask("abc", max_tokens=4) == answer
    m._eval = orig
    return prefixes, fresh


def test_compactor_budgeted_resumes_from_a_shared_prefix(tiny_gguf):
    m = CompressedLlama(tiny_gguf, n_ctx=512, n_batch=128)
    prefixes, _ = _resumed_sweep(m, CONTEXT[:3000], [("compactor", 200), ("compactor", 300), ("compactor", 260)])
    assert sorted(p.n_chunks for p in prefixes.values()) == [2, 3]


def test_shared_chunk_prefix_gives_the_same_cache(tiny_gguf):
    """A sweep that resumes from the kept pre-compression prefix ends in the
    same cache, trace and answer as prefills from the start, and evaluates
    fewer tokens."""
    m = CompressedLlama(tiny_gguf, n_ctx=512, n_batch=128)
    ctx = CONTEXT[:3000]
    runs = [("snapkv", 200), ("snapkv", 300), ("snapkv+grkv", 200), ("snapkv+grkv", 300), ("snapkv", 260)]
    prefixes, fresh = _resumed_sweep(m, ctx, runs)
    assert sorted(p.n_chunks for p in prefixes.values()) == [2, 3]  # before the first compression at 200, 300
    with pytest.raises(GrkvError):  # a rejected prefix is an error, not a silent fresh start
        bad = {k: dataclasses.replace(p, blob=b"garbage") for k, p in prefixes.items()}
        m.compress_budgeted(ctx, budget=300, chunk=128, method="snapkv", prefixes=bad)
    assert m.ask("abc", max_tokens=4) == fresh[-1][3]  # the failure left the previous context in place


def test_chunk_prefix_is_kept_only_where_it_is_shared(tiny_gguf):
    """Nothing is kept when the context fits the budget or the question scores
    the chunks; another observation window is another prefix."""
    m = CompressedLlama(tiny_gguf, n_ctx=512, n_batch=128)
    ctx = CONTEXT[:3000]
    prefixes = {}
    m.compress_budgeted(ctx[:200], budget=256, chunk=128, method="snapkv", prefixes=prefixes)
    m.compress_budgeted(ctx, budget=200, chunk=128, method="snapkv", question="abc def", prefixes=prefixes)
    assert prefixes == {}
    m.compress_budgeted(ctx, budget=200, chunk=128, method="snapkv", window_size=32, prefixes=prefixes)
    m.compress_budgeted(ctx, budget=200, chunk=128, method="snapkv", window_size=16, prefixes=prefixes)
    assert sorted(k[0][3] for k in prefixes) == [16, 32]
    # the first compression after a short last chunk: resumed equals fresh
    short = ctx[:400]
    n = len(m._tokens_for(short))
    budget = n - 5  # passed only by the last chunk, which is short
    assert n % 128 and budget > n // 128 * 128
    fresh = m.compress_budgeted(short, budget=budget, chunk=128, method="snapkv+grkv")
    blob = kvstate.get_blob(m.ctx)
    m.compress_budgeted(short, budget=budget, chunk=128, method="snapkv", prefixes=prefixes)
    resumed = m.compress_budgeted(short, budget=budget, chunk=128, method="snapkv+grkv", prefixes=prefixes)
    assert kvstate.get_blob(m.ctx) == blob and resumed.compressions == fresh.compressions == 1
    assert len(prefixes) == 3  # the snapkv run kept the state before its one compression
