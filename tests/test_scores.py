"""Native scores and selections against the float64 torch reference, on
random tensors with GQA."""

import numpy as np
import pytest
import torch

from grkv_cpp import _native
from grkv_cpp.errors import NativeError
import reference as ref


def random_layer(seed, T=97, Hkv=2, G=3, d=16, w=8):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((T, Hkv, d)).astype(np.float32)
    q = rng.standard_normal((w, Hkv * G, d)).astype(np.float32) * 2
    pos = np.arange(T, dtype=np.int32) + 5  # positions need not start at 0
    qpos = pos[-w:].copy()
    return k, q, pos, qpos, Hkv * G


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_snapkv_matches_reference(seed, pooling):
    k, q, pos, qpos, H = random_layer(seed)
    scale = 1 / np.sqrt(k.shape[-1])
    name = "snapkv" if pooling == "avg" else "snapkv-max"
    s, prot = _native.kernels.score_layer(name, k, pos, q, qpos, n_head=H, scale=scale, kernel=5)
    rs, rprot = ref.snapkv_scores(k, pos, q, qpos, H, scale, 5, pooling)
    np.testing.assert_allclose(s, rs.numpy(), rtol=2e-5, atol=1e-7)
    assert (prot.astype(bool) == rprot.numpy()).all()
    budget = 40
    sel = _native.kernels.select_per_head(s, prot, budget)
    rsel = ref.select(rs, rprot, budget).numpy()
    if pooling == "avg":
        assert (sel == rsel).all()
    else:  # max pooling makes exact ties: compare the kept score multisets
        r = rs.numpy()
        for h in range(len(sel)):
            np.testing.assert_array_equal(np.sort(r[h, sel[h]]), np.sort(r[h, rsel[h]]))
    # the observation window is always kept
    assert all(set(range(len(pos) - len(qpos), len(pos))) <= set(row) for row in sel)


@pytest.mark.parametrize("seed", range(3))
def test_knorm_matches_reference(seed):
    k, *_ = random_layer(seed)
    s, prot = _native.kernels.score_layer("knorm", k, np.arange(len(k), dtype=np.int32))
    rs, rprot = ref.knorm_scores(k)
    np.testing.assert_allclose(s, rs.numpy(), rtol=1e-6)
    sel = _native.kernels.select_per_head(s, prot, 30)
    assert (sel == ref.select(rs, rprot, 30).numpy()).all()


def test_streaming_matches_reference():
    k, *_ = random_layer(0)
    T, Hkv = k.shape[:2]
    s, prot = _native.kernels.score_layer("streaming", k, np.arange(T, dtype=np.int32), n_sink=4)
    rs, rprot = ref.streaming_scores(T, Hkv, 4)
    sel = _native.kernels.select_per_head(s, prot, 20)
    rsel = ref.select(rs, rprot, 20)
    assert (sel == rsel.numpy()).all()
    assert list(sel[0]) == [0, 1, 2, 3] + list(range(T - 16, T))


def test_budget_below_window_is_refused():
    k, q, pos, qpos, H = random_layer(1)
    s, prot = _native.kernels.score_layer("snapkv", k, pos, q, qpos, n_head=H, scale=0.25)
    with pytest.raises(NativeError, match="smaller than the 8 tokens"):
        _native.kernels.select_per_head(s, prot, 5)


def test_snapkv_without_queries_is_refused():
    k, *_ = random_layer(2)
    with pytest.raises(NativeError, match="window's queries"):
        _native.kernels.score_layer("snapkv", k, np.arange(len(k), dtype=np.int32))


def test_f16_round_trip_matches_numpy():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-8, 5, 10000),
                        np.array([0.0, -0.0, 65504, 70000, 1e-8, 6e-8, 3e-5, np.inf, -np.inf], np.float32)])
    got = _native.kernels.f32_round_trip(x, "f16")
    want = x.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    got_bf = _native.kernels.f32_round_trip(x[:100], "bf16")
    want_bf = torch.tensor(x[:100]).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(got_bf, want_bf)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("with_history", [False, True])
def test_gkv_matches_reference(seed, with_history):
    k, q, pos, qpos, H = random_layer(seed, T=120)
    # three copies of a span make the redundancy term (and its most-recent-copy rule) matter
    noise = np.random.default_rng(seed).standard_normal((2, *k[10:20].shape)).astype(np.float32)
    k[40:50] = k[10:20] + 0.01 * noise[0]
    k[70:80] = k[10:20] + 0.01 * noise[1]
    scale = 1 / np.sqrt(k.shape[-1])
    hist = np.random.default_rng(seed + 10).random((k.shape[1], len(k))).astype(np.float32) if with_history else None
    s, prot, g = _native.kernels.score_layer("gkv", k, pos, q, qpos, n_head=H, scale=scale, hist=hist)
    rs, rprot, rg = ref.gkv_scores(k, pos, q, qpos, H, scale, hist)
    np.testing.assert_allclose(g, rg.numpy(), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(s, rs.numpy(), rtol=2e-5, atol=1e-6)
    assert (prot.astype(bool) == rprot.numpy()).all()
    sel = _native.kernels.select_per_head(s, prot, 50)
    assert (sel == ref.select(rs, rprot, 50).numpy()).all()
    # redundancy = (lambda * g - s) / (1 - lambda): the oldest copy is the most
    # redundant, the newest is spared (its rows' most recent copy is zeroed)
    red = (0.5 * g - s)[:, :112] / 0.5
    others = np.r_[0:10, 20:40, 50:70, 80:112]
    oldest, newest, rest = (red[:, sl].mean(axis=1) for sl in (slice(10, 20), slice(70, 80), others))
    assert (oldest > newest).all() and (newest > rest).all()


def test_gkv_history_decays():
    k, q, pos, qpos, H = random_layer(0, T=60)
    hist = np.zeros((k.shape[1], len(k)), np.float32)
    hist[:, 3] = 1.0  # once the most attended token
    _, _, g = _native.kernels.score_layer("gkv", k, pos, q, qpos, n_head=H, scale=0.25, hist=hist, alpha=0.8)
    assert (g[:, 3] >= 0.8 - 1e-6).all()  # max(0.8 * 1, local) keeps it high
    _, _, g0 = _native.kernels.score_layer("gkv", k, pos, q, qpos, n_head=H, scale=0.25)
    assert (g0 <= 1 + 1e-6).all() and np.isclose(g0.max(axis=1), 1).all()


@pytest.mark.parametrize("seed", range(3))
def test_laser_matches_reference(seed):
    k, q, pos, qpos, H = random_layer(seed, T=80)
    s, prot = _native.kernels.score_layer("laser", k, pos, q, qpos, n_head=H, scale=0.25, n_sink=5, kernel=7)
    np.testing.assert_allclose(s, ref.laser_scores(k, pos, q, qpos, H, 0.25).numpy(), rtol=2e-5, atol=1e-6)
    assert prot.astype(bool).tolist() == [t < 5 or t >= 73 for t in range(80)]
