"""Quantised-cache codecs (issue 21's foundation): q8_0 / q4_0 blocks against
gguf's numpy reference, requantisation of a dequantised row gives back its
bytes, and the Walsh-Hadamard rotation equals llama.cpp's matrix (Sylvester
construction / sqrt(n)), is orthonormal and its own inverse."""

import numpy as np
import pytest

import gguf
from gguf.quants import dequantize, quantize

from grkv_cpp import _native
from grkv_cpp.errors import NativeError

TYPES = {"q8_0": (8, gguf.GGMLQuantizationType.Q8_0), "q4_0": (2, gguf.GGMLQuantizationType.Q4_0)}


def rows(seed, n=64 * 32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32) * rng.uniform(0.01, 10, n // 32).repeat(32).astype(np.float32)
    x[:32] = 0.0  # an all-zero block: scale 0
    return x


@pytest.mark.parametrize("name", list(TYPES))
@pytest.mark.parametrize("seed", range(3))
def test_codec_matches_gguf_reference(name, seed):
    code, qt = TYPES[name]
    x = rows(seed)
    ref = quantize(x.reshape(1, -1), qt).tobytes()
    got = _native.kernels.quant_quantize(code, x)
    assert len(got) == len(ref) == len(x) // 32 * (34 if name == "q8_0" else 18)
    # dequantisation is exact; quantisation may differ from numpy's rounding only on exact ties
    np.testing.assert_array_equal(_native.kernels.quant_dequantize(code, ref), dequantize(np.frombuffer(ref, np.uint8), qt))
    a, b = np.frombuffer(got, np.uint8), np.frombuffer(ref, np.uint8)
    assert (a != b).mean() < 1e-3
    back = _native.kernels.quant_dequantize(code, got)
    # error within half a step (q8_0) or one step (q4_0's asymmetric range), plus the
    # f16 rounding of the scale, which moves the largest value by up to 127 * 2^-11 steps
    step = np.abs(x).reshape(-1, 32).max(1).repeat(32) / (127 if name == "q8_0" else 8)
    assert (np.abs(back - x) <= step * (0.57 if name == "q8_0" else 1.07)).all()


@pytest.mark.parametrize("name", list(TYPES))
def test_requantising_a_dequantised_row_gives_its_bytes(name):
    code, _ = TYPES[name]
    q = _native.kernels.quant_quantize(code, rows(7))
    assert _native.kernels.quant_quantize(code, _native.kernels.quant_dequantize(code, q)) == q


def test_codec_refuses_partial_blocks():
    with pytest.raises(NativeError, match="multiple of 32"):
        _native.kernels.quant_quantize(8, np.ones(40, np.float32))
    with pytest.raises(NativeError, match="whole number of blocks"):
        _native.kernels.quant_dequantize(8, b"\0" * 35)


def llama_hadamard(n):
    """llama.cpp's ggml_gen_hadamard, written out: H[0,0] = 1/sqrt(n), then
    each doubling copies the block right and down and negates the corner."""
    H = np.zeros((n, n))
    H[0, 0] = 1 / np.sqrt(n)
    s = 1
    while s < n:
        H[s:2 * s, :s] = H[:s, :s]
        H[:s, s:2 * s] = H[:s, :s]
        H[s:2 * s, s:2 * s] = -H[:s, :s]
        s *= 2
    return H


@pytest.mark.parametrize("block", [64, 128, 256])
def test_hadamard_is_llamas_rotation_and_its_own_inverse(block):
    x = np.random.default_rng(block).standard_normal((3, 2 * block)).astype(np.float32)
    H = llama_hadamard(block)
    want = np.concatenate([x[:, :block] @ H.T, x[:, block:] @ H.T], 1)
    got = _native.kernels.hadamard(x, block)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(_native.kernels.hadamard(got, block), x, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)


def test_rotation_blocks_follow_llama_cpp():
    assert _native.hadamard_block_k(8, 64) == 64 and _native.hadamard_block_k(8, 128) == 128
    assert _native.hadamard_block_k(2, 192) == 64 and _native.hadamard_block_k(8, 256) == 256
    assert _native.hadamard_block_v(8, 128) == 64
    assert _native.hadamard_block_k(8, 80) == 0 and _native.hadamard_block_k(1, 128) == 0  # f16: no rotation


def _cache_keys_values(path, toks, type_k, type_v):
    import llama_cpp

    from grkv_cpp import kvstate
    from grkv_cpp.loader import quiet

    with quiet():
        llm = llama_cpp.Llama(str(path), n_ctx=256, type_k=type_k, type_v=type_v, flash_attn=True, verbose=False)
    llm.eval(toks)
    st = _native.SeqState(kvstate.get_blob(llm._ctx.ctx))
    return [(st.keys(0, il), st.values(0, il)) for il in range(st.part_info(0)["n_layer"])]


@pytest.mark.parametrize("name,tol", [("q8_0", 0.01), ("q4_0", 0.12)])  # measured 0.0053 and 0.085
def test_llama_cpp_stores_quantised_rows_in_the_rotated_basis(tmp_path, name, tol):
    """A quantised cache's rows, dequantised and un-rotated per head, are the
    f16 cache's rows up to quantisation error; left rotated they are not.
    Layer 0 only: deeper layers' inputs differ by the attention over the
    quantised cache itself (0.03-0.08 for q8_0 at layers 1-2 here)."""
    from tiny_model import TinySpec, write_tiny_model

    spec = TinySpec("llama", n_embd=256, n_head=4, n_head_kv=2, n_ff=128)  # head_dim 64: rotated by H_64
    path = write_tiny_model(tmp_path / "m.gguf", spec)
    toks = list(range(40, 100))
    code = TYPES[name][0]
    f16 = _cache_keys_values(path, toks, 1, 1)
    qnt = _cache_keys_values(path, toks, code, code)
    for (k0, v0), (k1, v1) in zip(f16[:1], qnt[:1]):
        for x0, x1, block in ((k0, k1, _native.hadamard_block_k(code, 64)), (v0, v1, _native.hadamard_block_v(code, 64))):
            err = np.linalg.norm(_native.kernels.hadamard(x1, block) - x0) / np.linalg.norm(x0)
            assert err < tol, err
            assert np.linalg.norm(x1 - x0) / np.linalg.norm(x0) > 0.5  # the stored basis is rotated


def test_quantised_fuzz_seed_round_trips_byte_for_byte():
    """The parser fuzz's q8_0-K / q4_0-V seed (written by llama.cpp from a
    one-layer tiny model) parses as those types and serialises to its bytes."""
    from pathlib import Path

    blob = (Path(__file__).parent / "fuzz_corpus/blob/q8_0k_q4_0v.bin").read_bytes()
    st = _native.SeqState(blob)
    info = st.part_info(0)
    assert info["k_types"] == ["q8_0"] and info["v_types"] == ["q4_0"] and info["n_cells"] == 6
    assert st.serialize() == blob
