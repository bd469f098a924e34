"""Eviction on q8_0 / q4_0 KV caches (issue 21, eviction only): every kept
head slot holds its token's quantised blocks byte for byte, and llama.cpp's
attention for new tokens over the compressed cache equals a float64 reference
over the dequantised, un-rotated kept rows, within quantisation tolerance.
Merges are refused on quantised caches."""

import numpy as np
import pytest

import reference as ref
from grkv_cpp import _native, kvstate
from grkv_cpp.apply import patched_library
from grkv_cpp.capture import ATTN_OUT, QUERIES
from grkv_cpp.compressor import compress_cache
from grkv_cpp.errors import BadRequestError, UnsupportedModelError
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
            out = _native.hadamard(np.ascontiguousarray(out), rv)
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
            q0 = _native.quant_quantize(2, np.ascontiguousarray(K0[res.keep[il][h], h].ravel()))
            q1 = _native.quant_quantize(2, np.ascontiguousarray(K1[:, h].ravel()))
            assert q0 == q1


def test_merges_and_unflashed_quantised_v_are_refused(model_path):
    with quiet():
        m = CompressedLlama(model_path, n_ctx=1024, flash_attn=True, type_k="q8_0", type_v="q8_0")
    m.compress("The grass is green. " * 30, method="knorm", ratio=0.5)
    before = kvstate.get_blob(m.ctx)
    method, merge = parse_method("snapkv+grkv")
    with pytest.raises(BadRequestError, match="merging .* q8_0 KV cache is not supported yet"):
        compress_cache(m.ctx, m.info, method, merge=merge, ratio=0.5, capture=m.capture)
    assert kvstate.get_blob(m.ctx) == before
    with pytest.raises(UnsupportedModelError, match="needs flash attention"):
        with quiet():
            CompressedLlama(model_path, n_ctx=256, type_v="q8_0")
