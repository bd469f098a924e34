"""Compression on q8_0 / q4_0 KV caches: every kept head slot that no merge
touched holds its token's quantised blocks byte for byte; merged rows are
written back rotated and requantised, and GRKV's safeguard judges them as
stored; llama.cpp's attention for new tokens over the compressed cache equals
a float64 reference over the dequantised, un-rotated kept rows, within
quantisation tolerance. A quantised V without flash attention is refused."""

import numpy as np
import pytest

import reference as ref
from grkv_cpp import _native, kvstate
from grkv_cpp.apply import patched_library
from grkv_cpp.capture import ATTN_OUT, QUERIES
from grkv_cpp.compressor import compress_cache
from grkv_cpp.errors import UnsupportedModelError
from grkv_cpp.llm import CompressedLlama
from grkv_cpp.loader import quiet
from grkv_cpp.methods import SnapKV, parse_method
from tiny_model import TinySpec, write_tiny_model

CODES = {"q8_0": 8, "q4_0": 2, "f16": 1}
N_NEW = 4
BACKENDS = ["blob"] + (["inplace"] if patched_library() else [])


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    # head_dim 64: K and V rotated by H_64, two 32-value blocks per head
    return write_tiny_model(tmp_path_factory.mktemp("q") / "m.gguf",
                            TinySpec("llama", n_embd=256, n_head=4, n_head_kv=2, n_ff=128))


def _state(blob, tk, tv, d):
    st = _native.SeqState(blob)
    st.set_rotation(0, _native.hadamard_block_k(CODES[tk], d), _native.hadamard_block_v(CODES[tv], d))
    return st


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tk,tv", [("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "f16")])
def test_per_head_eviction_on_a_quantised_cache_matches_reference(model_path, tk, tv, backend):
    with quiet():
        m = CompressedLlama(model_path, n_ctx=2048, flash_attn=True, type_k=tk, type_v=tv)
    info = m.info
    H, Hkv, d = info.n_head, info.n_head_kv, info.head_dim
    toks = m._tokens_for("The grass is green. The sky is blue. The pass key is 4711. " * 20)
    m._prefill(toks, 32)
    blob0 = kvstate.get_blob(m.ctx)
    res = compress_cache(m.ctx, info, SnapKV(), ratio=0.3, capture=m.capture, backend=backend)
    new = m.tokenize(" What is the pass key", bos=False)[:N_NEW]
    m.capture.set_targets([QUERIES, ATTN_OUT])
    with m.capture.enabled():
        m.llm.eval(new)
    full, after = _state(blob0, tk, tv, d), _state(kvstate.get_blob(m.ctx), tk, tv, d)
    raw1 = _native.SeqState(kvstate.get_blob(m.ctx))
    B, G, rv = res.cells_after, H // Hkv, _native.hadamard_block_v(CODES[tv], d)
    errs, ctrl = [], []
    for il in range(info.n_layer):
        K0, V0 = full.keys(0, il).reshape(-1, Hkv, d), full.values(0, il).reshape(-1, Hkv, d)
        K1, V1 = after.keys(0, il).reshape(-1, Hkv, d), after.values(0, il).reshape(-1, Hkv, d)
        q = m.capture.rows(0, il)[-N_NEW:].reshape(N_NEW, H, d)
        out = m.capture.rows(1, il)[-N_NEW:]
        if rv:  # the attention output is in V's rotated basis until after this node
            out = _native.kernels.hadamard(np.ascontiguousarray(out), rv)
        out = out.reshape(N_NEW, H, d)
        for hq in range(H):
            kv = hq // G
            keep = res.keep[il][kv]
            np.testing.assert_array_equal(K1[:B, kv], K0[keep, kv])
            np.testing.assert_array_equal(V1[:B, kv], V0[keep, kv])
            k = np.concatenate([K0[keep, kv], K1[B:, kv]])
            v = np.concatenate([V0[keep, kv], V1[B:, kv]])
            want = ref.attention(q[:, hq], k, v, info.attn_scale, causal_offset=B).numpy()
            errs.append(np.linalg.norm(out[:, hq] - want) / np.linalg.norm(want))
            other = keep[::-1] if Hkv == 1 else res.keep[il][(kv + 1) % Hkv]
            kc = np.concatenate([K0[other, kv], K1[B:, kv]])
            vc = np.concatenate([V0[other, kv], V1[B:, kv]])
            w2 = ref.attention(q[:, hq], kc, vc, info.attn_scale, causal_offset=B).numpy()
            ctrl.append(np.linalg.norm(out[:, hq] - w2) / np.linalg.norm(w2))
    errs, ctrl = np.array(errs), np.array(ctrl)
    # CPU flash attention quantises Q to q8_0 for its dot products: measured 1.0-1.4e-2 median
    assert np.median(errs) < 3e-2 and errs.max() < 8e-2, (np.median(errs), errs.max())
    assert np.median(ctrl) > 20 * np.median(errs)
    assert raw1.part_info(0)["n_cells"] == B + N_NEW
    assert raw1.part_info(0)["k_types"][0] == tk and raw1.part_info(0)["v_types"][0] == tv


def test_kept_blocks_are_byte_identical(model_path):
    with quiet():
        m = CompressedLlama(model_path, n_ctx=2048, flash_attn=True, type_k="q4_0", type_v="q4_0")
    toks = m._tokens_for("The grass is green. The sky is blue. " * 20)
    m._prefill(toks, 32)
    blob0 = kvstate.get_blob(m.ctx)
    res = compress_cache(m.ctx, m.info, SnapKV(), ratio=0.4, capture=m.capture, backend="blob")
    # without rotation the dequantised rows are the stored blocks' values: equal floats, equal blocks
    f0, f1 = _native.SeqState(blob0), _native.SeqState(kvstate.get_blob(m.ctx))
    d, Hkv = m.info.head_dim, m.info.n_head_kv
    for il in range(m.info.n_layer):
        K0, K1 = f0.keys(0, il).reshape(-1, Hkv, d), f1.keys(0, il).reshape(-1, Hkv, d)
        for h in range(Hkv):
            q0 = _native.kernels.quant_quantize(2, np.ascontiguousarray(K0[res.keep[il][h], h].ravel()))
            q1 = _native.kernels.quant_quantize(2, np.ascontiguousarray(K1[:, h].ravel()))
            assert q0 == q1


def _prefilled(model_path, tk, tv, text, n_ctx=2048):
    with quiet():
        m = CompressedLlama(model_path, n_ctx=n_ctx, flash_attn=True, type_k=tk, type_v=tv)
    toks = m._tokens_for(text)
    m._prefill(toks, 32)
    return m, toks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", ["snapkv+grkv", "snapkv+merge", "knorm+pivot"])
@pytest.mark.parametrize("tk,tv", [("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "f16")])
def test_merges_on_a_quantised_cache(model_path, tk, tv, spec, backend):
    m, toks = _prefilled(model_path, tk, tv, "The grass is green. The sky is blue. The pass key is 4711. " * 20)
    info, d, Hkv, H = m.info, m.info.head_dim, m.info.n_head_kv, m.info.n_head
    blob0 = kvstate.get_blob(m.ctx)
    method, merge = parse_method(spec)
    res = compress_cache(m.ctx, info, method, merge=merge, ratio=0.3, capture=m.capture, backend=backend)
    full, comp = _state(blob0, tk, tv, d), _state(kvstate.get_blob(m.ctx), tk, tv, d)
    pos, B = full.positions(0), res.cells_after
    rep = res.merge_report
    if merge.name == "grkv":
        choice = np.array(rep["choice"])
        objs = np.stack([rep["obj_none"], rep["obj_v"], rep["obj_kv"]], 1)
        chosen = objs[np.arange(len(choice)), choice]
        assert (chosen <= objs[:, 0] * (1 + 1e-6)).all()  # judged on the requantised rows
    n_changed = 0
    for il in range(info.n_layer):
        K0, V0 = full.keys(0, il).reshape(-1, Hkv, d), full.values(0, il).reshape(-1, Hkv, d)
        K1, V1 = comp.keys(0, il).reshape(-1, Hkv, d), comp.values(0, il).reshape(-1, Hkv, d)
        for h in range(Hkv):
            keep = res.keep[il][h]
            ck = (K1[:, h] != K0[keep, h]).any(1)
            cv = (V1[:, h] != V0[keep, h]).any(1)
            n_changed += int(cv.sum() + ck.sum())
            if merge.name == "grkv":
                win = pos[keep] >= len(toks) - merge.window
                assert not (ck | cv)[win].any()  # GRKV's fixed window: untouched
                if choice[il] == 0:
                    assert not (ck | cv).any()
            if merge.name == "merge":
                assert not ck.any()  # value merging leaves keys as they were
            # a changed row is what the cache type can hold: storing it again changes nothing
            for X, t, ch, blk in ((K1, tk, ck, _native.hadamard_block_k(CODES[tk], d)),
                                  (V1, tv, cv, _native.hadamard_block_v(CODES[tv], d))):
                if ch.any():
                    rows = np.ascontiguousarray(X[:B, h][ch])
                    np.testing.assert_array_equal(_native.kernels.f32_round_trip(rows, t, blk), rows)
    assert n_changed > 0  # the merge did write new rows
    # new tokens attend over the stored (requantised) rows as the float64 reference says
    new = m.tokenize(" What is the pass key", bos=False)[:N_NEW]
    m.capture.set_targets([QUERIES, ATTN_OUT])
    with m.capture.enabled():
        m.llm.eval(new)
    after = _state(kvstate.get_blob(m.ctx), tk, tv, d)
    rv, G, errs = _native.hadamard_block_v(CODES[tv], d), H // Hkv, []
    for il in range(info.n_layer):
        K1, V1 = after.keys(0, il).reshape(-1, Hkv, d), after.values(0, il).reshape(-1, Hkv, d)
        q = m.capture.rows(0, il)[-N_NEW:].reshape(N_NEW, H, d)
        out = m.capture.rows(1, il)[-N_NEW:]
        if rv:
            out = _native.kernels.hadamard(np.ascontiguousarray(out), rv)
        out = out.reshape(N_NEW, H, d)
        for hq in range(H):
            want = ref.attention(q[:, hq], K1[:, hq // G], V1[:, hq // G], info.attn_scale, causal_offset=B).numpy()
            errs.append(np.linalg.norm(out[:, hq] - want) / np.linalg.norm(want))
    assert np.median(errs) < 3e-2 and max(errs) < 8e-2, (np.median(errs), max(errs))


@pytest.mark.slow
@pytest.mark.parametrize("tk", ["q8_0", "q4_0"])
def test_grkv_lowers_the_objective_on_smollm2_quantised(smollm2_gguf, tk):
    """On real weights the fit still pays after requantisation: the layers'
    summed objective drops, and no layer gets worse."""
    from grkv_cpp.texts import haystack, passkey_needle
    m, toks = _prefilled(smollm2_gguf, tk, tk, haystack(16, [(0.4, passkey_needle(31337))]), n_ctx=1024)
    method, merge = parse_method("snapkv+grkv")
    res = compress_cache(m.ctx, m.info, method, merge=merge, ratio=0.3, capture=m.capture)
    rep = res.merge_report
    choice = np.array(rep["choice"])
    objs = np.stack([rep["obj_none"], rep["obj_v"], rep["obj_kv"]], 1)
    chosen = objs[np.arange(len(choice)), choice]
    assert (chosen <= objs[:, 0] * (1 + 1e-6)).all()
    assert chosen.sum() < 0.9 * objs[:, 0].sum(), (chosen.sum() / objs[:, 0].sum())


def test_unflashed_quantised_v_is_refused(model_path):
    with pytest.raises(UnsupportedModelError, match="needs flash attention"):
        with quiet():
            CompressedLlama(model_path, n_ctx=256, type_v="q8_0")


@pytest.mark.slow
@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
@pytest.mark.parametrize("tk", ["q8_0", "q4_0"])
def test_passkey_on_quantised_caches(which, tk, request):
    """The pass key survives a q8_0 / q4_0 cache, whole and compressed to
    half by compactor and by compactor+grkv (merged rows requantised).
    (SnapKV, query-agnostic, loses this key at half on f16 already.)"""
    from grkv_cpp.methods.context import ALL_QUERIES
    from grkv_cpp.texts import haystack, passkey_needle

    path = request.getfixturevalue(f"{which}_gguf")
    needle = passkey_needle(73914)
    with quiet():
        m = CompressedLlama(path, n_ctx=2048, flash_attn=True, type_k=tk, type_v=tk)
    st = m.prefill_state(haystack(30, [(0.4, needle)]), window=ALL_QUERIES)
    m.restore(st)
    assert needle.answer in m.ask(needle.question, max_tokens=16)
    for method in ("compactor", "compactor+grkv"):
        stats = m.compress_state(st, method=method, ratio=0.5)
        assert stats.kv_cells_after <= (stats.kv_cells_before + 1) // 2
        answer = m.ask(needle.question, max_tokens=16)
        assert needle.answer in answer, (method, answer)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_short_ruler_subset_on_quantised_caches(which, request, tmp_path):
    """Four single-needle RULER questions (niah_single_1/2, 1K tokens) through
    the eval harness on f16, q8_0 and q4_0 caches, whole and compressed to
    half by compactor: a q8_0 full cache answers every question the f16 one
    does (q4_0: all but at most one), and compression on a quantised cache
    loses at most one question more than on f16 beyond those its full cache
    already lost (the paired RULER runs in docs/results.md measure the
    whole suites)."""
    from grkv_cpp.eval import ruler
    from grkv_cpp.eval.harness import EvalConfig, run_eval

    path = request.getfixturevalue(f"{which}_gguf")
    tok = ruler.gguf_tokenizer(path)
    rows = [r for task in ("niah_single_1", "niah_single_2") for r in ruler.generate_task(task, tok, 1024, 2, seed=0)]
    cfg = EvalConfig(methods=["full", "compactor"], ratios=[0.5], window=64)
    scores = {}
    for tk in ("f16", "q8_0", "q4_0"):
        with quiet():
            m = CompressedLlama(path, n_ctx=1536, flash_attn=True, type_k=tk, type_v=tk)
        res = run_eval(m, rows, cfg, tmp_path / f"{tk}.jsonl", progress=False)
        m.close()
        assert len(res) == 8
        for r in res:
            scores[tk, r["method"], r["group"]] = r["score"]
            if r["method"] == "compactor":
                assert r["kv_cells"] == max(1, round(0.5 * r["context_tokens"]))
    for tk in ("q8_0", "q4_0"):
        # q8_0 answers every question f16 does; q4_0 (8.5% row error) may lose one: on this
        # session's AVX2 CPU (AMD EPYC) its whole cache reads SmolLM2's key 7325603 as 7356000,
        # where the machines of earlier runs had kept it
        lost_full = sum(scores["f16", "full", g] > scores[tk, "full", g] for g in range(4))
        assert lost_full <= (0 if tk == "q8_0" else 1), (tk, scores)
        # compression adds at most one lost question to what the quantised full cache already loses
        lost = sum(scores["f16", "compactor", g] > scores[tk, "compactor", g] for g in range(4))
        assert lost <= 1 + lost_full, (tk, scores)
