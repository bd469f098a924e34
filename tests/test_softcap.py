"""Gemma-2's attention-logit soft cap (c * tanh(z / c)) in every score that
recomputes attention, native against the float64 torch reference, with a cap
tight enough to change the scores (GRKV's steps: tests/test_grkv.py)."""

import numpy as np
import pytest

from grkv_cpp import _native
from grkv_cpp.errors import NativeError
import reference as ref
import reference_context as rc
from test_context_scores import layer, native_rope, params, reread_layer
from test_scores import random_layer

CAP = 1.5  # the random layers' logits spread over several units: this cap bends them


def _differs(a, b):
    """The cap moves the scores by over 5% (relative norm)."""
    a, b = np.asarray(a), np.asarray(b)
    return np.linalg.norm(a - b) > 0.05 * np.linalg.norm(b)


@pytest.mark.parametrize("seed", range(2))
def test_window_scores_match_reference_under_the_cap(seed):
    k, q, pos, qpos, H = random_layer(seed)
    scale = 1 / np.sqrt(k.shape[-1])
    s, _ = _native.kernels.score_layer("snapkv", k, pos, q, qpos, n_head=H, scale=scale, softcap=CAP)
    want = ref.snapkv_scores(k, pos, q, qpos, H, scale, 5, softcap=CAP)[0].numpy()
    np.testing.assert_allclose(s, want, rtol=2e-5, atol=1e-7)
    w = len(qpos)  # the protected window scores max + 1 either way: compare the prefix
    assert _differs(want[:, :-w], ref.snapkv_scores(k, pos, q, qpos, H, scale, 5)[0].numpy()[:, :-w])
    s, _, g = _native.kernels.score_layer("gkv", k, pos, q, qpos, n_head=H, scale=scale, softcap=CAP)
    rs, _, rg = ref.gkv_scores(k, pos, q, qpos, H, scale, softcap=CAP)
    np.testing.assert_allclose(s, rs.numpy(), rtol=2e-5, atol=1e-6)
    s, _ = _native.kernels.score_layer("laser", k, pos, q, qpos, n_head=H, scale=scale, n_sink=5, kernel=7, softcap=CAP)
    np.testing.assert_allclose(s, ref.laser_scores(k, pos, q, qpos, H, scale, softcap=CAP).numpy(), rtol=2e-5,
                               atol=1e-6)


def test_reconstruct_matches_reference_under_the_cap():
    chunks = ((10, 70), (70, 120))
    k, q, rk, qchunk, qpos, H = reread_layer(0, chunks=chunks)
    pos = np.arange(len(k), dtype=np.int32)
    p = params(n_sink=10, n_recent=0)
    s, _ = _native.kernels.score_context_layer("reconstruct", k, pos, q, qpos, H, 0.25, p, native_rope((16, 1e4, 1.0, False)),
                                       rk=rk, qchunk=qchunk, chunks=list(chunks), softcap=CAP)
    want = rc.reconstruct_scores(k, q, rk, qchunk, chunks, H, 0.25, n_sink=10, softcap=CAP)[0].numpy()
    np.testing.assert_allclose(s, want, rtol=1e-4, atol=1e-7)
    assert _differs(want, rc.reconstruct_scores(k, q, rk, qchunk, chunks, H, 0.25, n_sink=10)[0].numpy())


def test_compactor_caps_only_its_scaled_chunk_attention():
    k, v, q, pos, H, rope = layer(1)
    scale = 0.25
    for chunk_scale in (True, False):  # unscaled chunks (kvpress's default) are a heuristic of their own: no cap
        p = params(n_sink=8, n_recent=4, chunk=50, chunk_scale=chunk_scale)
        s, _ = _native.kernels.score_context_layer("compactor", k, pos, q, pos, H, scale, p, native_rope(rope), v=v,
                                           softcap=CAP)
        want, _ = rc.compactor_scores(k, v, pos, q, H, scale, rope, n_sink=8, n_recent=4, chunk=50,
                                      chunk_scale=chunk_scale, softcap=CAP)
        np.testing.assert_allclose(s, want.numpy(), rtol=1e-3, atol=1e-4)


def test_expected_attention_is_refused_under_the_cap():
    k, v, q, pos, H, rope = layer(0)
    with pytest.raises(NativeError, match="soft-capped"):
        _native.kernels.score_context_layer("expected", k, pos, q, pos, H, 0.25, params(), native_rope(rope), v=v,
                                    softcap=CAP)
